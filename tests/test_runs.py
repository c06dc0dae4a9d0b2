"""Run folders say what they hold: a fresh run never mixes with another run's files, resume and
sweeps recognise only their own run, a crashed run is never complete, and no checkpoint ever
comes from a non-finite step."""
import json
import shutil

import pytest
import torch

from dpo_lib.core import runs
from dpo_lib.core.config import load_config
from dpo_lib.core.errors import RunFolderError
from dpo_lib.core.layouts import SequenceLayout
from dpo_lib.training import checkpoints, sweep
from dpo_lib.training import train as train_lib
from dpo_lib.training.step import NonFiniteStepError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))


def tiny(tmp_path, name="run", **overrides):
    base = {"output_dir": str(tmp_path / name), "eval_every": 0, "save_every": 0,
            "train_limit": 16, "test_limit": 8, "sft_steps": 2, "preference_steps": 2}
    return load_config("tiny", overrides={**base, **overrides})


def test_a_fresh_run_into_another_runs_folder_is_refused_naming_both_ways_out(tmp_path):
    cfg = tiny(tmp_path, save_every=1)
    train_lib.train(cfg, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()}
    with pytest.raises(RunFolderError) as info:
        train_lib.train(cfg, progress=False)
    message = str(info.value)
    assert "resume=true" in message and "overwrite=true" in message and "complete" in message
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").iterdir()} == before


def test_overwrite_deletes_the_old_runs_files_first(tmp_path):
    first = tiny(tmp_path, sft_steps=4, save_every=2)
    train_lib.train(first, progress=False)
    old_id = runs.read_run_record(tmp_path / "run")["run_id"]
    (tmp_path / "run" / "notes.txt").write_text("mine")           # not a run's file: kept
    second = tiny(tmp_path, sft_steps=2, save_every=0, overwrite=True)
    train_lib.train(second, progress=False)
    folder = tmp_path / "run"
    record = runs.read_run_record(folder)
    assert record["run_id"] != old_id and record["status"] == "complete"
    assert not list(folder.glob("checkpoint-*"))                  # the old run's checkpoints went
    assert [m["step"] for m in runs.read_metrics(folder)] == [1, 2]
    assert (folder / "notes.txt").read_text() == "mine"


def test_resume_continues_only_from_its_own_runs_checkpoints(tmp_path):
    """A checkpoint another run left (a higher step) is not this run's: resume ignores it."""
    cfg = tiny(tmp_path, sft_steps=4, save_every=2)
    train_lib.train(cfg, progress=False)
    folder = tmp_path / "run"
    stranger = folder / "checkpoint-8"
    shutil.copytree(folder / "checkpoint-4", stranger)
    state = json.loads((stranger / "trainer_state.json").read_text())
    (stranger / "trainer_state.json").write_text(json.dumps({**state, "step": 8,
                                                             "run_id": "another"}))
    run_id = runs.read_run_record(folder)["run_id"]
    assert checkpoints.latest_checkpoint(folder, run_id).name == "checkpoint-4"
    assert checkpoints.latest_checkpoint(folder).name == "checkpoint-8"   # by number alone
    shutil.rmtree(folder / "checkpoint-4")
    shutil.rmtree(folder / "adapter")
    resumed = train_lib.train(cfg.with_overrides({"train.resume": True}), progress=False)
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3, 4]
    assert json.loads((folder / "run_time.json").read_text())["resumed_from_step"] == 2
    assert runs.read_run_record(folder)["run_id"] == run_id


def test_a_crashed_run_is_never_complete(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, stage="preference")
    assert runs.is_complete(tmp_path / "run") is False
    done = train_lib.train(cfg, progress=False)
    assert runs.is_complete(done.output_dir, cfg)
    assert not runs.is_complete(done.output_dir, cfg.with_overrides({"train.beta": 0.2}))
    # a rerun that dies after its first step: the old adapter is gone, status stays running
    from dpo_lib.core.layouts import PlainLayout

    calls = []
    real = PlainLayout.logps

    def dies(self, model, batch):
        calls.append(torch.is_grad_enabled())
        if calls.count(True) == 2:
            raise KeyboardInterrupt("killed")
        return real(self, model, batch)
    monkeypatch.setattr(PlainLayout, "logps", dies)
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(cfg.with_overrides({"train.overwrite": True}), progress=False)
    monkeypatch.setattr(PlainLayout, "logps", real)
    assert runs.read_run_record(tmp_path / "run")["status"] == "running"
    assert not runs.is_complete(tmp_path / "run", cfg)
    assert not (tmp_path / "run" / "adapter").exists()         # the old run's adapter went first


def test_a_sweep_reruns_a_crashed_run_and_skips_a_complete_one(tmp_path, monkeypatch):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("runs:\n  a: {beta: 0.1}\n")
    monkeypatch.setattr(sweep, "RUNS_DIR", tmp_path / "runs")
    cfg = tiny(tmp_path, stage="preference")
    trained = []
    original = train_lib.train

    def counting(run_cfg, **kwargs):
        trained.append(run_cfg.train.output_dir)
        return original(run_cfg, **kwargs)
    monkeypatch.setattr(train_lib, "train", counting)
    folders = sweep.run_sweep(sweep_file, cfg, progress=False)
    assert len(trained) == 1 and runs.is_complete(folders["a"])
    sweep.run_sweep(sweep_file, cfg, progress=False)
    assert len(trained) == 1                                     # complete: not run again
    record = runs.read_run_record(folders["a"])
    (folders["a"] / "run.json").write_text(json.dumps({**record, "status": "running"}))
    sweep.run_sweep(sweep_file, cfg, progress=False)             # crashed: run again
    assert len(trained) == 2 and runs.is_complete(folders["a"])


def test_finite_loss_with_nan_gradients_stops_before_the_optimizer_step(tmp_path, monkeypatch):
    """A NaN gradient with a finite loss: the error comes before the optimizer step, names the
    last checkpoint, and nothing after it is stepped, logged or saved."""
    original = SequenceLayout.nll
    calls = {"n": 0}

    def nan_gradient(self, model, batch):
        calls["n"] += 1
        nll, counts = original(self, model, batch)
        if calls["n"] == 3:                       # the third step: a finite loss ...
            nll.register_hook(lambda grad: grad * float("nan"))    # ... whose gradient is NaN
        return nll, counts

    monkeypatch.setattr(SequenceLayout, "nll", nan_gradient)
    cfg = tiny(tmp_path, sft_steps=6, save_every=1)
    with pytest.raises(NonFiniteStepError, match="gradient norm at step 3.*checkpoint-2"):
        train_lib.train(cfg, progress=False)
    folder = tmp_path / "run"
    # step 3 was never taken, so no checkpoint-3 holds its NaN weights
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    records = runs.read_metrics(folder)
    assert [m["step"] for m in records] == [1, 2]
    assert all(m["grad_norm"] is not None for m in records)
    assert runs.read_run_record(folder)["status"] == "running"


def test_metrics_jsonl_never_holds_nan(tmp_path):
    """A non-finite float is written as null; every line stays valid JSON for strict readers."""
    from accelerate import Accelerator

    log = checkpoints.MetricsLog(tmp_path / "metrics.jsonl", Accelerator(cpu=True),
                                 tiny(tmp_path), None)
    log.write({"step": 1, "grad_norm": float("nan"), "loss": 0.5, "x": float("inf")})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == \
        {"step": 1, "grad_norm": None, "loss": 0.5, "x": None}
