"""The trainer in the tiny profile: learning, reference cache, resume, NaN guard, logs, CLI, DDP."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from dpo_lib.core.batches import batch_indices, load_examples
from dpo_lib.core.layouts import PlainLayout, SequenceLayout
from dpo_lib.training import checkpoints, step as step_lib
from dpo_lib.training import reference
from dpo_lib.core import runs
from dpo_lib.training import train as train_lib
from dpo_lib.core.config import REPO_ROOT, load_config


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
                                               ("preference", "ipo"), ("preference", "rpo"),
                                               ("preference", "simpo")])
def test_loss_decreases_on_a_repeated_batch(tmp_path, stage, loss_type):
    cfg = tiny(tmp_path, "run", stage=stage, loss_type=loss_type, train_limit=8,
               sft_steps=12, preference_steps=12, learning_rate=3e-3, warmup_steps=0,
               lr_scheduler="constant")
    result = train_lib.train(cfg, progress=False)
    curve = losses(result)
    assert len(curve) == 12 and all(map(torch.isfinite, torch.tensor(curve)))
    assert curve[-1] < curve[0] - 0.01 * abs(curve[0]), curve


def test_reference_cache_hit_and_invalidation(tmp_path):
    from dpo_lib.core.models import load_tokenizer

    cfg = tiny(tmp_path, "a", stage="preference")
    tokenizer = load_tokenizer(cfg)
    _, examples, _ = load_examples(cfg, tokenizer, "train", 16)
    key = reference.reference_cache_key(cfg, examples, None)
    assert key == reference.reference_cache_key(cfg, examples, None)
    assert key != reference.reference_cache_key(cfg, examples[:-1], None)           # data
    shorter = cfg.with_overrides({"data.max_length": 64, "data.max_prompt_length": 48})
    _, short_examples, _ = load_examples(shorter, tokenizer, "train", 16)
    assert key != reference.reference_cache_key(shorter, short_examples, None)      # tokenization
    assert key != reference.reference_cache_key(                                     # model
        cfg.with_overrides({"model.quantization": "nf4"}), examples, None)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"one")
    with_adapter = reference.reference_cache_key(cfg, examples, adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"two")
    assert key != with_adapter != reference.reference_cache_key(cfg, examples, adapter)


def test_dpo_and_ipo_share_one_reference_pass(tmp_path, monkeypatch):
    sft = train_lib.train(tiny(tmp_path, "sft", sft_steps=2), progress=False)
    calls = []
    original = PlainLayout.logps

    def counting(self, model, batch):
        calls.append(torch.is_grad_enabled())
        return original(self, model, batch)

    monkeypatch.setattr(PlainLayout, "logps", counting)
    for loss_type in ("dpo", "ipo"):
        train_lib.train(tiny(tmp_path, loss_type, stage="preference", loss_type=loss_type,
                             init_adapter=str(sft.output_dir), preference_steps=2),
                        progress=False)
    no_grad_calls = calls.count(False)
    # the first run: 32 train pairs at eval_batch_size 16 = 2 reference batches (these runs never
    # evaluate, eval_every 0: no held-out pass); the second run finds them cached and makes none
    assert no_grad_calls == 2, calls
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
    original = SequenceLayout.nll
    calls = {"n": 0}

    def poisoned(self, model, batch):
        calls["n"] += 1
        nll, counts = original(self, model, batch)
        return (nll * float("nan") if calls["n"] == 5 else nll), counts

    monkeypatch.setattr(SequenceLayout, "nll", poisoned)
    cfg = tiny(tmp_path, "run", sft_steps=8, save_every=2)
    with pytest.raises(step_lib.NonFiniteStepError, match="loss.*checkpoint-4"):
        train_lib.train(cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == \
        ["checkpoint-2", "checkpoint-4"]
    assert [m["step"] for m in runs.read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


PREFERENCE_KEYS = {"step", "examples", "loss", "rewards/chosen", "rewards/rejected",
                   "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
                   "lr", "grad_norm", "tokens_per_second", "step_seconds", "padding_fraction"}


def test_metrics_file_keys_and_saved_config(tmp_path):
    cfg = tiny(tmp_path, "run", stage="preference", preference_steps=2, eval_every=2)
    result = train_lib.train(cfg, progress=False)
    records = runs.read_metrics(result.output_dir)
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
    assert timing["eval"]["pairs"] > 0  # it evaluates, so the held-out pairs have a reference
    assert load_config(str(result.output_dir / "config.yaml")).to_dict() == cfg.to_dict()
    assert (result.output_dir / "adapter" / "adapter_config.json").is_file()


def test_missing_sft_adapter_is_a_clear_error(tmp_path):
    cfg = tiny(tmp_path, "run", stage="preference", init_adapter=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="run the SFT stage first"):
        train_lib.train(cfg, progress=False)


def test_cuda_only_settings_fail_clearly_on_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        step_lib.make_optimizer(tiny(tmp_path, "x", optimizer="paged_adamw_8bit"),
                                [torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(RuntimeError, match="needs a GPU"):
        step_lib.make_accelerator(tiny(tmp_path, "x", mixed_precision="fp16"))


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
    done = run_cli([sys.executable, "-m", "dpo_lib.training.train", "tiny", f"output_dir={out}",
                    "sft_steps=2", "data.max_length=64", "data.max_prompt_length=48",
                    "--no-progress"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"done: {out}" in done.stdout
    saved = load_config(str(out / "config.yaml"))
    assert saved.data.max_length == 64 and saved.train.sft_steps == 2
    assert len([r for r in runs.read_metrics(out) if "loss" in r]) == 2
    bad = run_cli([sys.executable, "-m", "dpo_lib.training.train", "tiny", "sft_stepz=2"], tmp_path)
    assert bad.returncode != 0 and "sft_steps" in bad.stderr


def test_cli_selects_the_new_losses(tmp_path):
    sft = train_lib.train(tiny(tmp_path, "sft", sft_steps=1), progress=False)
    for loss_type, extra in (("rpo", "rpo_alpha=0.5"), ("simpo", "simpo_gamma=0.3")):
        out = tmp_path / loss_type
        done = run_cli([sys.executable, "-m", "dpo_lib.training.train", "tiny", "stage=preference",
                        f"loss_type={loss_type}", extra, f"init_adapter={sft.output_dir}",
                        f"output_dir={out}", "preference_steps=1", "train_limit=16",
                        "test_limit=8", "eval_every=0", "save_every=0", "--no-progress"], tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        saved = load_config(str(out / "config.yaml"))
        assert saved.train.loss_type == loss_type
        assert (out / "reference_pass.json").is_file() == (loss_type == "rpo")
        if loss_type == "rpo":  # a run that never evaluates takes no held-out reference pass
            assert set(json.loads((out / "reference_pass.json").read_text())) == {"train"}


def test_two_processes_equal_one_with_double_accumulation(tmp_path):
    """torchrun, 2 processes on gloo, vs 1 process accumulating 2 micro-batches: same global
    batches, so the same loss curve (tolerance 1e-5; observed identical on CPU)."""
    common = ["tiny", "stage=preference", "preference_steps=3", "eval_every=0", "save_every=0",
              "train_limit=48", "--no-progress"]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    two = run_cli([torchrun, "--nproc_per_node", "2", "-m", "dpo_lib.training.train", *common,
                   f"output_dir={tmp_path / 'two'}"], tmp_path, OMP_NUM_THREADS="1")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli([sys.executable, "-m", "dpo_lib.training.train", *common,
                   "gradient_accumulation_steps=2", f"output_dir={tmp_path / 'one'}"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = runs.read_metrics(tmp_path / "one"), runs.read_metrics(tmp_path / "two")
    assert [r["examples"] for r in a] == [r["examples"] for r in b] == [16, 32, 48]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_preference_runs_can_have_their_own_learning_rate(tmp_path):
    cfg = load_config("tiny", overrides={"learning_rate": 1e-3, "preference_learning_rate": 1e-4})
    assert step_lib.learning_rate(cfg.with_overrides({"stage": "sft"})) == 1e-3
    assert step_lib.learning_rate(cfg.with_overrides({"stage": "preference"})) == 1e-4
    unset = cfg.with_overrides({"stage": "preference", "preference_learning_rate": None})
    assert step_lib.learning_rate(unset) == 1e-3
    result = train_lib.train(tiny(tmp_path, "lr", stage="sft", learning_rate=2e-3,
                                  preference_learning_rate=1e-5, warmup_steps=0,
                                  lr_scheduler="constant"), progress=False)
    assert {r["lr"] for r in result.metrics if "lr" in r} == {2e-3}   # sft: learning_rate


# --------------------------------------------------------------------------------------------
# Several processes, checkpoints, resume, the reference cache (issue 18)
# --------------------------------------------------------------------------------------------

CHECKS = str(REPO_ROOT / "tests" / "distributed_checks.py")


def torchrun(args, tmp_path, processes=2, timeout=600):
    """``tests/distributed_checks.py`` in ``processes`` processes (gloo on CPU); a deadlock
    fails the test at ``timeout`` seconds instead of hanging it."""
    command = [shutil.which("torchrun", path=os.path.dirname(sys.executable)),
               "--nproc_per_node", str(processes), CHECKS, *args]
    environment = {**os.environ, "DPO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": str(REPO_ROOT)}
    # its own process group, so that a timeout ends torchrun's workers too (a deadlock leaves
    # them waiting in a collective otherwise)
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (deadlock?): {stderr[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_each_process_loads_its_model_onto_its_own_device(tmp_path):
    """Two processes: the weights sit on the accelerator's device of each, and with GPUs each
    process asks transformers for its own GPU (local rank), not GPU 0 for all."""
    done = torchrun(["device", str(tmp_path / "out")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / "out" / f"rank{rank}.json").read_text())
        assert record["on_accelerator_device"], record
        if "device_map_with_cuda" in record:
            assert record["device_map_with_cuda"] == {"": rank}


def test_a_nan_on_one_process_stops_every_process_with_the_same_error(tmp_path):
    """Rank 1 alone sees a NaN loss at step 3: both processes raise the same error (none waits
    in the gradient all-reduce), and the step-2 checkpoint is kept."""
    run = tmp_path / "run"
    done = torchrun(["train", str(tmp_path / "out"), "--nan-rank", "1", "--nan-call", "3",
                     "stage=sft", "sft_steps=6", "save_every=2", "eval_every=0",
                     "train_limit=48", "test_limit=16", f"output_dir={run}"], tmp_path,
                    timeout=600)
    assert done.returncode != 0
    errors = [(tmp_path / "out" / f"rank{rank}.error") for rank in (0, 1)]
    assert all(e.is_file() for e in errors), done.stderr[-3000:]
    first, second = (e.read_text() for e in errors)
    assert first == second
    assert "step 3" in first and "rank 1: loss nan" in first and "rank 0:" not in first
    assert "checkpoint-2" in first
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert [m["step"] for m in runs.read_metrics(run)] == [1, 2]


def sgd(cfg, parameters):
    return torch.optim.SGD(parameters, lr=step_lib.learning_rate(cfg))


def lora_b(run):
    from safetensors.torch import load_file

    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    return {k: v for k, v in weights.items() if "lora_B" in k}


def test_sft_gradient_is_the_token_mean_of_the_whole_step(tmp_path, monkeypatch):
    """The same 8 examples in one optimizer step as batch 8, as 4 micro-batches of 2, and as
    2 processes x 2 micro-batches of 2: the same loss and, with plain SGD and no clipping (the
    update is the gradient), the same adapter after the step."""
    from dpo_lib.core.runs import RunResult, read_metrics

    monkeypatch.setattr(step_lib, "make_optimizer", sgd)
    common = {"stage": "sft", "sft_steps": 1, "train_limit": 8, "test_limit": 8,
              "max_grad_norm": 1e9, "warmup_steps": 0, "lr_scheduler": "constant",
              "learning_rate": 0.5}
    runs = {}
    for name, batch, accumulation in (("8x1", 8, 1), ("2x4", 2, 4)):
        result = train_lib.train(tiny(tmp_path, name, batch_size=batch,
                                      gradient_accumulation_steps=accumulation, **common),
                                 progress=False)
        runs[name] = (losses(result)[0], lora_b(result.output_dir))
    done = torchrun(["train", str(tmp_path / "out"), "--sgd", "eval_every=0", "save_every=0",
                     "batch_size=2", "gradient_accumulation_steps=2",
                     f"output_dir={tmp_path / '2x2x2'}"]
                    + [f"{k}={v}" for k, v in common.items()], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs["2x2x2"] = (losses(RunResult(tmp_path / "2x2x2", read_metrics(tmp_path / "2x2x2")))[0],
                     lora_b(tmp_path / "2x2x2"))
    loss, weights = runs["8x1"]
    assert any(v.abs().max() > 1e-4 for v in weights.values())     # the step moved B
    for name in ("2x4", "2x2x2"):
        assert runs[name][0] == pytest.approx(loss, rel=1e-6), name
        for key, value in weights.items():
            torch.testing.assert_close(runs[name][1][key], value, rtol=1e-4, atol=1e-7,
                                       msg=lambda m: f"{name} {key}: {m}")


def test_sft_step_with_one_micro_batch_is_the_plain_token_mean(tmp_path):
    """One process, accumulation 1: the trainer's step-1 loss and gradient norm equal a plain
    computation written here: the same initial model and batch, the logits' cross-entropy over
    the answer tokens (torch's own), autograd, torch's total norm. Compared to float tolerance,
    not to numbers recorded on some processor."""
    import torch.nn.functional as F

    from dpo_lib.core.scoring import pad_id

    cfg = tiny(tmp_path, "run", stage="sft", sft_steps=1, train_limit=16)
    logged = train_lib.train(cfg, progress=False).metrics[0]
    train_lib.seed_everything(cfg.seed)                    # what train() does before the model
    model, tokenizer, _ = train_lib.prepare_model(cfg)
    examples, _ = train_lib.run_examples(cfg, tokenizer)
    indices = batch_indices(examples, cfg.train.batch_size, cfg.train.group_by_length,
                            seed=cfg.seed * 1000)[0]        # epoch 0, micro-batch 0
    batch = SequenceLayout().collate([examples[i] for i in indices], pad_id(model))
    model.train()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100)          # mean over the answer tokens of the batch
    loss.backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                          if p.grad is not None])
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert logged["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)


def test_the_trainer_groups_packed_pairs_by_their_packed_rows():
    """The packed layout's rows hold the prompt once and both answers: the trainer's epoch,
    collated as it trains, pads less than the same epoch grouped by the longer side (what pairs
    side by side take), and covers every pair once; ``train.group_length=longer_side`` gives the
    older grouping back."""
    import types

    from dpo_lib.core.batches import example_length
    from dpo_lib.core.layouts import PackedLayout, real_tokens
    from dpo_lib.core.models import load_tokenizer

    cfg = load_config("tiny", overrides={"train_limit": 96, "stage": "preference",
                                         "shared_prompt": True, "batch_size": 4})
    examples, _ = train_lib.run_examples(cfg, load_tokenizer(cfg))
    plan = train_lib.BatchPlan(examples, cfg, types.SimpleNamespace(process_index=0,
                                                                    num_processes=1))
    epoch = [plan.indices(n) for n in range(plan.per_epoch)]
    assert sorted(i for b in epoch for i in b) == list(range(len(examples)))
    layout = PackedLayout()

    def positions(batches):
        return sum(real_tokens(layout.collate([examples[i] for i in b], 0))[1] for b in batches)

    real = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"])
               - len(e["prompt_input_ids"]) for e in examples)
    by_longer_side = batch_indices(examples, 4, True, seed=cfg.seed * 1000,
                                   lengths=[example_length(e) for e in examples])
    assert positions(epoch) - real < 0.8 * (positions(by_longer_side) - real)
    # train.group_length=longer_side: the batches of the runs before 2026-12-05 (the committed ones)
    old = train_lib.BatchPlan(examples, cfg.with_overrides({"train.group_length": "longer_side"}),
                              types.SimpleNamespace(process_index=0, num_processes=1))
    assert [old.indices(n) for n in range(old.per_epoch)] == by_longer_side


@pytest.mark.parametrize("stage, overrides", [
    ("preference", {"lora_dropout": 0.1}),
    ("sft", {"lora_dropout": 0.1, "quantization": "nf4", "gradient_accumulation_steps": 2}),
])
def test_resume_equals_the_uninterrupted_run(tmp_path, stage, overrides):
    """Dropout on, so the RNG state matters; NF4 and accumulation for SFT."""
    cfg = tiny(tmp_path, "run", stage=stage, preference_steps=4, sft_steps=4, save_every=2,
               eval_every=2, train_limit=32, **overrides)
    whole = train_lib.train(cfg, progress=False).metrics
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    shutil.rmtree(tmp_path / "run" / "adapter")
    resumed = train_lib.train(cfg.with_overrides({"train.resume": True}), progress=False).metrics
    assert_same_metrics(whole, resumed)


def assert_same_metrics(whole, resumed):
    assert [m["step"] for m in resumed] == [m["step"] for m in whole]
    for a, b in zip(whole, resumed):
        assert a.keys() == b.keys()
        for key in a:
            if key not in ("tokens_per_second", "step_seconds"):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


def test_two_process_resume_equals_the_uninterrupted_run(tmp_path):
    """Each process restores its own RNG state (dropout masks differ between the processes)."""
    common = ["stage=sft", "sft_steps=4", "save_every=2", "eval_every=2", "train_limit=48",
              "test_limit=16", "lora_dropout=0.1", f"output_dir={tmp_path / 'run'}"]
    done = torchrun(["train", str(tmp_path / "out"), *common], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    whole = runs.read_metrics(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    shutil.rmtree(tmp_path / "run" / "adapter")
    done = torchrun(["train", str(tmp_path / "out"), *common, "resume=true"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_metrics(whole, runs.read_metrics(tmp_path / "run"))
    assert {"random_states_0.pkl", "random_states_1.pkl", "adapter_model.safetensors",
            "optimizer.bin", "trainer_state.json", "config.yaml"} <= \
        {p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()}


def test_scheduler_does_not_step_when_the_optimizer_step_was_skipped(tmp_path, monkeypatch):
    """fp16's GradScaler skips a step with inf gradients (accelerate reports it); the learning
    rate schedule must then wait. Simulated here: the first step reported as skipped."""
    from accelerate import Accelerator

    cfg = tiny(tmp_path, "plain", stage="sft", sft_steps=3, warmup_steps=0,
               lr_scheduler="linear")
    plain = [m["lr"] for m in train_lib.train(cfg, progress=False).metrics]
    asked = []

    def skipped_once(self):
        asked.append(1)
        return len(asked) == 1

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(skipped_once))
    cfg = cfg.with_overrides({"train.output_dir": str(tmp_path / "skip")})
    records = train_lib.train(cfg, progress=False).metrics
    skip = [m["lr"] for m in records]
    assert asked and skip[0] == pytest.approx(1e-3) and skip[1:] == pytest.approx(plain[:2])
    # the skipped step says so, with no gradient norm (null, never NaN, in metrics.jsonl)
    assert [m["skipped"] for m in records] == [True, False, False]
    assert records[0]["grad_norm"] is None and all(m["grad_norm"] > 0 for m in records[1:])
    assert "NaN" not in (tmp_path / "skip" / "metrics.jsonl").read_text()


def test_resume_without_a_checkpoint_is_an_error_and_keeps_the_metrics(tmp_path):
    cfg = tiny(tmp_path, "run", stage="sft", sft_steps=2)
    train_lib.train(cfg, progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(FileNotFoundError, match="no checkpoint.*overwrite=true"):
        train_lib.train(cfg.with_overrides({"train.resume": True}), progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_resume_with_a_different_config_names_the_keys(tmp_path):
    cfg = tiny(tmp_path, "run", stage="sft", sft_steps=4, save_every=2)
    train_lib.train(cfg, progress=False)
    shutil.rmtree(tmp_path / "run" / "checkpoint-4")
    changed = cfg.with_overrides({"train.resume": True, "train.learning_rate": 5e-4,
                                  "data.max_length": 96, "data.max_prompt_length": 64,
                                  "train.eval_every": 1})
    with pytest.raises(ValueError, match=r"data.max_length: 128 -> 96, data.max_prompt_length: "
                                         r"96 -> 64, train.learning_rate"):
        train_lib.train(changed, progress=False)
    # keys that do not change the computation may differ
    allowed = cfg.with_overrides({"train.resume": True, "train.eval_every": 2,
                                  "train.preference_steps": 99})
    run_id = runs.read_run_record(tmp_path / "run")["run_id"]
    assert checkpoints.resume_checkpoint(allowed, tmp_path / "run", run_id).name == "checkpoint-2"


def test_reference_cache_key_holds_the_arithmetic(tmp_path, monkeypatch):
    """A reference computed under bf16 autocast (or bf16 compute) is not served to an fp32 run;
    neither is one from other library versions or another revision of the model."""
    import transformers

    from dpo_lib.core.models import load_tokenizer

    cfg = tiny(tmp_path, "a", stage="preference")
    _, examples, _ = load_examples(cfg, load_tokenizer(cfg), "train", 8)

    def key(**overrides):
        return reference.reference_cache_key(cfg.with_overrides(overrides), examples, None)

    fp32 = key(**{"train.mixed_precision": "no"})
    assert key(**{"train.mixed_precision": "bf16"}) != fp32
    assert key(**{"train.mixed_precision": "fp16"}) != fp32
    # auto resolves on this machine: fp32 on CPU is the same key as an explicit float32 ...
    assert key(**{"model.compute_dtype": "auto"}) == key(**{"model.compute_dtype": "float32"})
    assert key(**{"model.compute_dtype": "bfloat16"}) != fp32
    if not torch.cuda.is_available():   # ... and bf16 (compute and autocast) on a bf16 GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert key(**{"model.compute_dtype": "auto", "train.mixed_precision": "auto"}) != fp32
        monkeypatch.undo()
    assert reference.reference_cache_key(cfg, examples, None, "rev-a") != \
        reference.reference_cache_key(cfg, examples, None, "rev-b")
    versions = reference.library_versions()
    monkeypatch.setattr(reference, "library_versions",
                        lambda: {**versions, "transformers": transformers.__version__ + ".post1"})
    assert key(**{"train.mixed_precision": "no"}) != fp32


def test_reference_cache_is_written_atomically(tmp_path, monkeypatch):
    """A write that fails half-way leaves no file where readers look for it."""
    target = tmp_path / "cache" / "key.pt"
    original = torch.save

    def interrupted(obj, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reference.save_atomically({"x": torch.zeros(2)}, target)
    assert not target.exists() and not list(target.parent.glob("*.tmp"))
    monkeypatch.setattr(torch, "save", original)
    reference.save_atomically({"x": torch.ones(2)}, target)
    assert torch.equal(torch.load(target)["x"], torch.ones(2))


def test_model_revision_of_a_local_folder_changes_with_its_files(tmp_path):
    from transformers import AutoModelForCausalLM

    from dpo_lib.core.models import architecture_config

    AutoModelForCausalLM.from_config(architecture_config("tiny-gpt-neox")).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    first = reference.model_revision(model)
    assert first and first == reference.model_revision(model)
    config = json.loads((tmp_path / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert reference.model_revision(model) != first


def test_simpo_runs_without_a_reference_pass(tmp_path, monkeypatch):
    def no_reference(*args, **kwargs):
        raise AssertionError("simpo asked for a reference pass")
    monkeypatch.setattr(train_lib, "reference_pass", no_reference)
    result = train_lib.train(tiny(tmp_path, "simpo", stage="preference", loss_type="simpo",
                                  preference_steps=2, eval_every=2, beta=2.0, simpo_gamma=1.0),
                             progress=False)
    first = [m for m in result.metrics if "loss" in m][0]
    last_eval = [m for m in result.metrics if "eval/loss" in m][-1]
    # rewards are beta x token-mean log-probs, the loss -log sigmoid(margin - gamma)
    assert first["rewards/chosen"] == pytest.approx(2.0 * first["logps/chosen"], rel=1e-5)
    assert first["logps/token_averaged"] == 1.0 and "eval/rewards/accuracies" in last_eval
    assert not (result.output_dir / "reference_pass.json").exists()


def test_rpo_adds_the_chosen_nll_to_dpo(tmp_path):
    dpo = train_lib.train(tiny(tmp_path, "dpo", stage="preference", preference_steps=1),
                          progress=False).metrics[0]
    rpo = train_lib.train(tiny(tmp_path, "rpo", stage="preference", loss_type="rpo",
                               rpo_alpha=0.5, preference_steps=1), progress=False).metrics[0]
    assert dpo["loss"] == pytest.approx(0.6931, abs=1e-4)      # both start at the reference
    assert rpo["logps/chosen"] == pytest.approx(dpo["logps/chosen"], rel=1e-6)
    # the added term is 0.5 x the batch mean of the chosen answers' NLL per token: positive
    assert rpo["loss"] > dpo["loss"] + 0.5


@pytest.mark.parametrize("how", ["ches", "random"])
def test_pair_filter_drops_its_share_before_the_reference_pass(tmp_path, monkeypatch, how):
    from dpo_lib.training import ches

    seen = []
    original = train_lib.reference_pass

    def counting(model, examples, *args, **kwargs):
        seen.append(len(examples))
        return original(model, examples, *args, **kwargs)
    monkeypatch.setattr(train_lib, "reference_pass", counting)
    cfg = tiny(tmp_path, how, stage="preference", preference_steps=1, train_limit=40,
               pair_filter=how, pair_filter_share=0.2)
    result = train_lib.train(cfg, progress=False)
    record = json.loads((result.output_dir / "pair_filter.json").read_text())
    assert record["pool"] == 40 and record["kept"] == 32 and len(record["dropped"]) == 8
    assert seen[0] == 32                                    # the reference pass: kept pairs only
    if how == "ches":
        scores = torch.tensor(record[ches.FILTER_SCORE])
        assert set(record["dropped"]) == set(scores.argsort(descending=True)[:8].tolist())
    else:                                                   # seeded: the same draw again
        again = train_lib.train(cfg.with_overrides({"output_dir": str(tmp_path / "again")}),
                                progress=False)
        assert json.loads((again.output_dir / "pair_filter.json").read_text())["dropped"] == \
            record["dropped"]


def test_pair_filter_file_trains_on_the_pool_without_the_named_pairs(tmp_path, monkeypatch):
    """The reference pass (and so training) sees exactly the pool's other pairs, in order: checked
    against the pool tokenized here, independently of the filter."""
    from dpo_lib.core.models import load_tokenizer

    seen = []
    original = train_lib.reference_pass

    def keeping(model, examples, *args, **kwargs):
        seen.append([e["chosen_input_ids"] for e in examples])
        return original(model, examples, *args, **kwargs)
    monkeypatch.setattr(train_lib, "reference_pass", keeping)
    drops = tmp_path / "drops.json"
    drops.write_text(json.dumps({"dropped": [0, 5, 39], "pool": 40, "source": "bundled"}))
    cfg = tiny(tmp_path, "file", stage="preference", preference_steps=1, train_limit=40,
               pair_filter="file", pair_filter_file=str(drops))
    result = train_lib.train(cfg, progress=False)
    record = json.loads((result.output_dir / "pair_filter.json").read_text())
    assert (record["pair_filter"], record["file"], record["pool"], record["kept"],
            record["dropped"]) == ("file", str(drops), 40, 37, [0, 5, 39])
    _, pool, _ = load_examples(cfg, load_tokenizer(cfg), "train", 40)
    assert seen[0] == [e["chosen_input_ids"] for i, e in enumerate(pool) if i not in (0, 5, 39)]
    drops.write_text(json.dumps({"dropped": [1], "pool": 400}))     # made for another pool
    with pytest.raises(ValueError, match="pool of 400 pairs; this run's pool has 40"):
        train_lib.train(cfg.with_overrides({"output_dir": str(tmp_path / "other")}),
                        progress=False)


def test_the_runs_seed_drives_the_lora_initialisation(tmp_path):
    """The base model's random weights come from model.init_seed in their own generator; LoRA's
    initialisation from the run's seed. Step 1 of the warm-up has learning rate 0, so the saved
    adapter is the initialisation itself."""
    from safetensors.torch import load_file

    def initial_lora_a(name, seed):
        cfg = tiny(tmp_path, name, stage="sft", sft_steps=1, warmup_steps=2, seed=seed)
        result = train_lib.train(cfg, progress=False)
        assert result.metrics[0]["lr"] == 0                  # the step changed nothing
        weights = load_file(result.output_dir / "adapter" / "adapter_model.safetensors")
        return {k: v for k, v in weights.items() if "lora_A" in k}

    first, again, other = initial_lora_a("a", 0), initial_lora_a("b", 0), initial_lora_a("c", 1)
    assert first.keys() == other.keys() and first
    for key in first:
        assert torch.equal(first[key], again[key]), key
        assert not torch.equal(first[key], other[key]), key
    # and the base model's weights are the same for both seeds (init_seed, not seed)
    from dpo_lib.core.models import load_model

    cfg = tiny(tmp_path, "x")
    torch.manual_seed(0)
    w0 = load_model(cfg).state_dict()
    torch.manual_seed(1)
    w1 = load_model(cfg).state_dict()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_the_reference_pass_runs_on_the_prepared_model_under_the_training_autocast(
        tmp_path, monkeypatch):
    """The reference log-probs must be computed as training computes the policy's: after
    accelerator.prepare (the model on the device the batches go to) and inside the accelerator's
    autocast (bf16 on a GPU; on this CPU the context is recorded, not a dtype). Every batch of the
    pass goes to the device the model's weights are on."""
    from contextlib import contextmanager

    from accelerate import Accelerator

    events, inside = [], []
    original_prepare, original_autocast = Accelerator.prepare, Accelerator.autocast

    def prepare(self, *args):
        events.append("prepare")
        return original_prepare(self, *args)

    @contextmanager
    def autocast(self, *args, **kwargs):
        inside.append(True)
        try:
            with original_autocast(self, *args, **kwargs):
                yield
        finally:
            inside.pop()

    real_logps, devices = PlainLayout.logps, []

    def logps(self, model, batch):
        if not torch.is_grad_enabled():            # a no-grad pass: reference or evaluation
            events.append(("pass", bool(inside)))
            weights = next(model.parameters()).device
            devices.append(all(v.device == weights for v in batch.values()))
        return real_logps(self, model, batch)

    monkeypatch.setattr(Accelerator, "prepare", prepare)
    monkeypatch.setattr(Accelerator, "autocast", autocast)
    monkeypatch.setattr(PlainLayout, "logps", logps)
    train_lib.train(tiny(tmp_path, "run", stage="preference", preference_steps=1),
                    progress=False)
    passes = [e for e in events if e != "prepare"]
    assert events[0] == "prepare" and passes, events         # the reference pass after prepare
    assert all(under for _, under in passes), events          # ... inside the autocast
    assert devices and all(devices)


def test_make_accelerator_after_one_with_another_mixed_precision():
    """A check step in fp32 after a bf16 run in the same process (notebooks 03 and 06 on a GPU):
    accelerate keeps one state per process and refuses a second precision unless it is cleared."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dpo_lib.training.step import make_accelerator

    AcceleratorState._reset_state()
    try:
        Accelerator(mixed_precision="bf16", cpu=True)   # what a GPU run leaves behind
        accelerator = make_accelerator(load_config("tiny"))
        assert accelerator.mixed_precision == "no"
    finally:
        AcceleratorState._reset_state()


@pytest.mark.parametrize("from_sft", [True, False])
def test_step_zero_evaluation_reads_the_reference_rows(tmp_path, monkeypatch, from_sft):
    """Before any step the policy is its reference, so the held-out metrics of step 0 are read
    from the reference pass's rows: they must equal the metrics of an evaluation that runs the
    model (forced by saying the policy is not its reference)."""
    init = {}
    if from_sft:
        init = {"init_adapter": str(train_lib.train(tiny(tmp_path, "sft", sft_steps=3),
                                                    progress=False).output_dir)}
    runs_ = {}
    for name, shortcut in (("read", True), ("ran", False)):
        if not shortcut:
            monkeypatch.setattr(train_lib, "policy_is_reference", lambda *_: False)
        cfg = tiny(tmp_path, name, stage="preference", preference_steps=1, eval_every=1, **init)
        runs_[name] = [m for m in train_lib.train(cfg, progress=False).metrics if m["step"] == 0]
    read, ran = runs_["read"][0], runs_["ran"][0]
    assert read.keys() == ran.keys() and "eval/logps/chosen" in read
    for key in read:
        assert read[key] == pytest.approx(ran[key], rel=1e-5, abs=1e-6), key


def test_policy_is_reference_only_while_the_adapter_adds_nothing(tmp_path):
    from dpo_lib.core.lora import add_lora
    from dpo_lib.core.models import load_model

    cfg = tiny(tmp_path, "run", stage="preference")
    model = add_lora(load_model(cfg), cfg)
    assert step_lib.policy_is_reference(model, None)             # a fresh adapter: B = 0
    assert step_lib.policy_is_reference(model, tmp_path)         # from the reference's adapter
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = 1e-3
    assert not step_lib.policy_is_reference(model, None)
