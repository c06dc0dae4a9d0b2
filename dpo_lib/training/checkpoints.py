"""A run's folder while it trains: claiming it, checkpoints, resumption, ``metrics.jsonl``.

:func:`claim_run_folder` decides, before anything loads, whether the run may write into its
``output_dir`` (:mod:`dpo_lib.core.runs`: a fresh run never mixes with another run's files) and
which checkpoint a ``resume=true`` run continues from: only one its own run wrote.
``checkpoint-<step>/`` holds the adapter, and through accelerate's ``save_state`` the optimizer,
scheduler, fp16 GradScaler and every process's RNG; the config and the data position
(``trainer_state.json``, with the run id).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..core.config import Config, load_config
from ..core.errors import ConfigError, MissingFileError, MissingPackageError, UserError
from ..core.runs import (check_fresh_start, mark_running, output_dir, read_run_record,
                         resume_run_record, start_run_record)


@dataclass
class RunFolder:
    """The folder a run writes into, its id, and the checkpoint it resumes from (or None)."""
    path: Path
    run_id: str
    record: dict
    resume_from: Path | None


def claim_run_folder(cfg: Config, accelerator) -> RunFolder:
    """Check and claim the run's ``output_dir`` on every process, before the model loads.

    A fresh run: refused where the folder holds another run's files, unless
    ``train.overwrite`` (those files are deleted first); a new ``run.json`` and ``config.yaml``.
    ``train.resume``: the folder's own run, from its newest checkpoint of that run id, with the
    same config in every key that changes the computation (:func:`resume_checkpoint`).
    """
    folder = output_dir(cfg)
    if cfg.train.resume and cfg.train.overwrite:
        raise ConfigError("train.resume and train.overwrite cannot both be true: continue the "
                          "run in output_dir, or delete it and start afresh")
    if cfg.train.resume:
        record = resume_run_record(folder)
        checkpoint = resume_checkpoint(cfg, folder, record["run_id"])
    else:
        stale = check_fresh_start(cfg, folder)      # every process checks before anyone writes
        checkpoint = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if cfg.train.resume:
            mark_running(folder, record)
        else:
            start_run_record(folder, stale, cfg)
        cfg.save(folder / "config.yaml")
    accelerator.wait_for_everyone()
    record = read_run_record(folder)
    return RunFolder(folder, record["run_id"], record, checkpoint)


def save_checkpoint(run: RunFolder, model, step: int, accelerator, cfg: Config) -> Path:
    """``checkpoint-<step>/``: accelerate's ``save_state`` (optimizer, the registered scheduler,
    the fp16 GradScaler, every process's own RNG states), the LoRA adapter
    (``adapter_model.safetensors``, what :mod:`dpo_lib.deploy.export` and the notebooks read), the
    run's config and ``trainer_state.json`` (the optimizer steps done = the data position, and
    the run id). Written into a hidden folder, renamed when complete. Every process calls it."""
    folder = run.path
    target, partial = folder / f"checkpoint-{step}", folder / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))      # the base model's weights are left out (see train)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(partial)
        cfg.save(partial / "config.yaml")
        (partial / "trainer_state.json").write_text(
            json.dumps({"step": step, "run_id": run.run_id}) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
    accelerator.wait_for_everyone()
    return target


def checkpoint_run_id(checkpoint: Path) -> str | None:
    state = checkpoint / "trainer_state.json"
    return json.loads(state.read_text()).get("run_id") if state.is_file() else None


def latest_checkpoint(folder: Path, run_id: str | None = None) -> Path | None:
    """The newest complete ``checkpoint-<step>`` in ``folder``; with ``run_id``, the newest that
    run wrote (checkpoints of any other run are not its own)."""
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[1].isdigit()),
                   key=lambda p: int(p.name.split("-")[1]))
    if run_id is not None:
        found = [p for p in found if checkpoint_run_id(p) == run_id]
    return found[-1] if found else None


def load_checkpoint(checkpoint: Path, model, accelerator) -> int:
    """Restore what :func:`save_checkpoint` wrote (every process its own RNG); returns the step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(checkpoint / "adapter_model.safetensors")
    set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
    accelerator.load_state(str(checkpoint))
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["step"])


#: Keys a resumed run may change without changing what it computes.
RESUME_MAY_DIFFER = ("train.resume", "train.overwrite", "train.output_dir", "train.eval_every",
                     "train.save_every", "train.wandb", "train.wandb_project")


def resume_checkpoint(cfg: Config, folder: Path, run_id: str) -> Path:
    """The checkpoint a ``train.resume=true`` run continues from, or a clear error.

    No checkpoint of the folder's run ``run_id`` is an error (starting afresh would replace its
    metrics.jsonl); so is a checkpoint whose saved config differs from ``cfg`` in a key that
    changes the computation: anything but :data:`RESUME_MAY_DIFFER` and the other stage's step
    count. Total steps count: they shape the learning-rate schedule (train longer from
    ``init_adapter`` instead).
    """
    checkpoint = latest_checkpoint(folder, run_id)
    if checkpoint is None:
        raise MissingFileError(
            f"train.resume=true, but {folder} has no checkpoint-* folder of its run {run_id} to "
            f"continue from (a run writes one every save_every steps). Set overwrite=true to "
            f"start afresh there (that replaces its files), or point output_dir at the run to "
            f"continue.")
    saved = _leaves(load_config(str(checkpoint / "config.yaml")).to_dict())
    now = _leaves(cfg.to_dict())
    other_steps = "train.preference_steps" if cfg.train.stage == "sft" else "train.sft_steps"
    differ = sorted(key for key in saved.keys() | now.keys()
                    if saved.get(key) != now.get(key) and key not in RESUME_MAY_DIFFER
                    and key != other_steps)
    if differ:
        changes = ", ".join(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in differ)
        raise ConfigError(f"cannot resume from {checkpoint}: the config differs in keys that "
                          f"change the computation ({changes}). Resume with the checkpoint's "
                          f"values, or start a new run (init_adapter={checkpoint} to start from "
                          f"its adapter).")
    return checkpoint


def _leaves(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def finite_or_none(value):
    """JSON has no NaN or inf: a non-finite float is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only), and to wandb.
    Non-finite floats are written as ``null``: every line is valid JSON for any reader."""

    def __init__(self, path: Path, accelerator, cfg: Config, resume_step: int | None):
        self.path, self.active = path, accelerator.is_main_process
        self.wandb = None
        if not self.active:
            return
        if resume_step is None:
            path.write_text("")
        else:  # drop what was logged after the checkpoint we resume from
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step] if path.exists() else []
            path.write_text("".join(line + "\n" for line in kept))
        mode = cfg.train.wandb
        if mode != "disabled":
            try:
                import wandb
            except ImportError as error:
                raise MissingPackageError("wandb logging is on but wandb is not installed: "
                                          "pip install wandb, or set wandb=disabled") from error
            if mode == "online" and not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
                raise UserError("wandb=online needs a logged-in wandb (WANDB_API_KEY or "
                                "`wandb login`); use wandb=offline to log locally")
            self.wandb = wandb.init(project=cfg.train.wandb_project, name=path.parent.name,
                                    dir=str(path.parent), mode=mode, config=cfg.to_dict(),
                                    resume="allow", reinit="finish_previous")

    def write(self, record: dict) -> None:
        if not self.active:
            return
        record = {key: finite_or_none(value) for key, value in record.items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and v is not None},
                           step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
