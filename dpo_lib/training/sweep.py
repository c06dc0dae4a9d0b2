"""Run a sweep of preference-training variants and collect their logs.

A sweep file (``configs/sweeps/*.yaml``) names runs, each a set of overrides on the profile with
``train.stage=preference`` (after the file's optional ``common:`` overrides, shared by all runs);
``init_adapter: sft`` stands for the profile's SFT run (``runs/<profile>-sft``). Runs already
complete with the same config (:func:`dpo_lib.core.runs.is_complete`) are not run again; any other
files in a run's folder (a crashed run, another config) are replaced. All runs from one SFT model
share its cached reference pass::

    dpo-sweep configs/sweeps/reward_curves.yaml --profile cpu \\
        --out data/example-runs/cpu

``--out`` copies each run's logs (:data:`RUN_FILES`, a few kB) to ``OUT/<name>/``:
that is how the example logs that notebook 07 reads in the ``cpu`` profile were made.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import yaml

from ..core.cli import command, parse_run_arguments
from ..core.config import RUNS_DIR, Config, load_config
from ..core.errors import ConfigError
from ..core.runs import is_complete

#: What ``--out`` copies of a run folder (a few kB): its config, logs, timings, filtered pairs.
RUN_FILES = ("metrics.jsonl", "config.yaml", "reference_pass.json", "run_time.json",
             "pair_filter.json")


#: Override keys whose relative paths a sweep file gives from its own folder.
FILE_KEYS = ("pair_filter_file", "data.pair_filter_file")


def load_sweep(path) -> dict[str, dict]:
    """Run name -> overrides (the file's ``common`` ones first), from a sweep file. A relative
    ``pair_filter_file`` is read from the sweep file's folder (made absolute here)."""
    content = yaml.safe_load(Path(path).read_text()) or {}
    runs, common = content.get("runs"), content.get("common") or {}
    if not isinstance(runs, dict) or not runs:
        raise ConfigError(f"{path}: expected a mapping 'runs: {{name: {{key: value}}}}'")
    if not isinstance(common, dict):
        raise ConfigError(f"{path}: 'common' must be a mapping of overrides")
    sweeps = {name: {**common, **(overrides or {})} for name, overrides in runs.items()}
    for overrides in sweeps.values():
        for key in FILE_KEYS:
            if isinstance(overrides.get(key), str) and not Path(overrides[key]).is_absolute():
                overrides[key] = str((Path(path).parent / overrides[key]).resolve())
    return sweeps


def config_of_run(cfg: Config, name: str, overrides: dict) -> Config:
    """The config of the sweep's run ``name``: ``cfg`` with the run's overrides."""
    overrides = dict(overrides)
    if overrides.get("init_adapter") == "sft":
        overrides["init_adapter"] = str(RUNS_DIR / f"{cfg.profile}-sft")
    return cfg.with_overrides({"train.stage": "preference", **overrides,
                               "train.output_dir": str(RUNS_DIR /
                                                       f"{cfg.profile}-sweep-{name}")})


def select_runs(runs: dict, only=None) -> dict:
    """The runs named in ``only`` (all when it is ``None``), in the sweep file's order; a name
    the sweep does not have is refused."""
    if only is None:
        return runs
    unknown = [name for name in only if name not in runs]
    if unknown:
        raise ConfigError(f"no run {', '.join(unknown)} in the sweep (it has {', '.join(runs)})")
    return {name: overrides for name, overrides in runs.items() if name in only}


def run_sweep(sweep_path, cfg: Config, out_dir=None, progress: bool = True,
              only=None) -> dict[str, Path]:
    """Run every run of the sweep (or of its runs named in ``only``) that is not complete yet;
    return name -> run folder."""
    from .train import train

    folders = {}
    for name, overrides in select_runs(load_sweep(sweep_path), only).items():
        run_cfg = config_of_run(cfg, name, overrides)
        if not is_complete(run_cfg.train.output_dir, run_cfg):
            if progress:
                print(f"sweep run {name}: {overrides}")
            # a folder there holds no complete run of this config: whatever it holds goes
            train(run_cfg.with_overrides({"train.overwrite": True}), progress=progress)
        folders[name] = Path(run_cfg.train.output_dir)
        if out_dir is not None:
            target = Path(out_dir) / name
            target.mkdir(parents=True, exist_ok=True)
            for file in RUN_FILES:
                if (folders[name] / file).is_file():
                    shutil.copy(folders[name] / file, target / file)
    return folders


def store_half_precision(run_dir, target) -> float:
    """A finished run's copy for committing: its logs (:data:`RUN_FILES`) and its adapter, every
    float32 tensor stored as float16 (half the bytes: 9.8 -> 4.9 MB for a rank-8 adapter of
    SmolLM2-135M). The copy is a run folder that ``dpo-compare`` reads like the original, so a
    comparison made from the copy is reproduced exactly from the committed files.

    Returns the largest change of any value relative to the largest magnitude in its tensor;
    raises ``ValueError`` where a value would overflow float16.
    """
    import torch
    from safetensors.torch import load_file, save_file

    source, target = Path(run_dir), Path(target)
    weights = load_file(source / "adapter" / "adapter_model.safetensors")
    half, worst = {}, 0.0
    for name, tensor in weights.items():             # everything checked before anything is written
        if tensor.dtype != torch.float32:
            half[name] = tensor
            continue
        if tensor.abs().max() > torch.finfo(torch.float16).max:
            raise ValueError(f"{source}: {name} holds values beyond float16's range")
        half[name] = tensor.to(torch.float16)
        scale = tensor.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
        worst = max(worst, ((half[name].float() - tensor).abs().max() / scale).item())
    (target / "adapter").mkdir(parents=True, exist_ok=True)
    for file in RUN_FILES:
        if (source / file).is_file():
            shutil.copy(source / file, target / file)
    shutil.copy(source / "adapter" / "adapter_config.json", target / "adapter")
    save_file(half, target / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    return worst


@command("dpo-sweep")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-sweep", description=__doc__)
    parser.add_argument("sweep")
    parser.add_argument("--profile", default=None, help="profile (default: $DPO_PROFILE/auto)")
    parser.add_argument("--out", default=None, help="copy each run's logs to OUT/<name>/")
    parser.add_argument("--only", default=None,
                        help="comma-separated run names: train (and copy) only these")
    args = parse_run_arguments(parser, argv)
    cfg = load_config(args.profile, overrides=args.overrides)
    only = None if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    for name, folder in run_sweep(args.sweep, cfg, args.out, not args.no_progress,
                                  only).items():
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
