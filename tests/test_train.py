"""The trainer in the tiny profile: learning, reference cache, resume, NaN guard, logs, CLI, DDP."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dpo_lib import train as train_lib
from dpo_lib.config import REPO_ROOT, load_config


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))


def tiny(tmp_path, name, **overrides):
    base = {"output_dir": str(tmp_path / name), "eval_every": 0, "save_every": 0,
            "train_limit": 32, "test_limit": 16}
    return load_config("tiny", overrides={**base, **overrides})


def losses(result, key="loss"):
    return [m[key] for m in result.metrics if key in m and "eval/loss" not in m]


@pytest.mark.parametrize("stage, loss_type", [("sft", "dpo"), ("preference", "dpo"),
                                               ("preference", "ipo")])
def test_loss_decreases_on_a_repeated_batch(tmp_path, stage, loss_type):
    cfg = tiny(tmp_path, "run", stage=stage, loss_type=loss_type, train_limit=8,
               sft_steps=12, preference_steps=12, learning_rate=3e-3, warmup_steps=0,
               lr_scheduler="constant")
    result = train_lib.train(cfg, progress=False)
    curve = losses(result)
    assert len(curve) == 12 and all(map(torch.isfinite, torch.tensor(curve)))
    assert curve[-1] < curve[0] - 0.01 * abs(curve[0]), curve


def test_reference_cache_hit_and_invalidation(tmp_path):
    from dpo_lib.models import load_tokenizer

    cfg = tiny(tmp_path, "a", stage="preference")
    tokenizer = load_tokenizer(cfg)
    _, examples, _ = train_lib.load_examples(cfg, tokenizer, "train", 16)
    key = train_lib.reference_cache_key(cfg, examples, None)
    assert key == train_lib.reference_cache_key(cfg, examples, None)
    assert key != train_lib.reference_cache_key(cfg, examples[:-1], None)           # data
    shorter = cfg.with_overrides({"data.max_length": 64, "data.max_prompt_length": 48})
    _, short_examples, _ = train_lib.load_examples(shorter, tokenizer, "train", 16)
    assert key != train_lib.reference_cache_key(shorter, short_examples, None)      # tokenization
    assert key != train_lib.reference_cache_key(                                     # model
        cfg.with_overrides({"model.quantization": "nf4"}), examples, None)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"one")
    with_adapter = train_lib.reference_cache_key(cfg, examples, adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"two")
    assert key != with_adapter != train_lib.reference_cache_key(cfg, examples, adapter)


def test_dpo_and_ipo_share_one_reference_pass(tmp_path, monkeypatch):
    sft = train_lib.train(tiny(tmp_path, "sft", sft_steps=2), progress=False)
    calls = []
    original = train_lib.concatenated_logps

    def counting(model, batch, *args):
        calls.append(torch.is_grad_enabled())
        return original(model, batch, *args)

    monkeypatch.setattr(train_lib, "concatenated_logps", counting)
    for loss_type in ("dpo", "ipo"):
        train_lib.train(tiny(tmp_path, loss_type, stage="preference", loss_type=loss_type,
                             init_adapter=str(sft.output_dir), preference_steps=2),
                        progress=False)
    no_grad_calls = calls.count(False)
    # the first run: 32 train + 16 eval pairs at eval_batch_size 16 = 3 reference batches;
    # the second run finds them cached and makes none
    assert no_grad_calls == 3, calls
    keys = {(tmp_path / name / "reference_train.key").read_text() for name in ("dpo", "ipo")}
    assert len(keys) == 1


def test_preference_run_starts_at_its_reference(tmp_path):
    sft = train_lib.train(tiny(tmp_path, "sft", sft_steps=3), progress=False)
    result = train_lib.train(tiny(tmp_path, "dpo", stage="preference",
                                  init_adapter=str(sft.output_dir), preference_steps=1),
                             progress=False)
    first = result.metrics[0]
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    assert first["loss"] == pytest.approx(0.6931, abs=1e-4)   # -log sigmoid(0)


def test_resume_gives_the_same_metrics(tmp_path):
    cfg = tiny(tmp_path, "run", stage="preference", preference_steps=6, save_every=3,
               eval_every=3, train_limit=24)
    whole = train_lib.train(cfg, progress=False).metrics
    # a crash after step 3: the step-6 checkpoint and adapter never got written
    shutil.rmtree(tmp_path / "run" / "checkpoint-6")
    shutil.rmtree(tmp_path / "run" / "adapter")
    resumed = train_lib.train(cfg.with_overrides({"train.resume": True}), progress=False).metrics
    assert [m["step"] for m in resumed] == [m["step"] for m in whole]
    for a, b in zip(whole, resumed):
        assert a.keys() == b.keys()
        for key in a:
            if key not in ("tokens_per_second", "step_seconds"):   # wall-clock figures
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = train_lib.sft_step_outputs
    calls = {"n": 0}

    def poisoned(model, batch, *args):
        calls["n"] += 1
        nll, counts = original(model, batch, *args)
        return (nll * float("nan") if calls["n"] == 5 else nll), counts

    monkeypatch.setattr(train_lib, "sft_step_outputs", poisoned)
    cfg = tiny(tmp_path, "run", sft_steps=8, save_every=2)
    with pytest.raises(train_lib.NonFiniteLossError, match="step 5.*checkpoint-4"):
        train_lib.train(cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == \
        ["checkpoint-2", "checkpoint-4"]
    assert [m["step"] for m in train_lib.read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


PREFERENCE_KEYS = {"step", "examples", "loss", "rewards/chosen", "rewards/rejected",
                   "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
                   "lr", "grad_norm", "tokens_per_second", "step_seconds", "padding_fraction"}


def test_metrics_file_keys_and_saved_config(tmp_path):
    cfg = tiny(tmp_path, "run", stage="preference", preference_steps=2, eval_every=2)
    result = train_lib.train(cfg, progress=False)
    records = train_lib.read_metrics(result.output_dir)
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval/loss" in r]
    assert len(train_records) == 2 and [r["step"] for r in eval_records] == [0, 2]
    for record in train_records:
        assert PREFERENCE_KEYS <= record.keys()
    for record in eval_records:
        assert {"eval/" + k for k in PREFERENCE_KEYS - {"step", "examples", "lr", "grad_norm",
                                                        "tokens_per_second", "step_seconds",
                                                        "padding_fraction"}} <= record.keys()
    for record in train_records:
        assert 0 <= record["padding_fraction"] < 1
    timing = json.loads((result.output_dir / "reference_pass.json").read_text())
    assert timing["train"]["pairs"] > 0 and timing["train"]["seconds"] > 0
    assert load_config(str(result.output_dir / "config.yaml")).to_dict() == cfg.to_dict()
    assert (result.output_dir / "adapter" / "adapter_config.json").is_file()


def test_missing_sft_adapter_is_a_clear_error(tmp_path):
    cfg = tiny(tmp_path, "run", stage="preference", init_adapter=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="run the SFT stage first"):
        train_lib.train(cfg, progress=False)


def test_cuda_only_settings_fail_clearly_on_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(ValueError, match="needs CUDA"):
        train_lib.make_optimizer(tiny(tmp_path, "x", optimizer="paged_adamw_8bit"),
                                 [torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="needs a GPU"):
        train_lib.make_accelerator(tiny(tmp_path, "x", mixed_precision="fp16"))


def test_wandb_offline_logs_locally(tmp_path):
    pytest.importorskip("wandb")
    cfg = tiny(tmp_path, "run", sft_steps=2, wandb="offline")
    train_lib.train(cfg, progress=False)
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def run_cli(args, tmp_path, **env):
    environment = {**os.environ, "DPO_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run(args, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                          timeout=300)


def test_cli_with_overrides(tmp_path):
    out = tmp_path / "cli"
    done = run_cli([sys.executable, "-m", "dpo_lib.train", "tiny", f"output_dir={out}",
                    "sft_steps=2", "data.max_length=64", "data.max_prompt_length=48",
                    "--no-progress"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"done: {out}" in done.stdout
    saved = load_config(str(out / "config.yaml"))
    assert saved.data.max_length == 64 and saved.train.sft_steps == 2
    assert len([r for r in train_lib.read_metrics(out) if "loss" in r]) == 2
    bad = run_cli([sys.executable, "-m", "dpo_lib.train", "tiny", "sft_stepz=2"], tmp_path)
    assert bad.returncode != 0 and "sft_steps" in bad.stderr


def test_two_processes_equal_one_with_double_accumulation(tmp_path):
    """torchrun, 2 processes on gloo, vs 1 process accumulating 2 micro-batches: same global
    batches, so the same loss curve (tolerance 1e-5; observed identical on CPU)."""
    common = ["tiny", "stage=preference", "preference_steps=3", "eval_every=0", "save_every=0",
              "train_limit=48", "--no-progress"]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    two = run_cli([torchrun, "--nproc_per_node", "2", "-m", "dpo_lib.train", *common,
                   f"output_dir={tmp_path / 'two'}"], tmp_path, OMP_NUM_THREADS="1")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli([sys.executable, "-m", "dpo_lib.train", *common,
                   "gradient_accumulation_steps=2", f"output_dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = train_lib.read_metrics(tmp_path / "one"), train_lib.read_metrics(tmp_path / "two")
    assert [r["examples"] for r in a] == [r["examples"] for r in b] == [16, 32, 48]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_preference_runs_can_have_their_own_learning_rate(tmp_path):
    cfg = load_config("tiny", overrides={"learning_rate": 1e-3, "preference_learning_rate": 1e-4})
    assert train_lib.learning_rate(cfg.with_overrides({"stage": "sft"})) == 1e-3
    assert train_lib.learning_rate(cfg.with_overrides({"stage": "preference"})) == 1e-4
    unset = cfg.with_overrides({"stage": "preference", "preference_learning_rate": None})
    assert train_lib.learning_rate(unset) == 1e-3
    result = train_lib.train(tiny(tmp_path, "lr", stage="sft", learning_rate=2e-3,
                                  preference_learning_rate=1e-5, warmup_steps=0,
                                  lr_scheduler="constant"), progress=False)
    assert {r["lr"] for r in result.metrics if "lr" in r} == {2e-3}   # sft: learning_rate
