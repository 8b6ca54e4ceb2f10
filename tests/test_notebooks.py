"""Every notebook in notebooks/ runs headless from top to bottom (each notebook is its own test), its cells that
plot show an image, and it is committed executed with small outputs (a reader on GitHub sees the figures).

The kernel is ``python3``, started with this checkout first on PYTHONPATH (so it imports this refmoe) and with
MPLBACKEND unset, so ipykernel picks matplotlib's inline backend as Jupyter would; the notebooks' own ``assert``
cells check the numbers their prose states. A cell that raises fails the test with the cell's traceback; a cell
running longer than CELL_TIMEOUT seconds fails it too. Skipped, with the reason, where nbclient, nbformat or
ipykernel cannot be imported.
"""
import importlib.util
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 180          # seconds per cell; a whole notebook is meant to run in under a minute on 2 cores
MISSING = [m for m in ("nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(m) is None]
MAX_BYTES = 1_500_000       # a committed, executed notebook stays below this
MAX_TEXT = 20_000           # characters of text output per cell
PLOTS = re.compile(r"\bplt\.|\.subplots\(|display\(figures\.fig_")      # a cell that draws a figure


def _plotting_cells(nb):
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and PLOTS.search(c.source)]


def _has_image(cell) -> bool:
    return any("image/png" in o.get("data", {}) for o in cell.outputs)


@pytest.mark.skipif(bool(MISSING), reason=f"notebook execution needs {', '.join(MISSING)} "
                                          "(pip install refmoe[test])")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}", pytrace=False)
    except nbclient.exceptions.CellTimeoutError as exc:
        pytest.fail(f"{path.name}: a cell ran longer than {CELL_TIMEOUT} s:\n{exc}", pytrace=False)
    blank = [i for i in _plotting_cells(nb) if not _has_image(nb.cells[i])]
    assert not blank, f"{path.name}: cells {blank} draw a figure but show no image"


def test_notebooks_are_committed_executed_with_small_outputs():
    """The committed notebooks were run top to bottom (execution counts 1, 2, ...), without errors, every
    plotting cell holds its image, and the outputs stay small."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to read the notebooks")
    for path in NOTEBOOKS:
        assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes"
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
            f"{path.name}: not executed top to bottom in one run"
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            assert not [o for o in cell.outputs if o.output_type == "error"], f"{path.name}: cell {i} has an error"
            text = sum(len(o.get("text", "")) for o in cell.outputs)
            assert text < MAX_TEXT, f"{path.name}: cell {i} prints {text} characters"
        blank = [i for i in _plotting_cells(nb) if not _has_image(nb.cells[i])]
        assert not blank, f"{path.name}: cells {blank} draw a figure but were committed without its image"
