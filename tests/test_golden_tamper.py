"""Tampered fixture and dump directories (docs/golden-format.md#trust): every one is refused with one line and
exit 2 (or fails the check with exit 1 when it is a plain mismatch), and nothing outside the given directories
is read or written. Each test builds its tampered directories in tmp_path."""
import contextlib
import io
import json
import os
import shutil
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from refmoe.cli import main
from refmoe.golden import CaseSpec, GoldenFormatError, check_dump, load_case, load_npz, save_npz, write_golden
from refmoe.golden.checker import compare_tensor
from refmoe.golden.format import TOLERANCES

CASES = ["base", "ties"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("pristine")
    write_golden(str(d), CASES)
    return d


@pytest.fixture
def golden(pristine, tmp_path):
    d = tmp_path / "golden"
    shutil.copytree(pristine, d)
    return d


@pytest.fixture
def outside(tmp_path_factory):
    """A directory beside (not inside) the test's tmp_path: symlinks planted in DIR point here."""
    return tmp_path_factory.mktemp("outside")


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def _set_manifest(d, m):
    (d / "manifest.json").write_text(json.dumps(m))


def _dump(golden, tmp_path, cases=CASES):
    dump = tmp_path / "dump"
    dump.mkdir(exist_ok=True)
    for name in cases:
        shutil.copy(golden / f"{name}.npz", dump / f"{name}.npz")
    return dump


def _cli(capsys, *argv):
    """(exit code, stderr) of `refmoe golden ...`; a bad input gives exactly one `refmoe golden: error:` line."""
    code = main(["golden", *map(str, argv)])
    err = capsys.readouterr().err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("refmoe golden: error: "), err
        assert "Traceback" not in err
    return code, err


def _snapshot(d):
    """Every file under ``d`` with its bytes and mtime (to show that nothing there changed)."""
    return {p: (open(os.path.join(r, p), "rb").read(), os.lstat(os.path.join(r, p)).st_mtime_ns)
            for r, _, fs in os.walk(d) for p in fs}


_EVENTS = []
_RECORDING = [False]


def _audit(event, args):
    if _RECORDING[0] and event in ("open", "os.rename", "os.replace", "os.remove", "os.mkdir", "os.symlink",
                                   "os.truncate", "os.link", "os.chmod", "shutil.copyfile"):
        _EVENTS.extend(a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike)))


sys.addaudithook(_audit)


@contextlib.contextmanager
def touched():
    """The real paths of every file opened, renamed, removed or created inside the block (audit events)."""
    seen = []
    _EVENTS.clear()
    _RECORDING[0] = True
    try:
        yield seen
    finally:
        _RECORDING[0] = False
        seen.extend(os.path.realpath(os.fsdecode(p)) for p in _EVENTS)


def _assert_stays_inside(seen, inside, outside):
    outside = os.path.realpath(outside)
    inside = os.path.realpath(inside)
    assert not [p for p in seen if p.startswith(outside + os.sep)], seen
    base = os.path.dirname(inside)                      # pytest's temporary root for this test session
    assert all(p.startswith(inside + os.sep) for p in seen if p.startswith(base + os.sep)), seen


# ----------------------------------------------------------------------------------------------
# file names in the manifest
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("file", ["../outside/base.npz", "/abs/base.npz", "sub/base.npz", "..", "ties.npz",
                                  "base.npz/", 7, None])
def test_manifest_file_must_be_the_plain_case_name(golden, tmp_path, capsys, file):
    """The reproducer: file = "../outside/base.npz" and an empty dump used to pass --require-all."""
    out = tmp_path / "outside"
    out.mkdir()
    shutil.copy(golden / "base.npz", out / "base.npz")
    m = _manifest(golden)
    m["cases"] = {"base": m["cases"]["base"]}
    m["cases"]["base"]["file"] = file
    _set_manifest(golden, m)
    (tmp_path / "dump").mkdir()
    with touched() as seen:
        code, err = _cli(capsys, "check", golden, tmp_path / "dump", "--require-all")
    assert code == 2 and "must be 'base.npz'" in err
    assert not [p for p in seen if "outside" in p], seen
    with pytest.raises(GoldenFormatError, match="plain name"):
        load_case(str(golden), "base", m)


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", "", "x.y", "x y", "/x"])
def test_case_names_are_plain(golden, tmp_path, capsys, name):
    m = _manifest(golden)
    m["cases"][name] = dict(m["cases"].pop("base"), file=f"{name}.npz")
    _set_manifest(golden, m)
    code, err = _cli(capsys, "check", golden, _dump(golden, tmp_path))
    assert code == 2 and "not a plain name" in err
    before = _snapshot(tmp_path)
    with pytest.raises(GoldenFormatError, match="not a plain name"):
        write_golden(str(tmp_path / "w"), [CaseSpec(name=name)])
    assert _snapshot(tmp_path) == before and not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------------------
# symlinks, hard links and other planted entries
# ----------------------------------------------------------------------------------------------

def test_write_refuses_planted_symlinks(tmp_path, outside, capsys):
    (outside / "victim.npz").write_bytes(b"victim")
    (outside / "victim.json").write_text("{}")
    d = tmp_path / "golden"
    d.mkdir()
    os.symlink(outside / "victim.npz", d / "base.npz")
    before = _snapshot(outside)
    with touched() as seen:
        code, err = _cli(capsys, "write", d, "--case", "base")
    assert code == 2 and "symlink" in err
    os.remove(d / "base.npz")
    os.symlink(outside / "victim.json", d / "manifest.json")
    with touched() as seen2, pytest.raises(GoldenFormatError, match="symlink"):
        write_golden(str(d), ["base"])
    link = tmp_path / "link"
    os.symlink(outside, link)
    with touched() as seen3:
        code, err = _cli(capsys, "write", link, "--case", "base")
    assert code == 2 and "symlink" in err
    assert _snapshot(outside) == before
    for s in (seen, seen2, seen3):
        _assert_stays_inside(s, tmp_path, outside)


def test_write_replaces_a_hard_link_instead_of_writing_through_it(tmp_path, outside):
    (outside / "victim.npz").write_bytes(b"victim")
    d = tmp_path / "golden"
    d.mkdir()
    os.link(outside / "victim.npz", d / "base.npz")
    write_golden(str(d), ["base"])
    assert (outside / "victim.npz").read_bytes() == b"victim"
    assert load_case(str(d), "base")["inter/y"].shape == (8, 6)


def test_read_refuses_symlinks(golden, tmp_path, outside, capsys):
    """Symlinked fixture file, manifest, dump file, golden directory and dump directory: each refused, and
    the files they point to (outside tmp_path) are never opened."""
    dump = _dump(golden, tmp_path)
    for f in ("base.npz", "manifest.json"):
        shutil.copy(golden / f, outside / f)
    shutil.copytree(dump, outside / "dump")
    before = _snapshot(outside)

    def planted(path, target):
        os.rename(path, str(path) + ".orig")
        os.symlink(target, path)
        return lambda: (os.remove(path), os.rename(str(path) + ".orig", path))

    trials = [(golden / "base.npz", outside / "base.npz"), (golden / "manifest.json", outside / "manifest.json"),
              (dump / "base.npz", outside / "dump" / "base.npz"), (golden, outside), (dump, outside / "dump")]
    opened = []
    for path, target in trials:
        undo = planted(path, target)
        with touched() as seen:
            code, err = _cli(capsys, "check", golden, dump)
            with pytest.raises(GoldenFormatError, match="symlink"):
                check_dump(str(golden), str(dump))
        undo()
        assert code == 2 and "symlink" in err, (path, err)
        _assert_stays_inside(seen, tmp_path, outside)
        opened += seen
    assert os.path.realpath(golden / "manifest.json") in opened              # the audit hook does see opens
    assert _snapshot(outside) == before
    assert _cli(capsys, "check", golden, dump)[0] == 0                  # restored: it passes again


def test_a_fifo_in_place_of_a_dump_is_refused_without_blocking(golden, tmp_path, capsys):
    dump = _dump(golden, tmp_path, ["ties"])
    os.mkfifo(dump / "base.npz")
    code, err = _cli(capsys, "check", golden, dump)
    assert code == 2 and "not a regular file" in err


# ----------------------------------------------------------------------------------------------
# tolerances are the checker's own
# ----------------------------------------------------------------------------------------------

def test_manifest_cannot_loosen_tolerances(golden, tmp_path, capsys):
    m = _manifest(golden)
    for e in m["cases"].values():
        e["tolerance"] = {"rtol": 1e30, "atol": 1e30}
    _set_manifest(golden, m)
    dump = _dump(golden, tmp_path)
    a = load_npz(str(dump / "base.npz"))
    save_npz(str(dump / "base.npz"), {k: v * 1.5 if v.dtype.kind == "f" else v for k, v in a.items()})
    report = check_dump(str(golden), str(dump))
    assert not report.ok and report.tolerances["base"] == TOLERANCES["float64"]
    assert {r.case for r in report.failures} == {"base"}
    assert _cli(capsys, "check", golden, dump)[0] == 1


def test_manifest_may_tighten_tolerances_and_the_command_line_decides(golden, tmp_path, capsys):
    dump = _dump(golden, tmp_path, ["base"])
    a = load_npz(str(dump / "base.npz"))
    a["inter/y"] = a["inter/y"] * (1 + 1e-12)                  # within the default rtol 1e-10
    save_npz(str(dump / "base.npz"), a)
    assert check_dump(str(golden), str(dump)).ok
    m = _manifest(golden)
    m["cases"]["base"]["tolerance"] = {"rtol": 1e-14, "atol": 0}
    _set_manifest(golden, m)
    report = check_dump(str(golden), str(dump))
    assert [r.key for r in report.failures] == ["inter/y"]
    assert report.tolerances["base"] == {"rtol": 1e-14, "atol": 0}
    assert _cli(capsys, "check", golden, dump, "--rtol", "1e-10")[0] == 0      # given tolerances replace both


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf", "1e400", "abc", ""])
@pytest.mark.parametrize("option", ["--rtol", "--atol"])
def test_command_line_tolerances_must_be_finite_and_non_negative(golden, tmp_path, capsys, option, value):
    code, err = _cli(capsys, "check", golden, _dump(golden, tmp_path), f"{option}={value}")
    assert code == 2 and f"{option} must be a finite number >= 0" in err
    with pytest.raises(GoldenFormatError, match="finite number"):
        check_dump(str(golden), str(tmp_path / "dump"), rtol=float("nan"))


# ----------------------------------------------------------------------------------------------
# malformed manifests: exit 2, one line
# ----------------------------------------------------------------------------------------------

def _entry(field, value):
    def spoil(m):
        m["cases"]["base"][field] = value
    return spoil


MALFORMED = {
    "string rtol": _entry("tolerance", {"rtol": "1e-3", "atol": 1e-13}),
    "negative atol": _entry("tolerance", {"rtol": 1e-10, "atol": -1}),
    "boolean rtol": _entry("tolerance", {"rtol": True, "atol": 0}),
    "tolerance a list": _entry("tolerance", [1, 2]),
    "entry a string": lambda m: m["cases"].__setitem__("base", "base.npz"),
    "entry a list": lambda m: m["cases"].__setitem__("base", [1]),
    "dtype a list": _entry("dtype", ["float64"]),
    "dtype unknown": _entry("dtype", "float16"),
    "sha256 an int": _entry("sha256", 5),
    "keys a string": _entry("keys", "inter/y"),
    "key shape nested": lambda m: m["cases"]["base"]["keys"]["inter/y"].__setitem__("shape", [[8], 6]),
    "key shape negative": lambda m: m["cases"]["base"]["keys"]["inter/y"].__setitem__("shape", [-8, 6]),
    "key dtype object": lambda m: m["cases"]["base"]["keys"]["inter/y"].__setitem__("dtype", "object"),
    "key dtype a list": lambda m: m["cases"]["base"]["keys"]["inter/y"].__setitem__("dtype", ["float64"]),
    "keys declare 48 GiB": lambda m: m["cases"]["base"]["keys"]["inter/y"].__setitem__("shape", [2 ** 30, 6]),
    "key outside groups": lambda m: m["cases"]["base"]["keys"].__setitem__("../y", {"shape": [], "dtype": "bool"}),
    "field missing": lambda m: m["cases"]["base"].pop("sha256"),
    "cases a list": lambda m: m.__setitem__("cases", [1]),
    "cases empty": lambda m: m.__setitem__("cases", {}),
}


@pytest.mark.parametrize("what", sorted(MALFORMED))
def test_malformed_manifest_is_one_line_and_exit_2(golden, tmp_path, capsys, what):
    m = _manifest(golden)
    MALFORMED[what](m)
    _set_manifest(golden, m)
    code, err = _cli(capsys, "check", golden, _dump(golden, tmp_path), "--require-all")
    assert code == 2, (what, err)


@pytest.mark.parametrize("text", ["[" * 100000 + "]" * 100000, '{"a": ' * 50000 + "1" + "}" * 50000,
                                  '{"format": "refmoe-golden", "schema_version": 2, "cases": NaN}',
                                  "[1, 2", "\xff\xfe".encode("latin-1").decode("latin-1"), "9" * 10000, "null"])
def test_unparsable_manifest_is_one_line_and_exit_2(golden, tmp_path, capsys, text):
    (golden / "manifest.json").write_bytes(text.encode("latin-1"))
    code, err = _cli(capsys, "check", golden, _dump(golden, tmp_path))
    assert code == 2


@pytest.mark.parametrize("field", ["file", "sha256", "tolerance", "dtype"])
def test_a_huge_or_deep_field_gives_a_short_line(golden, tmp_path, capsys, field):
    m = _manifest(golden)
    m["cases"]["base"][field] = "x" * 1_000_000 if field != "tolerance" else {"rtol": [[[[[[[[0]]]]]]]] * 10 ** 5}
    _set_manifest(golden, m)
    code, err = _cli(capsys, "check", golden, _dump(golden, tmp_path))
    assert code == 2 and len(err) < 600


def test_nan_tolerance_in_the_manifest_is_refused(golden, tmp_path, capsys):
    text = (golden / "manifest.json").read_text().replace('"rtol": 1e-10', '"rtol": NaN', 1)
    (golden / "manifest.json").write_text(text)
    code, err = _cli(capsys, "check", golden, _dump(golden, tmp_path))
    assert code == 2 and "finite number" in err


# ----------------------------------------------------------------------------------------------
# dtypes: integers exact, kinds must match
# ----------------------------------------------------------------------------------------------

def test_float_topk_idx_is_an_error_naming_the_key(golden, tmp_path, capsys):
    """The reproducer: topk_idx as floats with 0.9 added used to pass after a cast to int64."""
    dump = _dump(golden, tmp_path, ["base"])
    a = load_npz(str(dump / "base.npz"))
    a["inter/topk_idx"] = a["inter/topk_idx"] + 0.9
    save_npz(str(dump / "base.npz"), a)
    code, err = _cli(capsys, "check", golden, dump)
    assert code == 2 and "inter/topk_idx" in err and "float64" in err
    a["inter/topk_idx"] = a["inter/topk_idx"].astype(np.int32)           # same kind, same values: passes
    save_npz(str(dump / "base.npz"), a)
    assert _cli(capsys, "check", golden, dump)[0] == 0
    a["input/valid_mask"] = a["input/valid_mask"].astype(np.int64)       # bool written as integers
    save_npz(str(dump / "base.npz"), a)
    code, err = _cli(capsys, "check", golden, dump)
    assert code == 2 and "input/valid_mask" in err and "bool" in err


def test_integers_are_compared_in_their_dtype():
    big = np.array([2 ** 53, 7], dtype=np.int64)
    r = compare_tensor("c", "inter/topk_idx", big + np.array([1, 0]), big, 1e-10, 1e-13)
    assert not r.ok and r.mismatches[0][0] == (0,)                  # equal after a cast to float64
    assert compare_tensor("c", "k", np.array([True]), np.array([True]), 0, 0).ok
    with pytest.raises(GoldenFormatError, match="expected a signed integer array"):
        compare_tensor("c", "k", np.array([1.0]), np.array([1]), 0, 0)
    with pytest.raises(GoldenFormatError, match="expected a floating array"):
        compare_tensor("c", "k", np.array([1]), np.array([1.0]), 0, 0)


# ----------------------------------------------------------------------------------------------
# .npy headers before data: decompression bombs, odd members
# ----------------------------------------------------------------------------------------------

def _npy_header(shape, dtype="<f8"):
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _peak_mib(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2 ** 20
    finally:
        tracemalloc.stop()


def _dump_with_zeros_in_y(golden, tmp_path, head: bytes):
    """A dump of case base whose member inter/y is ``head`` followed by 64 MiB of zeros (deflated to ~64 KiB);
    every other member as in the golden case. Returns the dump folder."""
    dump = tmp_path / "dump"
    dump.mkdir()
    with zipfile.ZipFile(dump / "base.npz", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for k, v in load_npz(str(golden / "base.npz")).items():
            with zf.open(k + ".npy", "w", force_zip64=True) as f:
                if k != "inter/y":
                    np.lib.format.write_array(f, v)
                    continue
                f.write(head)
                for _ in range(64):
                    f.write(bytes(1 << 20))
    return dump


def test_a_bomb_with_a_wrong_shape_fails_from_its_header(golden, tmp_path):
    """Header shape (2**23,) float64 (64 MiB of deflated zeros): a failing row, without decompressing."""
    dump = _dump_with_zeros_in_y(golden, tmp_path, _npy_header((2 ** 23,)))
    assert os.path.getsize(dump / "base.npz") < 2 ** 20
    reports = []
    assert _peak_mib(lambda: reports.append(check_dump(str(golden), str(dump), cases=["base"]))) < 8
    (bad,) = reports[0].failures
    assert bad.key == "inter/y" and "shape (8388608,), expected (8, 6)" in bad.note


def test_a_member_declaring_more_bytes_than_its_shape_needs_is_refused(golden, tmp_path, capsys):
    """Right header (8, 6) float64, but 64 MiB of uncompressed size declared: refused before reading."""
    y = io.BytesIO()
    np.lib.format.write_array(y, load_npz(str(golden / "base.npz"))["inter/y"])
    dump = _dump_with_zeros_in_y(golden, tmp_path, y.getvalue())
    errors = []

    def run():
        try:
            check_dump(str(golden), str(dump), cases=["base"])
        except GoldenFormatError as exc:
            errors.append(str(exc))

    assert _peak_mib(run) < 8
    assert errors and "inter/y" in errors[0] and "declares" in errors[0]
    code, err = _cli(capsys, "check", golden, dump, "--case", "base")
    assert code == 2 and "refusing to decompress" in err


@pytest.mark.parametrize("spoil", ["pickle", "not_npy", "bad_header", "structured", "truncated", "not_zip"])
def test_odd_dump_members_are_refused(golden, tmp_path, capsys, spoil):
    dump = tmp_path / "dump"
    dump.mkdir()
    arrays = load_npz(str(golden / "base.npz"))
    path = dump / "base.npz"
    if spoil == "not_zip":
        path.write_bytes(b"PK\x03\x04 not really")
    else:
        with zipfile.ZipFile(path, "w") as zf:
            for k, v in arrays.items():
                if k == "inter/y" and spoil == "truncated":
                    zf.writestr(k + ".npy", _npy_header((8, 6)) + bytes(100))
                    continue
                with zf.open(k + ".npy", "w") as f:
                    np.lib.format.write_array(f, v)
            if spoil == "pickle":
                with zf.open("evil.npy", "w") as f:
                    np.lib.format.write_array(f, np.array([object()], dtype=object), allow_pickle=True)
            if spoil == "not_npy":
                zf.writestr("evil.txt", b"hello")
            if spoil == "bad_header":
                zf.writestr("evil.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': <f8}  \n")
            if spoil == "structured":
                with zf.open("evil.npy", "w") as f:
                    np.lib.format.write_array(f, np.zeros(2, dtype=[("a", "<f8")]))
    code, err = _cli(capsys, "check", golden, dump)
    assert code == 2, err


def test_a_fixture_whose_headers_disagree_with_the_manifest_is_refused(golden):
    m = _manifest(golden)
    m["cases"]["base"]["keys"]["inter/y"]["shape"] = [2 ** 20, 6]        # the manifest asks for 48 MiB
    _set_manifest(golden, m)
    with pytest.raises(GoldenFormatError, match=r"inter/y has shape \(8, 6\), expected \(1048576, 6\)"):
        load_case(str(golden), "base")
    m["cases"]["base"]["keys"]["inter/y"]["shape"] = [2 ** 30, 6]        # 48 GiB: refused from the manifest
    with pytest.raises(GoldenFormatError, match="declare .* bytes of arrays"):
        load_case(str(golden), "base", m)


# ----------------------------------------------------------------------------------------------
# unwritable paths
# ----------------------------------------------------------------------------------------------

def test_write_to_an_unwritable_path_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = _cli(capsys, "write", tmp_path / "file" / "sub", "--case", "base")
    assert code == 2 and "file" in err
    code, err = _cli(capsys, "write", tmp_path / "file", "--case", "base")
    assert code == 2 and "not a directory" in err
    assert (tmp_path / "file").read_text() == "x"
    code, err = _cli(capsys, "check", tmp_path / "file", tmp_path)
    assert code == 2


# ----------------------------------------------------------------------------------------------
# the PyTorch example chooses its own paths
# ----------------------------------------------------------------------------------------------

def test_torch_example_writes_case_npz_in_its_dump_dir_only(golden, tmp_path):
    pytest.importorskip("torch")
    import importlib.util
    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "torch_reference.py")
    spec = importlib.util.spec_from_file_location("torch_reference_tamper", example)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    m = _manifest(golden)
    m["cases"]["base"]["file"] = "../planted.npz"
    _set_manifest(golden, m)
    dump = tmp_path / "dump"
    assert module.run(str(golden), str(dump), ["base"]) == ["base"]
    assert os.listdir(dump) == ["base.npz"] and not (tmp_path / "planted.npz").exists()
    m["cases"]["../x"] = m["cases"]["base"]
    _set_manifest(golden, m)
    with pytest.raises(ValueError, match="not a plain name"):
        module.run(str(golden), str(dump), ["../x"])
    os.remove(dump / "base.npz")
    os.symlink(tmp_path / "elsewhere.npz", dump / "base.npz")
    with pytest.raises(ValueError, match="symlink"):
        module.run(str(golden), str(dump), ["base"])
    assert not (tmp_path / "elsewhere.npz").exists()


# ----------------------------------------------------------------------------------------------
# bad arguments: one line, exit 2
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["check", "d"], ["nope"], ["check", "a", "b", "--rtol"], ["write"],
                                  ["check", "--bogus", "a", "b"], ["list", "x"], []])
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv):
    try:
        code = main(["golden", *argv])
    except SystemExit as exc:                         # argparse's errors, raised by the golden parsers
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("refmoe golden: error: "), err
