"""The committed notebooks: executed in order without errors, and every figure they save exists."""
import json
import re
from pathlib import Path

import pytest

from dpo_lib.config import REPO_ROOT

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
