"""The memory estimate: its parts, the 24/16 GB answer, and a measured peak on the tiny model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_lib.core.logps import CHUNK_ELEMENTS
from dpo_lib.lessons.memory import GB, estimate_memory, fits, model_shapes
from dpo_lib.core.models import load_model
from dpo_lib.core.config import load_config

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "memory.py"
#: Predicted vs measured on the tiny model (fresh process, CPU): within 20 %.
TOLERANCE = 0.20


def test_shapes_count_the_parameters_of_a_built_model():
    model = load_model(load_config("tiny"), quantization="none")
    shapes = model_shapes(model)
    assert shapes.total_params == sum(p.numel() for p in model.parameters())
    assert len(shapes.linear) == 4 * shapes.layers  # qkv, dense, up, down; the head excluded


def test_parts_follow_the_formats_and_checkpointing():
    kwargs = dict(lora_r=8, batch=4, seq_len=512)
    nf4 = estimate_memory("pythia-2.8b", "nf4", double_quant=False, **kwargs)
    nf4_dq = estimate_memory("pythia-2.8b", "nf4", double_quant=True, **kwargs)
    int8 = estimate_memory("pythia-2.8b", "int8", **kwargs)
    bf16 = estimate_memory("pythia-2.8b", "bf16", **kwargs)
    assert nf4_dq.weights < nf4.weights < int8.weights < bf16.weights
    shapes = model_shapes("pythia-2.8b")
    assert bf16.weights == 2 * shapes.total_params
    assert nf4.lora == 16 * 8 * sum(i + o for i, o in shapes.linear)
    checkpointed = estimate_memory("pythia-2.8b", "nf4", gradient_checkpointing=True, **kwargs)
    assert checkpointed.activations < nf4_dq.activations / 5
    # bf16 logits of 8 sequences x 512 tokens kept for backward, their gradient, and one fp32
    # chunk of rows (CHUNK_ELEMENTS // vocab rows) in each direction
    chunk = CHUNK_ELEMENTS // 50304 * 50304
    assert checkpointed.logits == nf4_dq.logits == 8 * 512 * 50304 * 2 * 2 + chunk * 4 * 2
    chunked = estimate_memory("pythia-2.8b", "nf4", chunked_head=True, prompt_len=256, **kwargs)
    assert chunked.logits == 8 * 256 * 2560 * 2 + chunk * (4 + 4 + 2) < nf4_dq.logits / 4
    # on a CPU the chunked head keeps the fp32 softmax of all 2,048 answer tokens (2^28 elements
    # hold 5,328 rows of 50,304) for the backward pass
    on_cpu = estimate_memory("pythia-2.8b", "nf4", chunked_head=True, prompt_len=256, cpu=True,
                             **kwargs)
    assert on_cpu.logits == chunked.logits + 8 * 256 * 50304 * 4
    long_cpu = estimate_memory("pythia-2.8b", "nf4", chunked_head=True, prompt_len=256, cpu=True,
                               **dict(kwargs, seq_len=4096))    # 8 x 3,840 answer tokens: capped
    long_gpu = estimate_memory("pythia-2.8b", "nf4", chunked_head=True, prompt_len=256,
                               **dict(kwargs, seq_len=4096))
    assert long_cpu.logits == long_gpu.logits + 5328 * 50304 * 4 <= long_gpu.logits + 2 ** 30
    packed = estimate_memory("pythia-2.8b", "nf4", shared_prompt=True, prompt_len=256, **kwargs)
    assert packed.activations < nf4_dq.activations
    assert nf4.total == nf4.weights + nf4.lora + nf4.activations + nf4.logits
    with pytest.raises(ValueError):
        estimate_memory("pythia-2.8b", "nf4", compute_dtype="float8")


def test_pythia_2p8b_dpo_fits_24_and_16_gb_with_checkpointing():
    recipe = dict(quantization="nf4", double_quant=True, lora_r=8, batch=4, seq_len=512,
                  compute_dtype="bfloat16")
    ok24, needed, estimate = fits(24, "pythia-2.8b", gradient_checkpointing=True, **recipe)
    ok16, _, _ = fits(16, "pythia-2.8b", gradient_checkpointing=True, **recipe)
    assert ok24 and ok16 and needed < 10
    assert estimate.weights < 2.5 * GB
    # without checkpointing the activations alone pass 11 GB: no longer within 16 GB
    ok16_plain, needed_plain, _ = fits(16, "pythia-2.8b", gradient_checkpointing=False, **recipe)
    assert not ok16_plain and needed_plain > 16


@pytest.mark.parametrize("layout", [{}, {"shared": True, "chunked": True}], ids=["plain", "cpu"])
def test_estimate_matches_the_trainers_measured_cpu_step_on_tiny_model(layout):
    """The trainer's own step (dpo_lib.training.step.training_step) in a fresh process, plain and in the
    cpu profile's layout (shared prompt, chunked output layer)."""
    run = dict(arch="tiny-gpt-neox", quant="nf4", batch=8, seq=512, checkpointing=False,
               lora_r=8, double_quant=True, compute_dtype="float32", **layout)
    sys.path.insert(0, str(BENCHMARK.parent))
    try:
        import memory as benchmark  # benchmarks/memory.py
    finally:
        sys.path.pop(0)
    child = subprocess.run([sys.executable, str(BENCHMARK), "--child", json.dumps(run)],
                           capture_output=True, text=True, env=benchmark.CHILD_ENV, timeout=300)
    line = [l for l in child.stdout.splitlines() if l.startswith("RESULT ")]
    assert child.returncode == 0 and line, child.stderr[-2000:]
    measured = json.loads(line[-1][len("RESULT "):])["measured"]
    predicted = benchmark.predict(**run).total
    assert abs(predicted / measured - 1) < TOLERANCE, (predicted, measured)


def test_peak_memory_without_proc(monkeypatch, tmp_path):
    """Linux reads /proc/self/status; elsewhere getrusage (macOS, other Unix), psutil (Windows),
    or None."""
    import sys

    from dpo_lib.core.machine import peak_rss_mb

    linux = peak_rss_mb()
    assert linux is not None and linux > 10
    missing = str(tmp_path / "no-proc")
    assert peak_rss_mb(missing) == pytest.approx(linux, rel=0.5)             # ru_maxrss
    monkeypatch.setitem(sys.modules, "resource", None)
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert peak_rss_mb(missing) is None


def test_cpu_threads_without_sched_getaffinity(monkeypatch):
    import os

    from dpo_lib.deploy.llama_runtime import cpu_threads

    assert cpu_threads() >= 1
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert cpu_threads() == os.cpu_count()
