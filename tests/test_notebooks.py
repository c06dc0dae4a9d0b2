"""The committed notebooks: executed in order without errors, and every figure they save exists."""
import json
import re

import pytest

from dpo_lib.core.config import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FIGURE = re.compile(r'FIGURES_DIR\s*/\s*(?:f?)"(\d\d_[\w.-]+\.png)"')


def code_cells(path):
    return [c for c in json.loads(path.read_text())["cells"]
            if c["cell_type"] == "code" and "".join(c["source"]).strip()]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_executed_in_order_without_errors(path):
    cells = code_cells(path)
    counts = [c["execution_count"] for c in cells]
    assert None not in counts and counts == sorted(counts), counts
    errors = [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_promised_figure_is_committed(path):
    sources = "\n".join("".join(c["source"]) for c in code_cells(path))
    promised = set(FIGURE.findall(sources))
    assert all(name.startswith(path.stem[:2]) for name in promised)
    missing = [name for name in promised if not (REPO_ROOT / "figures" / name).is_file()]
    assert not missing


def test_the_profile_is_printed_at_the_top():
    for path in NOTEBOOKS:
        first = code_cells(path)[0]
        assert "describe(cfg)" in "".join(first["source"]), path.name
        printed = "".join("".join(o.get("text", "")) for o in first["outputs"])
        assert "profile: cpu" in printed, f"{path.name} was not executed in the cpu profile"


# What a reader on GitHub (or any static viewer) would see instead of the lesson.
OBJECT_REPR = re.compile(r"<[\w.]+(?: object)? at 0x[0-9a-fA-F]+>|<torch\._C\.Generator")
STYLER = re.compile(r"<pandas\.io\.formats\.style\.Styler")
WIDGET = "application/vnd.jupyter.widget-view+json"


def output_noise(cell_index, output):
    """Why one committed output is noise, or None."""
    text = "".join(output.get("text", "")) if output["output_type"] == "stream" else \
        "".join(output.get("data", {}).get("text/plain", ""))
    if output["output_type"] == "stream" and output.get("name") == "stderr":
        return f"cell {cell_index}: stderr output {text[:120]!r}"
    if WIDGET in output.get("data", {}):
        return f"cell {cell_index}: a widget (progress bar?) {text[:80]!r}"
    if STYLER.search(text):
        return f"cell {cell_index}: a pandas Styler without a text table {text[:80]!r}"
    if OBJECT_REPR.search(text):
        return f"cell {cell_index}: an object repr {OBJECT_REPR.search(text).group(0)!r}"
    return None


def test_output_noise_is_recognised():
    assert output_noise(0, {"output_type": "stream", "name": "stderr", "text": "Warning"})
    assert output_noise(0, {"output_type": "display_data", "data": {
        WIDGET: {"model_id": "x"}, "text/plain": "Loading weights:   0%|"}})
    assert output_noise(0, {"output_type": "execute_result",
                            "data": {"text/plain": "<torch._C.Generator at 0x7f12>"}})
    assert output_noise(0, {"output_type": "execute_result", "data": {
        "text/plain": "<pandas.io.formats.style.Styler at 0x7f00aa>", "text/html": "<table>"}})
    assert output_noise(0, {"output_type": "execute_result", "data": {
        "text/plain": "<Figure size 640x480 with 1 Axes>", "image/png": "..."}}) is None
    assert output_noise(0, {"output_type": "stream", "name": "stdout", "text": "loss 0.69"}) is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_hold_only_the_lesson(path):
    """No widget-only output (tqdm widgets render as `0%` on the web), no stderr (warnings are
    silenced at their source or explained once), no `<... at 0x...>` repr, no Styler fallback."""
    cells = json.loads(path.read_text())["cells"]
    noise = [reason for index, cell in enumerate(cells) if cell["cell_type"] == "code"
             for output in cell["outputs"] if (reason := output_noise(index, output))]
    assert not noise, "\n".join(noise)
