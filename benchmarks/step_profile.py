"""Where every second of one training step goes: the trainer's own step under torch.profiler.

    python benchmarks/step_profile.py                       # cpu profile, DPO, real pairs if set
    python benchmarks/step_profile.py --profile cpu-hh --batch 8 --steps 2 --json out.json
    python benchmarks/step_profile.py chunked_head=false      # key=value overrides of the run

Sets the run up as the trainer does (:func:`dpo_lib.training.train.step_outside_a_run`), takes one
warm-up pass over the batches it profiles (each step of a process that first grows its memory to a
new peak spends seconds in the kernel's page faults: 4.7 s of system time in one 11 s step on 2
cores, 2026-12-05; the warm-up leaves the steady state of a long run), then profiles ``--steps``
steps of :func:`dpo_lib.training.step.training_step`,
which marks its phases ``forward``, ``backward`` and ``optimizer`` (``torch.profiler``
``record_function``; the output layer's log-softmax marks itself ``output_layer``). Each operator's
self time (on the thread that ran it) goes to one part:

* ``base GEMM``: matrix multiplies of the frozen weights (no dimension equal to the LoRA rank, not
  the output layer); ``LoRA GEMM``: multiplies with the rank as a dimension;
* ``output layer + log-softmax``: everything inside ``output_layer`` (its GEMMs included);
* ``dequantization``: bitsandbytes' 4-bit dequantize and every operator it runs; ``attention``: scaled-dot-product kernels;
* ``element-wise``: every other operator (norms, activations, adds, copies, the optimizer's
  arithmetic); ``overhead``: the phase's wall time that no operator accounts for (Python, the
  autograd engine, the profiler).

Prints, per phase and in total, seconds and shares, the GEMMs' GFLOP/s against a GEMM probe in the
same process, and the ceiling: the step's time if every GEMM ran at the measured peak and the rest
stayed as it is.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PHASES = ("forward", "backward", "optimizer")
PARTS = ("base GEMM", "LoRA GEMM", "output layer + log-softmax", "dequantization", "attention",
         "element-wise", "overhead")
GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul", "aten::linear")


def gemm_flops(event) -> float:
    """2 m n k of a matrix multiply from its recorded input shapes (0 where they are unknown)."""
    shapes = [s for s in event.input_shapes if s]
    if event.name in ("aten::mm", "aten::bmm") and len(shapes) >= 2:
        a, b = shapes[0], shapes[1]
        batch = a[0] if event.name == "aten::bmm" else 1
        return 2.0 * batch * a[-2] * a[-1] * b[-1]
    if event.name in ("aten::addmm", "aten::addmm_") and len(shapes) >= 3:
        a, b = shapes[1], shapes[2]
        return 2.0 * a[0] * a[1] * b[1]
    return 0.0


def classify(event, rank: int, vocab: int, in_output_layer: bool, in_dequantize: bool) -> str:
    name = event.name
    if in_output_layer:
        return "output layer + log-softmax"
    if in_dequantize or "dequantize" in name:
        return "dequantization"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in GEMMS:
        dims = {d for shape in event.input_shapes if shape for d in shape}
        if vocab in dims:
            return "output layer + log-softmax"
        return "LoRA GEMM" if rank in dims else "base GEMM"
    return "element-wise"


def inside(event, ranges) -> str | None:
    for name, start, end in ranges:
        if start <= event.time_range.start and event.time_range.end <= end:
            return name
    return None


def profile_step(cfg, examples, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from dpo_lib.training.step import training_step
    from dpo_lib.training.train import step_outside_a_run

    model, _, state = step_outside_a_run(cfg, examples)
    batch = cfg.train.batch_size
    batches = [[list(range(batch * (step + 1), batch * (step + 2)))] for step in range(steps)]
    # warm-up: the profiled batches themselves, so that the process's memory has grown to their
    # peak before the profile (a step that first reaches a new peak spends seconds in page faults)
    for indices in batches:
        training_step(model, indices, state)
    walls = []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for indices in batches:
            started = time.perf_counter()
            training_step(model, indices, state)
            walls.append(time.perf_counter() - started)
    events = prof.events()
    phases = [(e.name, e.time_range.start, e.time_range.end) for e in events if e.name in PHASES]
    heads = [(e.name, e.time_range.start, e.time_range.end) for e in events
             if e.name == "output_layer"]
    dequantizing = [(e.name, e.time_range.start, e.time_range.end) for e in events
                    if "dequantize" in e.name and e.name.startswith("bitsandbytes::")]
    rank = cfg.model.lora_r
    vocab = state.accelerator.unwrap_model(model).config.vocab_size
    seconds = defaultdict(float)
    flops = defaultdict(float)
    phase_wall = defaultdict(float)
    for name, start, end in phases:
        phase_wall[name] += (end - start) / 1e6
    for event in events:
        if event.name in PHASES or event.name == "output_layer" or not event.name.startswith(
                ("aten::", "bitsandbytes::")):
            continue
        phase = inside(event, phases)
        if phase is None:
            continue
        part = classify(event, rank, vocab, inside(event, heads) is not None,
                        inside(event, dequantizing) is not None)
        seconds[(phase, part)] += event.self_cpu_time_total / 1e6
        if event.name in GEMMS:
            flops[(phase, part)] += gemm_flops(event)
    for phase in PHASES:
        counted = sum(seconds[(phase, part)] for part in PARTS if part != "overhead")
        seconds[(phase, "overhead")] = max(0.0, phase_wall[phase] - counted)
    per_step = {f"{phase}/{part}": seconds[(phase, part)] / steps for phase in PHASES
                for part in PARTS}
    gemm_flop = {f"{phase}/{part}": flops[(phase, part)] / steps for phase in PHASES
                 for part in PARTS if flops[(phase, part)]}
    return {"step_seconds": sum(walls) / steps, "phase_seconds":
            {p: phase_wall[p] / steps for p in PHASES}, "parts": per_step, "gemm_flop": gemm_flop}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default=None, help="the run's profile (default: cpu-hh "
                        "where $DPO_HH_RLHF_DIR is set, else cpu)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    os.environ.setdefault("DPO_PROGRESS", "0")
    import torch

    from dpo_lib.core.batches import load_examples
    from dpo_lib.core.config import load_config
    from dpo_lib.core.models import load_tokenizer
    from trl_compare import matmul_peak_gflops

    profile_name = args.profile or ("cpu-hh" if os.environ.get("DPO_HH_RLHF_DIR") else "cpu")
    cfg = load_config(profile_name, overrides=args.overrides).with_overrides({
        "train.stage": "preference", "train.batch_size": args.batch, "train.warmup_steps": 0,
        "train.lr_scheduler": "constant", "train.init_adapter": None,
        "train.eval_batch_size": 2 * args.batch})
    _, examples, _ = load_examples(cfg, load_tokenizer(cfg), "train",
                                   args.batch * (args.steps + 1))
    peak, what = matmul_peak_gflops()
    result = profile_step(cfg, examples, args.steps)
    step = result["step_seconds"]
    print(f"profile {cfg.profile}, {cfg.model.name} ({cfg.model.quantization}), layout "
          f"{'packed' if cfg.train.shared_prompt else 'plain'}"
          f"{' + chunked head' if cfg.train.chunked_head else ''}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads; GEMM peak {peak:.1f} GFLOP/s ({what})")
    print(f"one step: {step:.2f} s (forward {result['phase_seconds']['forward']:.2f}, backward "
          f"{result['phase_seconds']['backward']:.2f}, optimizer "
          f"{result['phase_seconds']['optimizer']:.2f})")
    header = f"{'part':28} " + " ".join(f"{p:>16}" for p in (*PHASES, "step"))
    print(header)
    total = defaultdict(float)
    for part in PARTS:
        cells = []
        for phase in PHASES:
            s = result["parts"][f"{phase}/{part}"]
            total[part] += s
            cells.append(f"{s:7.2f} s {s / step:6.1%}")
        cells.append(f"{total[part]:7.2f} s {total[part] / step:6.1%}")
        print(f"{part:28} " + " ".join(f"{c:>16}" for c in cells))
    gemm_seconds = sum(total[p] for p in ("base GEMM", "LoRA GEMM"))
    gemm_flop = sum(v for k, v in result["gemm_flop"].items() if "GEMM" in k)
    at_peak = gemm_flop / (peak * 1e9)
    print(f"GEMMs of the blocks (base + LoRA): {gemm_flop / 1e9:.1f} GFLOP in {gemm_seconds:.2f} s "
          f"= {gemm_flop / 1e9 / max(gemm_seconds, 1e-9):.1f} GFLOP/s "
          f"({gemm_flop / 1e9 / max(gemm_seconds, 1e-9) / peak:.0%} of peak)")
    print(f"ceiling: with every block GEMM at the measured peak ({at_peak:.2f} s instead of "
          f"{gemm_seconds:.2f} s) and the rest as it is, a step takes "
          f"{step - gemm_seconds + at_peak:.2f} s ({step / (step - gemm_seconds + at_peak):.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "peak_gflops": peak, "profile":
                                               cfg.profile, "batch": args.batch}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
