"""Root pytest set-up, for every way the tests start (`pytest`, `make test`, an IDE), over both
``tests/`` and the nbval run over ``notebooks/``.

Tests never write into the committed ``figures/`` or ``notebooks/``:

* before anything imports ``dpo_lib``, ``DPO_FIGURES_DIR`` points to a temporary folder unless the
  caller chose another folder (one inside ``figures/`` or ``notebooks/`` is replaced too);
  notebook kernels started by nbval inherit it;
* ``DPO_PROGRESS=0``: no progress bars in test output (kernels inherit it as well);
* both folders are hashed when the session starts and again when it ends: any file created,
  changed or removed there fails the session, with the file named;
* nbval skips notebook 08 (GGUF deployment), saying why, where llama-cpp-python cannot be
  imported or the committed example adapter it exports is not in the checkout (the lent GPU
  machine without the deploy wheel: .ci/gpu_wheels.py), instead of failing cell by cell.
"""
import hashlib
import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
GUARDED = ("figures", "notebooks")


def _inside_guarded(folder: str) -> bool:
    path = Path(folder).expanduser().resolve()
    return any(path == ROOT / name or ROOT / name in path.parents for name in GUARDED)


if not os.environ.get("DPO_FIGURES_DIR") or _inside_guarded(os.environ["DPO_FIGURES_DIR"]):
    os.environ["DPO_FIGURES_DIR"] = tempfile.mkdtemp(prefix="dpo-test-figures-")
Path(os.environ["DPO_FIGURES_DIR"]).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("DPO_PROGRESS", "0")


def _snapshot() -> dict[str, str]:
    digests = {}
    for name in GUARDED:
        for path in sorted((ROOT / name).rglob("*")):
            if path.is_file() and ".ipynb_checkpoints" not in path.parts:
                digests[str(path.relative_to(ROOT))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def pytest_sessionstart(session):
    session.config._guarded_before = _snapshot()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_guarded_before", None)
    if before is None:
        return
    after = _snapshot()
    changed = sorted(name for name in before.keys() | after.keys()
                     if before.get(name) != after.get(name))
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = ("the test session changed committed files (tests must write figures to "
                   "DPO_FIGURES_DIR or a temporary folder): " + ", ".join(changed))
        if reporter is not None:
            reporter.write_line("ERROR: " + message, red=True)
        session.exitstatus = 1


DEPLOY_NOTEBOOK = "08_gguf_deployment.ipynb"
EXAMPLE_ADAPTER = ROOT / "data" / "example-runs" / "cpu-hh" / "dpo" / "adapter"


def deploy_notebook_cannot_run() -> str | None:
    """Why notebook 08 cannot run here, or None."""
    import subprocess
    import sys

    # in a process of its own, as the notebook's kernel will (its native libraries stay out of
    # this one): not installed, or its libraries do not load
    check = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True,
                           text=True)
    if check.returncode != 0:
        error = (check.stderr.strip().splitlines() or ["no message"])[-1]
        return (f"notebook 08 needs llama-cpp-python (the deploy extra), which does not import "
                f"here: {error[:200]}")
    if not (EXAMPLE_ADAPTER / "adapter_config.json").is_file():
        return (f"notebook 08 exports the committed example adapter, which is not in this "
                f"checkout: {EXAMPLE_ADAPTER.relative_to(ROOT)}")
    return None


def pytest_collection_modifyitems(config, items):
    cells = [item for item in items
             if Path(str(getattr(item, "path", getattr(item, "fspath", "")))).name == DEPLOY_NOTEBOOK]
    reason = deploy_notebook_cannot_run() if cells else None
    if reason:
        for item in cells:
            item.add_marker(pytest.mark.skip(reason=reason))
