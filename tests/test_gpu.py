"""The GPU path: CUDA kernels, 16-bit compute, the paged optimizer, the seed recipe's memory.

Every test here needs CUDA and is skipped without it; `make test-gpu` runs them (with nbval over
the notebooks in the ``gpu-smoke`` profile). The CPU checks of the same profile are in
``test_config.py`` and at the end of this file.
"""
import math

import pytest
import torch

from dpo_lib.lessons import quantization as Q
from dpo_lib.core.layouts import SequenceLayout
from dpo_lib.training import train as train_lib
from dpo_lib.core.config import load_config
from dpo_lib.lessons.memory import random_pair_examples
from dpo_lib.core.models import architecture_config, compute_dtype, load_model
from dpo_lib.training.step import make_accelerator, training_step
from dpo_lib.training.train import step_outside_a_run
from dpo_lib.core.runs import read_metrics

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def dpo_step(cfg, pairs: int, length: int) -> dict:
    """One DPO training step as the trainer takes it: its set-up outside a run folder
    (dpo_lib.training.train.step_outside_a_run: the profile's model with LoRA, its accelerator
    with mixed precision, optimizer and schedule, the reference pass with adapters off), then
    dpo_lib.training.step.training_step on ``pairs`` random pairs of ``length`` tokens (half
    prompt, no padding: the worst case for memory)."""
    cfg = cfg.with_overrides({"train.stage": "preference", "train.warmup_steps": 0})
    vocab = architecture_config(cfg.model.name.removeprefix("random:")).vocab_size
    examples = random_pair_examples(pairs, length, length // 2, vocab)
    model, _, state = step_outside_a_run(cfg, examples)
    before = [p.detach().clone() for p in state.trainable]
    grads = []
    hooks = [p.register_post_accumulate_grad_hook(lambda p: grads.append(p.grad.clone()))
             for p in state.trainable]
    result = training_step(model, [range(pairs)], state)
    for hook in hooks:
        hook.remove()
    moved = sum(not torch.equal(b, p.detach()) for b, p in zip(before, state.trainable))
    return dict(loss=result.metrics["loss"], result=result, grads=grads,
                trainable=len(state.trainable), moved=moved, model=model)


def check_finite_step(step: dict) -> None:
    assert math.isfinite(step["loss"])
    metrics = step["result"].metrics
    assert step["result"].losses.dtype == torch.float32 and step["result"].losses.isfinite().all()
    assert math.isfinite(metrics["logps/chosen"]) and math.isfinite(metrics["logps/rejected"])
    assert math.isfinite(metrics["grad_norm"]) and not metrics["skipped"]
    assert len(step["grads"]) == step["trainable"] > 0          # every LoRA matrix got a gradient
    assert all(torch.isfinite(g).all() for g in step["grads"])
    assert any(g.abs().sum() > 0 for g in step["grads"])
    assert step["moved"] > 0                                      # the optimizer changed weights


@cuda
@pytest.mark.cuda
def test_4bit_training_step_on_cuda():
    cfg = load_config("gpu-smoke")
    step = dpo_step(cfg, pairs=2, length=64)
    check_finite_step(step)
    layer = step["model"].get_base_model().gpt_neox.layers[0].mlp.dense_h_to_4h
    assert type(layer.base_layer).__name__ == "Linear4bit" and layer.base_layer.weight.is_cuda
    assert layer.base_layer.weight.quant_state.nested             # double quantization on


#: Codes in which the nearest-code reference differs from bitsandbytes' CUDA kernel on the inputs
#: below, as the CPU emulation predicts them (notebook 01, section 01.5; tests/test_quantization.py checks the
#: places): one code of the 6,553,600 of (2560, 2560) fp32, none elsewhere.
NEAREST_VS_CUDA_CODES = {((2560, 2560), torch.float32): 1}


def cuda_codes_mismatch(weight, cuda_packed, packed) -> str:
    """Where the CUDA codes differ from the emulation's, for the failure message: the flat
    indices, and which of them depend on how rcp.approx rounds the block's 1 / absmax."""
    n = weight.numel()
    differ = (Q.unpack_nibbles(cuda_packed.cpu(), n) != Q.unpack_nibbles(packed, n))
    differ = differ.nonzero().flatten().tolist()
    sensitive = set(Q.cuda_reciprocal_sensitive(weight, 64).tolist())
    return (f"{len(differ)} codes differ from the emulation at {differ[:20]}; of them "
            f"{sorted(sensitive & set(differ))[:20]} depend on the rounding of 1 / absmax")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7,), (257, 131), (2560, 2560)])
def test_cuda_nf4_codes_equal_the_cuda_emulation(shape, dtype):
    """The CUDA kernel's codes equal ``quantize_nf4(..., arithmetic="cuda")`` exactly; the
    nearest-code reference (bitsandbytes' CPU backend) differs in NEAREST_VS_CUDA_CODES codes."""
    import bitsandbytes.functional as F

    torch.manual_seed(sum(shape))
    weight = (torch.randn(shape) * 0.02).to(dtype)
    packed, absmax = Q.quantize_nf4(weight, blocksize=64, arithmetic="cuda")  # CPU emulation
    nearest, nearest_absmax = Q.quantize_nf4(weight, blocksize=64)            # CPU reference
    cuda_packed, state = F.quantize_4bit(weight.cuda(), blocksize=64, quant_type="nf4")
    n = weight.numel()
    cuda_codes, emulated = Q.unpack_nibbles(cuda_packed.cpu(), n), Q.unpack_nibbles(packed, n)
    # The emulation takes the correctly rounded 1 / absmax; the kernel's rcp.approx is promised
    # within 1 ulp only. So a code may differ only where that rounding decides it, and there the
    # kernel's code must be the one the other fp32 neighbour of 1 / absmax gives.
    differ = set((cuda_codes != emulated).nonzero().flatten().tolist())
    sensitive = Q.cuda_reciprocal_sensitive(weight, 64)
    assert differ <= set(sensitive.tolist()), cuda_codes_mismatch(weight, cuda_packed, packed)
    if differ:
        other = Q.cuda_codes_other_reciprocal(weight, 64)
        assert all(cuda_codes[i] == other[i] for i in differ), sorted(differ)[:20]
        # one reciprocal per block: where it took the other neighbour, every code it decides moved
        moved_blocks = {i // 64 for i in differ}
        assert {i for i in sensitive.tolist() if i // 64 in moved_blocks} == differ
        print(f"\n{shape} {dtype}: {len(differ)} of {len(sensitive)} codes that the rounding of "
              f"1 / absmax decides took the other neighbour on this GPU")
    assert torch.equal(state.absmax.cpu(), absmax) and torch.equal(absmax, nearest_absmax)
    differ_nearest = int((Q.unpack_nibbles(nearest, n) != emulated).sum())
    assert differ_nearest == NEAREST_VS_CUDA_CODES.get((shape, dtype), 0)
    restored = Q.dequantize_nf4(cuda_packed.cpu(), absmax, shape, 64, dtype=dtype)
    assert torch.equal(F.dequantize_4bit(cuda_packed, state).reshape(shape).cpu(), restored)


@cuda
@pytest.mark.cuda
def test_cuda_nf4_thresholds_ties_and_zero_blocks_equal_the_cuda_emulation():
    """Hand-built blocks: one with absmax exactly 1 (1 / absmax = 1, which rcp.approx is assumed
    to return exactly) holding each kernel threshold, its fp32 neighbours and each fp32 midpoint
    of the code book, so the four values the two arithmetics code differently; an all-zero block
    (predicted: code 0 from 0 * inf = NaN, absmax 0); a block of fp32 subnormals (predicted:
    flushed to zero, so the same); a random block. In fp32, then rounded to bf16 and fp16."""
    import bitsandbytes.functional as F

    thresholds = Q.nf4_cuda_thresholds()
    midpoints = (Q.nf4_code_book()[:-1] + Q.nf4_code_book()[1:]) / 2
    up, down = torch.full((15,), 2.0), torch.full((15,), -2.0)
    values = torch.cat([torch.ones(1), thresholds, torch.nextafter(thresholds, up),
                        torch.nextafter(thresholds, down), midpoints,
                        torch.nextafter(midpoints, up), torch.nextafter(midpoints, down)])
    ties = torch.nn.functional.pad(values, (0, -values.numel() % 64)).view(-1, 64)
    torch.manual_seed(5)
    weight = torch.cat([ties, torch.zeros(1, 64), torch.tensor([1e-39, -3e-40] * 32)[None],
                        torch.randn(1, 64)])
    packed, absmax = Q.quantize_nf4(weight, blocksize=64, arithmetic="cuda")
    cuda_packed, state = F.quantize_4bit(weight.cuda(), blocksize=64, quant_type="nf4")
    assert torch.equal(cuda_packed.cpu(), packed), cuda_codes_mismatch(weight, cuda_packed, packed)
    assert torch.equal(state.absmax.cpu(), absmax)
    for dtype in (torch.bfloat16, torch.float16):   # thresholds rounded to 16 bits, same checks
        packed, absmax = Q.quantize_nf4(weight.to(dtype), blocksize=64, arithmetic="cuda")
        cuda_packed, state = F.quantize_4bit(weight.to(dtype).cuda(), blocksize=64,
                                             quant_type="nf4")
        assert torch.equal(cuda_packed.cpu(), packed), dtype
        assert torch.equal(state.absmax.cpu(), absmax), dtype


@cuda
@pytest.mark.cuda
def test_cuda_double_quantization_equals_the_reference():
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    weight = torch.randn(300, 999) * 0.05
    _, state = F.quantize_4bit(weight.cuda(), blocksize=64, quant_type="nf4",
                               compress_statistics=True)
    _, absmax = Q.quantize_nf4(weight)
    # The CUDA kernel binary-searches the dynamic code book for the nearest code (the CPU kernel
    # uses a 65,536-point table instead): the reference's exact nearest code. Compared by the code
    # book values they stand for, so that equal entries at two indices count as the same choice.
    codes, absmax2, offset = Q.double_quantize(absmax)
    code_book = Q.dynamic_code_book()
    assert torch.equal(code_book[state.absmax.cpu().long()], code_book[codes.long()])
    assert torch.equal(state.state2.absmax.cpu(), absmax2)
    assert state.offset.item() == pytest.approx(float(offset))


@cuda
@pytest.mark.cuda
def test_cuda_and_cpu_dequantize_the_same_nf4_weights_to_the_same_values():
    """A GPU run's adapter is merged on a CPU (dpo_lib.deploy.export): that is right only if the
    CPU dequantizes NF4 (with double quantization) to the values the GPU trained against. The same
    packed codes and quantization state, dequantized on each device."""
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    weight = torch.randn(1024, 768) * 0.02
    for dtype in (torch.float32, torch.bfloat16):
        packed, state = F.quantize_4bit(weight.to(dtype).cuda(), blocksize=64, quant_type="nf4",
                                        compress_statistics=True)
        on_gpu = F.dequantize_4bit(packed, state).cpu()
        state.to("cpu")
        on_cpu = F.dequantize_4bit(packed.cpu(), state)
        assert torch.equal(on_gpu, on_cpu), dtype


@cuda
@pytest.mark.cuda
def test_fp16_compute_gives_finite_dpo_logps():
    cfg = load_config("gpu-smoke", overrides={"model.compute_dtype": "float16",
                                              "train.mixed_precision": "fp16"})
    step = dpo_step(cfg, pairs=2, length=128)
    check_finite_step(step)


@cuda
@pytest.mark.cuda
def test_seed_recipe_dpo_step_fits_in_24_gb():
    """pythia-2.8b's shape (random weights), NF4 + double quant, LoRA r 8, gradient checkpointing,
    the gpu profile's micro-batch of 4 pairs at max length 512, paged 8-bit AdamW."""
    from dpo_lib.lessons.memory import estimate_memory

    cfg = load_config("gpu", overrides={"model.name": "random:pythia-2.8b"})
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step = dpo_step(cfg, pairs=cfg.train.batch_size, length=cfg.data.max_length)
    peak = torch.cuda.max_memory_allocated()
    predicted = estimate_memory("pythia-2.8b", lora_r=cfg.model.lora_r, batch=cfg.train.batch_size,
                                seq_len=cfg.data.max_length, prompt_len=cfg.data.max_length // 2,
                                gradient_checkpointing=cfg.model.gradient_checkpointing,
                                compute_dtype=str(compute_dtype()).removeprefix("torch."))
    print(f"\npythia-2.8b DPO step on {torch.cuda.get_device_name(0)}: peak "
          f"{peak / 1e9:.2f} GB measured; estimate {predicted}")
    check_finite_step(step)
    assert peak < 24e9                                 # the seed's RTX 4090: 24 GB


@cuda
@pytest.mark.cuda
def test_fp16_skipped_step_holds_the_scheduler_and_resume_restores_the_scaler(tmp_path,
                                                                              monkeypatch):
    """fp16: inf gradients at step 1 make the GradScaler skip the optimizer step and halve its
    scale; the learning-rate schedule waits a step; checkpoints hold the scaler, so a resumed run
    ends with the uninterrupted run's scale and metrics."""
    import shutil

    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    cfg = load_config("tiny", overrides={
        "train.mixed_precision": "fp16", "model.compute_dtype": "float32", "train.stage": "sft",
        "train.sft_steps": 4, "train.save_every": 2, "train.eval_every": 0,
        "train.warmup_steps": 0, "train.lr_scheduler": "linear", "data.train_limit": 32,
        "data.test_limit": 8, "train.output_dir": str(tmp_path / "plain")})
    plain = read_metrics(train_lib.train(cfg, progress=False).output_dir)
    original, calls = SequenceLayout.nll, []

    def inf_gradients_at_step_1(self, model, batch):
        calls.append(1)
        nll, counts = original(self, model, batch)
        if len(calls) == 1:
            nll.register_hook(lambda grad: grad * float("inf"))
        return nll, counts

    monkeypatch.setattr(SequenceLayout, "nll", inf_gradients_at_step_1)
    run = tmp_path / "skip"
    skip = read_metrics(train_lib.train(
        cfg.with_overrides({"train.output_dir": str(run)}), progress=False).output_dir)
    assert skip[0]["lr"] == pytest.approx(cfg.train.learning_rate)      # the schedule waited
    assert skip[0]["skipped"] is True and skip[0]["grad_norm"] is None  # logged as skipped
    assert not any(m["skipped"] for m in skip[1:])
    assert "NaN" not in (run / "metrics.jsonl").read_text()
    assert [m["lr"] for m in skip[1:]] == pytest.approx([m["lr"] for m in plain[:3]])
    scale = torch.load(run / "checkpoint-4" / "scaler.pt", weights_only=False)["scale"]
    assert scale == pytest.approx(2.0 ** 15)                            # 65536, halved once
    monkeypatch.setattr(SequenceLayout, "nll", original)
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    resumed = read_metrics(train_lib.train(
        cfg.with_overrides({"train.output_dir": str(run), "train.resume": True}),
        progress=False).output_dir)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(skip, resumed):
        assert a["skipped"] == b["skipped"] and (a["grad_norm"] is None) == (b["grad_norm"] is None)
        for key in ("loss", "lr", "grad_norm"):
            if a[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    assert torch.load(run / "checkpoint-4" / "scaler.pt", weights_only=False)["scale"] == \
        pytest.approx(2.0 ** 15)


@cuda
@pytest.mark.cuda
def test_each_process_holds_its_model_on_its_own_gpu(tmp_path):
    """torchrun with two processes on two GPUs: rank r's weights on cuda:r, its batches' device."""
    import json
    import os
    import subprocess
    import sys

    from dpo_lib.core.config import REPO_ROOT

    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two GPUs, this machine has {torch.cuda.device_count()}")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                str(REPO_ROOT / "tests" / "distributed_checks.py"), "device", str(tmp_path)]
    done = subprocess.run(torchrun, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DPO_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["on_accelerator_device"] and record["weights"] == [f"cuda:{rank}"], record


# --------------------------------------------------------------------------------------------
# What CPU can check of the same path
# --------------------------------------------------------------------------------------------

def test_dpo_step_helper_on_cpu():
    """The step the CUDA tests take, on the CPU 4-bit path, so the helper itself is tested here."""
    cfg = load_config("tiny", overrides={"model.quantization": "nf4", "model.double_quant": True})
    step = dpo_step(cfg, pairs=2, length=32)
    check_finite_step(step)
    # Before the first step LoRA's B is zero, so the policy equals the reference: loss log 2.
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_gpu_smoke_is_the_gpu_profile_at_smoke_scale():
    smoke, gpu = load_config("gpu-smoke"), load_config("gpu")
    assert set(smoke.to_dict()) == set(gpu.to_dict())
    for section in ("model", "data", "train"):
        assert set(smoke.to_dict()[section]) == set(gpu.to_dict()[section])  # one schema
    for key in ("model.quantization", "model.double_quant", "model.compute_dtype",
                "model.gradient_checkpointing", "train.optimizer", "train.mixed_precision",
                "requires_cuda"):
        assert smoke.get_path(key) == gpu.get_path(key), key
    assert smoke.model.name == "random:pythia-160m"                  # no download
    assert smoke.data.source == "bundled"
    assert smoke.train.sft_steps <= 10 and smoke.train.preference_steps <= 10


@pytest.mark.parametrize("profile", ["gpu", "gpu-smoke"])
def test_cuda_profiles_fail_fast_without_cuda(profile, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(profile)
    with pytest.raises(RuntimeError, match=f"profile '{profile}' needs a CUDA GPU for its model"
                       r".*DPO_PROFILE=cpu"):
        load_model(cfg)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU for training"):
        make_accelerator(cfg)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        train_lib.train(cfg.with_overrides({"train.output_dir": "/nonexistent/never-written"}),
                        progress=False)


def test_gpu_smoke_model_and_data_fit_on_cpu(tmp_path):
    """The gpu-smoke run itself on the CPU, with CPU stand-ins for its CUDA-only pieces: the model
    builds, the bundled data fits its lengths, SFT steps run and the loss is finite."""
    cfg = load_config("gpu-smoke", overrides={
        "requires_cuda": False, "train.optimizer": "adamw", "train.mixed_precision": "no",
        "train.sft_steps": 2, "train.eval_every": 2, "train.save_every": 0,
        "data.train_limit": 8, "data.test_limit": 4, "train.output_dir": str(tmp_path / "sft")})
    result = train_lib.train(cfg, progress=False)
    rows = read_metrics(result.output_dir)
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
