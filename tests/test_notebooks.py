"""The tutorial notebooks run top to bottom on the CPU and are committed without outputs; what they
show is what a reader sees: every cell that draws a figure (calls a ``plot_*`` function) displays an
``image/png`` output, and every cell that builds a widget (``*_explorer(`` / ``*_viewer(``) displays a
widget view. These checks hold for any notebook in the folder, so a new one gets them too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = (
    "01_quickstart.ipynb",
    "02_routing_statistics.ipynb",
    "03_activation_patching.ipynb",
    "04_expert_ablation.ipynb",
    "05_real_21b_gpu.ipynb",
    "06_expert_analyses.ipynb",
    "07_from_transformerlens.ipynb",
)
CELL_TIMEOUT_S = 300
FIGURE_CALL = re.compile(r"\bplot_\w+\(")
WIDGET_CALL = re.compile(r"\b\w+_(explorer|viewer)\(")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def displayed(cell) -> set[str]:
    """MIME types of what a code cell displayed (``display_data`` and ``execute_result`` outputs)."""
    return {mime for o in cell.outputs if o.output_type in ("display_data", "execute_result") for mime in o.data}


def check_displays(name: str, nb) -> None:
    """Every figure cell shows a PNG, every widget cell a widget view."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        shown, head = displayed(cell), cell.source.splitlines()[-1][:70]
        if FIGURE_CALL.search(cell.source):
            assert "image/png" in shown, f"{name}: figure cell shows {sorted(shown)}, no image: {head!r}"
        if WIDGET_CALL.search(cell.source):
            assert WIDGET_MIME in shown, f"{name}: widget cell shows {sorted(shown)}, no widget view: {head!r}"


def test_every_notebook_is_there():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cell"
    for cell in code:
        assert cell.outputs == [], f"{name}: a cell has outputs: {cell.source[:60]!r}"
        assert cell.execution_count is None, f"{name}: a cell has an execution count: {cell.source[:60]!r}"
    assert "widgets" not in nb.metadata, f"{name}: saved widget state in the metadata"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "starts with a title"


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if name == "05_real_21b_gpu.ipynb":
        import torch

        if not torch.cuda.is_available():  # it must say what it needs instead of failing
            text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
            assert "Skipping" in text and "GB" in text
        else:
            check_displays(name, nb)
    else:
        assert any(o.output_type in ("display_data", "execute_result") for o in outputs), "no result shown"
        check_displays(name, nb)
