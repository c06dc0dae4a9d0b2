"""Predicted vs measured peak memory of one QLoRA DPO training step.

Each configuration runs in a fresh subprocess: load the model (random weights of a named
architecture, or a profile's real model), attach LoRA, compute the reference log-probs (as the
trainer does before training), then one step of the trainer's own code
(:func:`dpo_lib.training.step.training_step`: collation in the chosen layout, the policy pass,
the DPO loss, backward, the finite checks, clipping, AdamW and the schedule) on ``batch`` random pairs of ``seq`` tokens, half of them prompt.
``--shared`` and ``--chunked`` are the trainer's ``train.shared_prompt`` and ``train.chunked_head``.

Measured peak:
* CUDA: ``torch.cuda.max_memory_allocated()`` over load + step (the CUDA context is not in it);
* CPU: the bytes of the model's tensors (weights, buffers, LoRA) plus the growth of the process's
  peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the step)
  during the step. A small warm-up step first loads the kernels' code, so that only tensors count,
  and the child runs with a fixed malloc mmap threshold (see ``CHILD_ENV``).

    python benchmarks/memory.py                          # the CPU set (tiny, smollm2, pythia-160m)
    python benchmarks/memory.py --arch pythia-2.8b --batch 4 --seq 512 --checkpointing
    python benchmarks/memory.py --arch smollm2-135m-instruct --quant nf4 none --batch 4 --seq 256
    python benchmarks/memory.py --arch smollm2-135m-instruct --batch 8 --seq 256 --shared --chunked
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: The default set run without --arch: what a 2-core CPU measures in a few minutes.
CPU_SET = [
    dict(arch="tiny-gpt-neox", quant="none", batch=16, seq=512, checkpointing=False),
    dict(arch="tiny-gpt-neox", quant="nf4", batch=16, seq=512, checkpointing=False),
    dict(arch="tiny-gpt-neox", quant="nf4", batch=16, seq=512, checkpointing=True),
    dict(arch="smollm2-135m-instruct", quant="nf4", batch=4, seq=256, checkpointing=False),
    dict(arch="smollm2-135m-instruct", quant="nf4", batch=4, seq=256, checkpointing=True),
    dict(arch="smollm2-135m-instruct", quant="none", batch=4, seq=256, checkpointing=False),
    # the cpu profile's layout: the prompt once per pair, the output layer in chunks
    dict(arch="smollm2-135m-instruct", quant="nf4", batch=4, seq=256, checkpointing=False,
         shared=True, chunked=True),
    dict(arch="pythia-160m", quant="nf4", batch=2, seq=512, checkpointing=False),
    dict(arch="pythia-160m", quant="nf4", batch=2, seq=512, checkpointing=True),
]


#: glibc malloc keeps freed mid-sized blocks in its heap and raises its mmap threshold as it
#: goes, so the resident size of a PyTorch process stays well above its live tensors (about 1.5x
#: in a first run of this benchmark). A fixed threshold makes every block over 128 KiB its own
#: mapping, returned to the system when freed: the measured peak is then the tensors' peak.
CHILD_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")


def _rss(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) in bytes (dpo_lib.core.machine.peak_rss_mb). Without /proc
    (macOS, Windows) both are the process's peak so far, which cannot be reset: the measured step
    is then an upper bound."""
    from dpo_lib.core.machine import peak_rss_mb

    megabytes = peak_rss_mb(field=field)
    if megabytes is None:
        raise RuntimeError(f"{field}: this system reports no resident memory")
    return int(megabytes * 2**10) * 2**10


def _release_and_reset_peak() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    except OSError:
        pass  # no /proc: the peak so far stays (see _rss)
    return _rss("VmRSS")


def _model_name(arch: str) -> str:
    from dpo_lib.core.models import ARCHITECTURES

    if arch in ARCHITECTURES and arch != "tiny-gpt-neox":
        return "random:" + arch
    return arch


def step_config(arch: str, quant: str, checkpointing: bool, lora_r: int = 8,
                double_quant: bool = True, compute_dtype: str = "auto", shared: bool = False,
                chunked: bool = False):
    """The run config of one measured configuration: the tiny profile with the model, LoRA,
    quantization and layout asked for, a DPO step."""
    from dpo_lib.core.config import load_config

    return load_config("tiny", overrides={
        "model.name": _model_name(arch), "model.quantization": quant,
        "model.double_quant": double_quant, "model.compute_dtype": compute_dtype,
        "model.lora_r": lora_r, "model.lora_alpha": 2 * lora_r, "model.lora_dropout": 0.0,
        "model.gradient_checkpointing": checkpointing, "train.stage": "preference",
        "train.shared_prompt": shared, "train.chunked_head": chunked,
        "train.learning_rate": 1e-4, "train.optimizer": "adamw", "train.warmup_steps": 0})


def trainer_step(cfg, examples, micro_batches, warm_up=None, measure=None):
    """The trainer's own step on ``examples``, set up as the trainer sets it up
    (:func:`dpo_lib.training.train.step_outside_a_run`: the seed, the model with LoRA, the
    prepared model, optimizer and schedule, the reference pass) and taken by
    :func:`dpo_lib.training.step.training_step` on ``micro_batches`` (lists of example indices).
    ``warm_up``: indices of one step taken first (its update included); ``measure(step, model)``
    runs the measured step (a memory probe). Returns ``(model, state, result)``."""
    from dpo_lib.training.step import training_step
    from dpo_lib.training.train import step_outside_a_run

    model, _, state = step_outside_a_run(cfg, examples)
    if warm_up is not None:
        training_step(model, [warm_up], state)

    def step():
        return training_step(model, micro_batches, state)
    if measure is None:
        return model, state, step()
    return model, state, measure(step, state.accelerator.unwrap_model(model))


def measure(arch: str, quant: str, batch: int, seq: int, checkpointing: bool, lora_r: int = 8,
            double_quant: bool = True, compute_dtype: str = "auto", shared: bool = False,
            chunked: bool = False) -> dict:
    """One configuration in this process: the trainer's own step (:func:`trainer_step`) on
    ``batch`` random pairs of ``seq`` tokens (half of them prompt), after a small warm-up step on
    CPU (it loads kernel code and lazily built tables); returns the measured peak and the step
    time."""
    import torch

    from dpo_lib.core.models import architecture_config, compute_dtype as resolve_dtype
    from dpo_lib.lessons.memory import random_pair_examples

    cuda = torch.cuda.is_available()
    cfg = step_config(arch, quant, checkpointing, lora_r, double_quant, compute_dtype, shared,
                      chunked).with_overrides({"train.eval_batch_size": batch})
    shapes = "smollm2-135m" if arch == "smollm2-135m-instruct" else arch
    examples = random_pair_examples(batch, seq, seq // 2, architecture_config(shapes).vocab_size)
    figures = {}

    def probe(step, model):
        footprint = model.get_memory_footprint()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start_rss = 0 if cuda else _release_and_reset_peak()
        started = time.perf_counter()
        result = step()
        figures["seconds"] = time.perf_counter() - started
        figures["measured"] = torch.cuda.max_memory_allocated() if cuda else \
            footprint + _rss("VmHWM") - start_rss
        return result

    trainer_step(cfg, examples, [list(range(batch))], warm_up=None if cuda else [0],
                 measure=probe)
    return dict(measured=figures["measured"], seconds=figures["seconds"],
                device=torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
                compute_dtype=str(resolve_dtype(compute_dtype)).replace("torch.", ""))


def predict(arch: str, quant: str, batch: int, seq: int, checkpointing: bool, lora_r: int,
            double_quant: bool, compute_dtype: str, shared: bool = False, chunked: bool = False):
    import torch

    from dpo_lib.lessons.memory import estimate_memory
    from dpo_lib.core.models import SMOLLM2

    shapes_of = "smollm2-135m" if arch == SMOLLM2 else arch
    return estimate_memory(shapes_of, quantization=quant, double_quant=double_quant,
                           lora_r=lora_r, batch=batch, seq_len=seq,
                           gradient_checkpointing=checkpointing, compute_dtype=compute_dtype,
                           shared_prompt=shared, chunked_head=chunked, prompt_len=seq // 2,
                           cpu=not torch.cuda.is_available())


def layout(run: dict) -> str:
    """How the step lays out pairs and computes log-probs: plain, shared, chunked or both."""
    parts = [name for name in ("shared", "chunked") if run.get(name)]
    return "+".join(parts) or "plain"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", help="architecture names (dpo_lib.core.models."
                        "ARCHITECTURES) or smollm2-135m-instruct; default: the CPU set")
    parser.add_argument("--quant", nargs="+", default=["nf4"])
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--shared", action="store_true", help="train.shared_prompt")
    parser.add_argument("--chunked", action="store_true", help="train.chunked_head")
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--compute-dtype", default="auto")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(measure(**json.loads(args.child))), flush=True)
        return 0

    import torch

    from dpo_lib.core.models import compute_dtype as resolve_dtype

    if args.arch:
        runs = [dict(arch=a, quant=q, batch=args.batch, seq=args.seq,
                     checkpointing=args.checkpointing, shared=args.shared, chunked=args.chunked)
                for a in args.arch for q in args.quant]
    else:
        runs = CPU_SET
    dtype_name = str(resolve_dtype(args.compute_dtype)).replace("torch.", "")
    header = (f"{'model':24} {'quant':5} {'pairs':>5} {'seq':>4} {'ckpt':>4} {'layout':>14} | "
              f"{'weights':>7} "
              f"{'lora':>6} {'activ':>6} {'logits':>6} {'pred':>6} | {'meas':>6} {'ratio':>5} "
              f"{'s/step':>6}")
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, compute dtype "
          f"{dtype_name}, LoRA r={args.lora_r}; memory in GB (1e9 bytes)\n{header}\n"
          + "-" * len(header), flush=True)
    for run in runs:
        run = dict(run, lora_r=args.lora_r, double_quant=not args.no_double_quant,
                   compute_dtype=args.compute_dtype)
        estimate = predict(**{**run, "compute_dtype": dtype_name})
        child = subprocess.run([sys.executable, __file__, "--child", json.dumps(run)],
                               capture_output=True, text=True, env=CHILD_ENV)
        lines = [l for l in child.stdout.splitlines() if l.startswith("RESULT ")]
        if child.returncode or not lines:
            print(f"{run['arch']:24} {run['quant']:5} failed:\n{child.stderr[-2000:]}")
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        gb = estimate.as_gb()
        print(f"{run['arch']:24} {run['quant']:5} {run['batch']:>5} {run['seq']:>4} "
              f"{'yes' if run['checkpointing'] else 'no':>4} {layout(run):>14} | "
              f"{gb['weights']:7.3f} "
              f"{gb['lora']:6.3f} {gb['activations']:6.3f} {gb['logits']:6.3f} "
              f"{gb['total']:6.3f} | {result['measured'] / 1e9:6.3f} "
              f"{estimate.total / result['measured']:5.2f} {result['seconds']:6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
