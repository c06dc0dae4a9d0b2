"""A run's folder: what a run writes, how it says which run wrote it, and how it is read back.

A run writes everything into its ``output_dir``:

* ``run.json``: the run's id (a fresh one for every run started afresh, kept by a resumed run),
  ``status`` (``running``, then ``complete`` once its adapter is saved) and its times;
* ``config.yaml`` (what produced it), ``metrics.jsonl`` (one JSON object per optimizer step and
  per evaluation), ``checkpoint-<step>/`` (written by :mod:`dpo_lib.training.checkpoints`, each
  naming the run id), ``adapter/`` (the final adapter), and a few timings (``run_time.json``,
  ``reference_pass.json``, ``pair_filter.json``).

A folder holding another run's files is never silently reused: a fresh run there is refused
unless ``train.overwrite`` (which deletes that run's files first) or ``train.resume`` (which
continues the run that is there, from its own newest checkpoint). A run whose process died keeps
``status: running`` and is never taken for complete (:func:`is_complete`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .config import RUNS_DIR, Config, load_config
from .errors import MissingFileError, RunFolderError

RUN_RECORD = "run.json"
#: Everything a run writes into its folder (checkpoints and their partial copies by pattern).
RUN_ARTEFACTS = ("run.json", "config.yaml", "metrics.jsonl", "run_time.json",
                 "reference_pass.json", "reference_train.key", "reference_eval.key",
                 "pair_filter.json", "adapter", "wandb")
CHECKPOINT_PATTERNS = ("checkpoint-*", ".checkpoint-*.partial")


def run_name(cfg: Config) -> str:
    stage = cfg.train.stage
    return f"{cfg.profile}-{stage}" + (f"-{cfg.train.loss_type}" if stage == "preference" else "")


def output_dir(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) if cfg.train.output_dir else RUNS_DIR / run_name(cfg)


@dataclass
class RunResult:
    output_dir: Path
    metrics: list[dict]
    model: object = None
    tokenizer: object = None


# --------------------------------------------------------------------------------------------
# Which run a folder holds
# --------------------------------------------------------------------------------------------

def run_artefacts(folder: Path) -> list[Path]:
    """The files and folders in ``folder`` that a run wrote (see :data:`RUN_ARTEFACTS`)."""
    found = [folder / name for name in RUN_ARTEFACTS if (folder / name).exists()]
    for pattern in CHECKPOINT_PATTERNS:
        found += sorted(folder.glob(pattern))
    return found


def read_run_record(folder: Path) -> dict | None:
    """The folder's ``run.json`` (run id, status, times), or None where there is none."""
    path = Path(folder) / RUN_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def check_fresh_start(cfg: Config, folder: Path) -> list[Path]:
    """For a run started afresh (not ``resume``): the other run's files to delete first, which
    are none unless ``train.overwrite``; a folder holding another run's files without
    ``overwrite`` is a :class:`~dpo_lib.core.errors.RunFolderError` that names both ways out."""
    found = run_artefacts(folder)
    if found and not cfg.train.overwrite:
        record = read_run_record(folder) or {}
        what = (f"run {record['run_id']} ({record.get('status', '?')}, started "
                f"{record.get('started', '?')})" if record else "files of an earlier run")
        names = ", ".join(sorted(p.name for p in found)[:6]) + (", ..." if len(found) > 6 else "")
        raise RunFolderError(
            f"{folder} already holds {what}: {names}. Set resume=true to continue that run, "
            f"overwrite=true to delete its files and start afresh, or choose another output_dir.")
    return found


def start_run_record(folder: Path, stale: list[Path], cfg: Config) -> dict:
    """Delete ``stale`` (another run's files, see :func:`check_fresh_start`) and write a new
    ``run.json`` with a fresh run id, status ``running``. Main process only."""
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    record = {"run_id": uuid.uuid4().hex[:12], "status": "running", "stage": cfg.train.stage,
              "started": _now(), "finished": None}
    _write_record(folder, record)
    return record


def resume_run_record(folder: Path) -> dict:
    """The ``run.json`` of the run a ``resume=true`` run continues, back to ``running``."""
    record = read_run_record(folder)
    if record is None:
        raise MissingFileError(
            f"train.resume=true, but {folder} holds no run.json saying which run its files "
            f"belong to (no run, or one written by an older dpo_lib). Start afresh there with "
            f"overwrite=true, or point output_dir at the run to continue.")
    return record


def mark_running(folder: Path, record: dict) -> None:
    _write_record(folder, {**record, "status": "running", "finished": None})


def mark_complete(folder: Path, record: dict) -> None:
    """The run finished: its adapter is saved (main process only)."""
    _write_record(folder, {**record, "status": "complete", "finished": _now()})


def is_complete(folder: Path, cfg: Config | None = None) -> bool:
    """Whether ``folder`` holds a run that finished (``run.json`` says ``complete``, its adapter
    is there) and, with ``cfg``, was made by exactly that config."""
    folder = Path(folder)
    record = read_run_record(folder)
    if not record or record.get("status") != "complete":
        return False
    if not (folder / "adapter" / "adapter_config.json").is_file():
        return False
    if cfg is None:
        return True
    saved = folder / "config.yaml"
    return saved.is_file() and _computing(load_config(str(saved))) == _computing(cfg)


def _computing(cfg: Config) -> dict:
    """A config without the keys that say how a run was started, not what it computes."""
    data = cfg.to_dict()
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("resume", "overwrite")}
    return data


def _write_record(folder: Path, record: dict) -> None:
    path = folder / RUN_RECORD
    partial = path.with_name(f".{RUN_RECORD}.partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------------------------
# Reading a run back
# --------------------------------------------------------------------------------------------

def read_metrics(run_dir) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run_config(run_dir: str | os.PathLike) -> Config:
    """The config saved in a training run's folder, or a clear error."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise MissingFileError(f"{run_dir} is not a training run: it has no config.yaml "
                               f"(runs are made by `dpo-train`)")
    return load_config(str(path))


def run_adapter(run_dir: str | os.PathLike) -> Path:
    """The final LoRA adapter of a run (``RUN_DIR/adapter``), or a clear error."""
    adapter = Path(run_dir) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise MissingFileError(
            f"no adapter in {run_dir}: expected {adapter}/adapter_config.json, which a run writes "
            f"when it finishes (an unfinished run has only checkpoint-* folders).")
    return adapter


def reference_run(run_dir: str | os.PathLike) -> Path | None:
    """The SFT run a preference run started from (its reference model), or None."""
    init = load_run_config(run_dir).train.init_adapter
    return Path(init) if init else None
