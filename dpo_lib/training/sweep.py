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


def load_sweep(path) -> dict[str, dict]:
    """Run name -> overrides (the file's ``common`` ones first), from a sweep file."""
    content = yaml.safe_load(Path(path).read_text()) or {}
    runs, common = content.get("runs"), content.get("common") or {}
    if not isinstance(runs, dict) or not runs:
        raise ConfigError(f"{path}: expected a mapping 'runs: {{name: {{key: value}}}}'")
    if not isinstance(common, dict):
        raise ConfigError(f"{path}: 'common' must be a mapping of overrides")
    return {name: {**common, **(overrides or {})} for name, overrides in runs.items()}


def config_of_run(cfg: Config, name: str, overrides: dict) -> Config:
    """The config of the sweep's run ``name``: ``cfg`` with the run's overrides."""
    overrides = dict(overrides)
    if overrides.get("init_adapter") == "sft":
        overrides["init_adapter"] = str(RUNS_DIR / f"{cfg.profile}-sft")
    return cfg.with_overrides({"train.stage": "preference", **overrides,
                               "train.output_dir": str(RUNS_DIR /
                                                       f"{cfg.profile}-sweep-{name}")})


def run_sweep(sweep_path, cfg: Config, out_dir=None, progress: bool = True) -> dict[str, Path]:
    """Run every run of the sweep that is not complete yet; return name -> run folder."""
    from .train import train

    folders = {}
    for name, overrides in load_sweep(sweep_path).items():
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


@command("dpo-sweep")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-sweep", description=__doc__)
    parser.add_argument("sweep")
    parser.add_argument("--profile", default=None, help="profile (default: $DPO_PROFILE/auto)")
    parser.add_argument("--out", default=None, help="copy each run's logs to OUT/<name>/")
    args = parse_run_arguments(parser, argv)
    cfg = load_config(args.profile, overrides=args.overrides)
    for name, folder in run_sweep(args.sweep, cfg, args.out, not args.no_progress).items():
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
