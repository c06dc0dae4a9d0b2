"""Root pytest set-up, for every way the tests start (`pytest`, `make test`, an IDE), over both
``tests/`` and the nbval run over ``notebooks/``.

Tests never write into the committed ``figures/`` or ``notebooks/``:

* before anything imports ``dpo_lib``, ``DPO_FIGURES_DIR`` points to a temporary folder unless the
  caller chose another folder (one inside ``figures/`` or ``notebooks/`` is replaced too);
  notebook kernels started by nbval inherit it;
* ``DPO_PROGRESS=0``: no progress bars in test output (kernels inherit it as well);
* both folders are hashed when the session starts and again when it ends: any file created,
  changed or removed there fails the session, with the file named.
"""
import hashlib
import os
import tempfile
from pathlib import Path

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
