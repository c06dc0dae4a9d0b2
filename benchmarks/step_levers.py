"""Speed levers on the trainer's own step, each on its own: seconds per step and the losses.

    python benchmarks/step_levers.py default            # the step as the profile takes it
    python benchmarks/step_levers.py peft-lora          # peft's forward (model.fused_lora false)
    python benchmarks/step_levers.py dequantized-cache  # frozen NF4 base dequantized once, fp32
    python benchmarks/step_levers.py recompute-head     # output layer recomputed in backward
    python benchmarks/step_levers.py compile-blocks     # torch.compile of each decoder block
    MALLOC_ARENA_MAX=2 python benchmarks/step_levers.py default   # allocator / thread settings
    python benchmarks/step_levers.py default --profile cpu-hh --steps 3 --batch 8
    python benchmarks/step_levers.py recompute-head --paired --steps 8   # A/B in one process

Sets the run up as the trainer does (:func:`dpo_lib.training.train.step_outside_a_run`, DPO from
a fresh adapter, constant learning rate), takes one warm-up step (it includes any compile time),
then ``--steps`` timed steps of :func:`dpo_lib.training.step.training_step` on the next pairs,
printing each step's seconds, loss and chosen log-prob. The same command with ``default`` gives
the numbers to compare with: the same pairs, the same seed, so the losses must agree to float
tolerance for a lever that is numerically the same. ``--paired`` times a lever that can be
switched on a built model (``peft-lora``, ``dequantized-cache``, ``recompute-head``, ``heap``,
``flush-denormal``) against the step without it in one process: a warm-up over every batch both
ways, then each batch taken with and without it in alternating order (ABBA), so that the
machine's drift between runs (10 % and more on shared 2-core machines) falls out of the ratio;
its losses are not comparable (the steps train the model). ``benchmarks/RESULTS.md`` (issue 29)
holds what each lever measured. Two paid and are the default: LoRA's products added into the
base layer's output (``model.fused_lora``, :func:`dpo_lib.core.lora.fuse_lora_products`;
``peft-lora`` is the step without it) and the output layer's softmax kept for backward on a CPU
(``logps.SAVED_SOFTMAX_ELEMENTS``; ``recompute-head`` is the step without it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DPO_PROGRESS", "0")

LEVERS = ("default", "peft-lora", "dequantized-cache", "recompute-head", "heap",
          "flush-denormal", "compile-blocks")


def cache_dequantized_base(model, on: bool = True) -> int:
    """The frozen NF4 base dequantized once (fp32) for the fused training forwards and backwards
    (:func:`dpo_lib.core.lora._base_weight` reads a copy made at its first call) instead of at
    every pass: the same numbers. ``on=False`` restores the per-pass dequantization. Returns the
    number of 4-bit layers."""
    import bitsandbytes as bnb

    from dpo_lib.core import lora

    per_pass = getattr(cache_dequantized_base, "per_pass", lora._base_weight)
    cache_dequantized_base.per_pass = per_pass
    copies = {}

    def once(layer, dtype):
        if getattr(layer.weight, "quant_state", None) is None:
            return per_pass(layer, dtype)
        if (id(layer), dtype) not in copies:
            copies[id(layer), dtype] = per_pass(layer, dtype)
        return copies[id(layer), dtype]

    lora._base_weight = once if on else per_pass
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def switch(lever: str, model, on: bool) -> None:
    """Turn a lever on or off on a built model (``--paired``)."""
    from dpo_lib.core import logps
    from dpo_lib.core.lora import fuse_lora_products

    if lever == "peft-lora":
        if on:
            for module in model.modules():
                vars(module).pop("forward", None)
        else:
            fuse_lora_products(model)
    elif lever == "dequantized-cache":
        cache_dequantized_base(model, on)
    elif lever == "recompute-head":
        logps.SAVED_SOFTMAX_ELEMENTS = 0 if on else switch.saved_softmax
    elif lever == "flush-denormal":
        import torch

        torch.set_flush_denormal(on)
    elif lever == "heap":                   # glibc: large tensors from the heap, kept when freed
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 2**31 - 1 if on else 32 << 20)          # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**31 - 1 if on else 128 << 10)         # M_TRIM_THRESHOLD
    else:
        raise SystemExit(f"--paired: {lever} cannot be switched on a built model")


def paired(lever: str, model, state, batches) -> None:
    """Each batch with and without ``lever``, in ABBA order after a warm-up over all of them both
    ways; prints the times and their ratio."""
    import statistics

    from dpo_lib.training.step import training_step

    # warm-up: every batch once each way, so that the process's memory has reached the peak of
    # both before any timing (a step that first grows it spends seconds in page faults)
    for batch in batches:
        for on in (True, False):
            switch(lever, model, on)
            training_step(model, [batch], state)
    times = {True: [], False: []}
    for index, batch in enumerate(batches):
        for on in ((False, True) if index % 2 else (True, False)):
            switch(lever, model, on)
            started = time.perf_counter()
            training_step(model, [batch], state)
            seconds = time.perf_counter() - started
            times[on].append(seconds)
            print(f"batch {index}, {lever} {'on' if on else 'off'}: {seconds:.2f} s")
    ratios = [off / on for on, off in zip(times[True], times[False])]
    print(f"{lever}: {statistics.mean(times[True]):.2f} s per step on, "
          f"{statistics.mean(times[False]):.2f} s off; off/on per batch: median "
          f"{statistics.median(ratios):.3f}x, mean {statistics.mean(ratios):.3f}x (min "
          f"{min(ratios):.3f}, max {max(ratios):.3f}; of {len(ratios)} batches: "
          f"{tally(ratios)})")


def tally(ratios: list[float], tie: float = 0.005) -> str:
    """How many off/on ratios say the lever is faster, slower, or within ``tie`` of even (a
    difference the step's timer does not resolve is not a win)."""
    faster = sum(r > 1 + tie for r in ratios)
    slower = sum(r < 1 - tie for r in ratios)
    return (f"on faster in {faster}, off faster in {slower}, within {tie:.1%} in "
            f"{len(ratios) - faster - slower}")


def compile_blocks(model, accelerator) -> int:
    """``torch.compile`` (dynamic shapes) of each decoder block's forward; returns the count."""
    import torch

    layers = accelerator.unwrap_model(model).get_base_model().model.layers
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)
    return len(layers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("lever", choices=LEVERS)
    parser.add_argument("--profile", default="cpu-hh")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--paired", action="store_true",
                        help="time the lever against the step without it, batch by batch")
    args = parser.parse_args(argv)

    from dpo_lib.core.batches import load_examples
    from dpo_lib.core.config import load_config
    from dpo_lib.core.models import load_tokenizer
    from dpo_lib.training.step import training_step
    from dpo_lib.training.train import step_outside_a_run

    cfg = load_config(args.profile).with_overrides({
        "train.stage": "preference", "train.batch_size": args.batch, "train.warmup_steps": 0,
        "train.lr_scheduler": "constant", "train.init_adapter": None,
        "model.fused_lora": args.paired or args.lever != "peft-lora"})
    if args.lever == "recompute-head" and not args.paired:
        from dpo_lib.core import logps

        logps.SAVED_SOFTMAX_ELEMENTS = 0
    _, examples, _ = load_examples(cfg, load_tokenizer(cfg), "train", args.batch * (args.steps + 1))
    model, _, state = step_outside_a_run(cfg, examples)
    if args.lever in ("dequantized-cache", "heap") and not args.paired:
        switch(args.lever, model, True)
    elif args.lever == "compile-blocks":
        print(f"compile-blocks: {compile_blocks(model, state.accelerator)} blocks")
    batches = [list(range(args.batch * s, args.batch * (s + 1))) for s in range(args.steps + 1)]
    if args.paired:
        from dpo_lib.core import logps

        switch.saved_softmax = logps.SAVED_SOFTMAX_ELEMENTS
        paired(args.lever, model, state, batches)
        return 0
    times = []
    for step, batch in enumerate(batches):
        started = time.perf_counter()
        metrics = training_step(model, [batch], state).metrics
        seconds = time.perf_counter() - started
        times += [seconds] if step else []
        print(f"{args.lever} {'warm-up' if step == 0 else f'step {step}'}: {seconds:.2f} s, "
              f"loss {metrics['loss']:.6f}, chosen log-prob {metrics['logps/chosen']:.4f}")
    print(f"{args.lever}: {sum(times) / len(times):.2f} s per step over {len(times)} steps "
          f"({args.profile}, {args.batch} pairs a step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
