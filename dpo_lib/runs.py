"""A run's folder: its name, checkpoints, resumption, ``metrics.jsonl`` and saved config.

A run writes everything into its ``output_dir``: ``config.yaml`` (what produced it),
``metrics.jsonl`` (one JSON object per optimizer step and per evaluation), ``checkpoint-<step>/``
(the adapter, and through accelerate's ``save_state`` the optimizer, scheduler, fp16 GradScaler
and every process's RNG; the config and the data position) and ``adapter/`` (the final adapter).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .config import RUNS_DIR, Config, load_config


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


def save_checkpoint(folder: Path, model, optimizer, scheduler, step: int, accelerator,
                    cfg: Config | None = None) -> Path:
    """``checkpoint-<step>/``: accelerate's ``save_state`` (optimizer, the registered scheduler,
    the fp16 GradScaler, every process's own RNG states), the LoRA adapter
    (``adapter_model.safetensors``, what :mod:`dpo_lib.export` and the notebooks read), the run's
    config and ``trainer_state.json`` (the optimizer steps done = the data position). Written into
    a hidden folder, renamed when complete. Every process calls it."""
    import shutil

    target, partial = folder / f"checkpoint-{step}", folder / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))      # the base model's weights are left out (see train)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(partial)
        if cfg is not None:
            cfg.save(partial / "config.yaml")
        (partial / "trainer_state.json").write_text(json.dumps({"step": step}) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
    accelerator.wait_for_everyone()
    return target


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
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
RESUME_MAY_DIFFER = ("train.resume", "train.output_dir", "train.eval_every", "train.save_every",
                     "train.wandb", "train.wandb_project")


def resume_checkpoint(cfg: Config, folder: Path) -> Path | None:
    """The checkpoint a ``train.resume=true`` run continues from, or a clear error.

    No checkpoint in ``folder`` is an error (starting afresh would replace its metrics.jsonl);
    so is a checkpoint whose saved config differs from ``cfg`` in a key that changes the
    computation: anything but :data:`RESUME_MAY_DIFFER` and the other stage's step count. Total
    steps count: they shape the learning-rate schedule (train longer from ``init_adapter`` instead).
    """
    if not cfg.train.resume:
        return None
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise FileNotFoundError(
            f"train.resume=true, but {folder} has no checkpoint-* folder to continue from (a run "
            f"writes one every save_every steps). Set resume=false to start afresh there (that "
            f"replaces its metrics.jsonl), or point output_dir at the run to continue.")
    if not (checkpoint / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{checkpoint} was written by an older dpo_lib (no "
                                f"trainer_state.json); start afresh with resume=false")
    saved = _leaves(load_config(str(checkpoint / "config.yaml")).to_dict())
    now = _leaves(cfg.to_dict())
    other_steps = "train.preference_steps" if cfg.train.stage == "sft" else "train.sft_steps"
    differ = sorted(key for key in saved.keys() | now.keys()
                    if saved.get(key) != now.get(key) and key not in RESUME_MAY_DIFFER
                    and key != other_steps)
    if differ:
        changes = ", ".join(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in differ)
        raise ValueError(f"cannot resume from {checkpoint}: the config differs in keys that change "
                         f"the computation ({changes}). Resume with the checkpoint's values, or "
                         f"start a new run (init_adapter={checkpoint} to start from its adapter).")
    return checkpoint


def _leaves(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only), and to wandb."""

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
        if mode not in ("disabled", "offline", "online"):
            raise ValueError(f"wandb={mode!r}: choose disabled, offline or online")
        if mode != "disabled":
            try:
                import wandb
            except ImportError as error:
                raise ModuleNotFoundError("wandb logging is on but wandb is not installed: "
                                          "pip install wandb, or set wandb=disabled") from error
            if mode == "online" and not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
                raise RuntimeError("wandb=online needs a logged-in wandb (WANDB_API_KEY or "
                                   "`wandb login`); use wandb=offline to log locally")
            self.wandb = wandb.init(project=cfg.train.wandb_project, name=path.parent.name,
                                    dir=str(path.parent), mode=mode, config=cfg.to_dict(),
                                    resume="allow", reinit="finish_previous")

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run_config(run_dir: str | os.PathLike) -> Config:
    """The config saved in a training run's folder, or a clear error."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run: it has no config.yaml "
                                f"(runs are made by `python -m dpo_lib.train`)")
    return load_config(str(path))


def run_adapter(run_dir: str | os.PathLike) -> Path:
    """The final LoRA adapter of a run (``RUN_DIR/adapter``), or a clear error."""
    adapter = Path(run_dir) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"no adapter in {run_dir}: expected {adapter}/adapter_config.json, which a run writes "
            f"when it finishes (an unfinished run has only checkpoint-* folders).")
    return adapter


def reference_run(run_dir: str | os.PathLike) -> Path | None:
    """The SFT run a preference run started from (its reference model), or None."""
    init = load_run_config(run_dir).train.init_adapter
    return Path(init) if init else None
