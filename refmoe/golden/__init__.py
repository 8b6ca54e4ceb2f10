"""Golden reference data and a conformance checker for other implementations (docs/golden-format.md).

    write_golden(dir)            compute the default grid (or chosen cases) and write fixtures
    check_dump(dir, dump_dir)    compare another implementation's dump, tensor by tensor
    load_case(dir, name)         a case's arrays, checked against the manifest (sha256, keys, shapes)
"""
from .cases import AUX_FORMS, CaseSpec, compute_case
from .checker import check_dump, compare_case
from .report import CheckReport, TensorResult
from .format import GoldenFormatError, load_case, load_manifest, load_npz, save_npz
from .grid import default_cases, select
from .writer import write_golden

__all__ = ["AUX_FORMS", "CaseSpec", "compute_case", "CheckReport", "TensorResult", "check_dump", "compare_case",
           "GoldenFormatError", "load_case", "load_manifest", "load_npz", "save_npz", "default_cases", "select",
           "write_golden"]
