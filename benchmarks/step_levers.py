"""Speed levers on the trainer's own step, each on its own: seconds per step and the losses.

    python benchmarks/step_levers.py default            # the step as the profile takes it
    python benchmarks/step_levers.py peft-lora          # peft's forward (model.fused_lora false)
    python benchmarks/step_levers.py dequantized-cache  # frozen NF4 base dequantized once, fp32
    python benchmarks/step_levers.py compile-blocks     # torch.compile of each decoder block
    MALLOC_ARENA_MAX=2 python benchmarks/step_levers.py default   # allocator / thread settings
    python benchmarks/step_levers.py default --profile cpu-hh --steps 3 --batch 8

Sets the run up as the trainer does (:func:`dpo_lib.training.train.step_outside_a_run`, DPO from
a fresh adapter, constant learning rate), takes one warm-up step (it includes any compile time),
then ``--steps`` timed steps of :func:`dpo_lib.training.step.training_step` on the next pairs,
printing each step's seconds, loss and chosen log-prob. The same command with ``default`` gives
the numbers to compare with: the same pairs, the same seed, so the losses must agree to float
tolerance for a lever that is numerically the same. ``benchmarks/RESULTS.md`` (issue 29) holds
what each lever measured. One paid and is the default: LoRA's products added into the base
layer's output (``model.fused_lora``, :func:`dpo_lib.core.lora.fuse_lora_products`); ``peft-lora``
is the step without it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DPO_PROGRESS", "0")

LEVERS = ("default", "peft-lora", "dequantized-cache", "compile-blocks")


def cache_dequantized_base(model) -> int:
    """Replace every bitsandbytes 4-bit linear layer's forward by a plain linear over its weight
    dequantized once (fp32, a buffer): the same numbers, no dequantization per pass. Returns the
    number of layers changed."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional
    import torch

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            module.register_buffer("dequantized_weight", weight.to(torch.float32), persistent=False)
            module.forward = types.MethodType(
                lambda self, x: torch.nn.functional.linear(x, self.dequantized_weight, self.bias),
                module)
            changed += 1
    return changed


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
    args = parser.parse_args(argv)

    from dpo_lib.core.batches import load_examples
    from dpo_lib.core.config import load_config
    from dpo_lib.core.models import load_tokenizer
    from dpo_lib.training.step import training_step
    from dpo_lib.training.train import step_outside_a_run

    cfg = load_config(args.profile).with_overrides({
        "train.stage": "preference", "train.batch_size": args.batch, "train.warmup_steps": 0,
        "train.lr_scheduler": "constant", "train.init_adapter": None,
        "model.fused_lora": args.lever != "peft-lora"})
    _, examples, _ = load_examples(cfg, load_tokenizer(cfg), "train", args.batch * (args.steps + 1))
    model, _, state = step_outside_a_run(cfg, examples)
    if args.lever == "dequantized-cache":
        print(f"dequantized-cache: {cache_dequantized_base(model)} layers")
    elif args.lever == "compile-blocks":
        print(f"compile-blocks: {compile_blocks(model, state.accelerator)} blocks")
    batches = [list(range(args.batch * s, args.batch * (s + 1))) for s in range(args.steps + 1)]
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
