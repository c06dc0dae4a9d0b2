"""One trainer for SFT and the preference losses (DPO, cDPO, IPO, RPO, SimPO), built on accelerate.

The same code runs in a notebook (:func:`train`), from the command line::

    dpo-train CONFIG [key=value ...]                             # or: python -m dpo_lib.training.train
    torchrun --nproc_per_node 2 -m dpo_lib.training.train ...    # several processes (DDP; gloo on CPU)
    accelerate launch -m dpo_lib.training.train ...              # several GPUs

:func:`train` reads top to bottom: claim the run folder, load the model and the data, prepare
them, compute the reference log-probs once, then loop over optimizer steps
(:func:`dpo_lib.training.step.training_step`), evaluating and checkpointing as the config says,
and save the adapter. The run folder is described in :mod:`dpo_lib.core.runs`, checkpoints in
:mod:`dpo_lib.training.checkpoints`, the reference pass and its cache in
:mod:`dpo_lib.training.reference`.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..core.batches import batch_indices, load_examples, sft_examples
from ..core.cli import command, parse_run_arguments
from ..core.config import Config, load_config
from ..core.errors import DataError, MissingFileError
from ..core.layouts import grouping_lengths, layout_for, pair_layout
from ..core.losses import REFERENCE_FREE
from ..core.runs import RunResult, mark_complete, read_metrics, run_name
from ..core.scoring import pad_id
from .checkpoints import (MetricsLog, RunFolder, claim_run_folder, latest_checkpoint,
                          load_checkpoint, save_checkpoint)
from .reference import model_revision, reference_cache_key, reference_cache_root, reference_pass
from .step import TrainState, evaluate, make_accelerator, policy_is_reference, \
    prepare_training, total_steps, training_step


def train(cfg: Config, progress: bool = True, keep_model: bool = False) -> RunResult:
    """Run the stage ``cfg.train.stage`` (``sft`` or ``preference``) and return its metrics."""
    from ..core.progress import tqdm

    started = time.perf_counter()
    accelerator = make_accelerator(cfg)
    run = claim_run_folder(cfg, accelerator)
    seed_everything(cfg.seed)
    model, tokenizer, reference_adapter = prepare_model(cfg)
    train_examples, eval_examples = run_examples(cfg, tokenizer)
    model, optimizer, scheduler = prepare_training(cfg, model, accelerator)
    if cfg.train.stage == "preference" and cfg.data.pair_filter:
        train_examples = filter_training_pairs(model, train_examples, cfg, run.path, accelerator,
                                               progress)
    reference, eval_reference = reference_passes(model, train_examples, eval_examples, cfg,
                                                 reference_adapter, run.path, accelerator,
                                                 progress)
    start = load_checkpoint(run.resume_from, model, accelerator) if run.resume_from else 0
    state = TrainState(cfg, accelerator, optimizer, scheduler, layout_for(cfg), train_examples,
                       pad_id(model), reference, lambda: latest_checkpoint(run.path, run.run_id),
                       step=start)
    log = MetricsLog(run.path / "metrics.jsonl", accelerator, cfg, start if start else None)
    plan = BatchPlan(train_examples, cfg, accelerator)
    steps = total_steps(cfg)
    if start == 0 and cfg.train.stage == "preference" and cfg.train.eval_every:
        # before any step the policy is its reference: its held-out rows are the reference's
        known = eval_reference if policy_is_reference(model, reference_adapter) else None
        log.write({"step": 0, "examples": 0,
                   **evaluate(model, eval_examples, cfg, accelerator, eval_reference, known)})
    model.train()
    bar = tqdm(total=steps, initial=start, desc=run_name(cfg),
               disable=not progress or not accelerator.is_local_main_process)
    for step in range(start + 1, steps + 1):
        result = training_step(model, plan.micro_batches(step), state)
        record = {"step": step, "examples": step * plan.examples_per_step, **result.metrics}
        log.write(record)
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{record[k]:.3f}" for k in
                         ("loss", "rewards/accuracies") if k in record})
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == steps):
            log.write({"step": step, "examples": record["examples"],
                       **evaluate(model, eval_examples, cfg, accelerator, eval_reference)})
        if cfg.train.save_every and step % cfg.train.save_every == 0:
            save_checkpoint(run, model, step, accelerator, cfg)
    bar.close()
    log.close()
    finish_run(run, model, tokenizer, accelerator, started, steps, start)
    result = RunResult(run.path, read_metrics(run.path) if accelerator.is_main_process else [])
    if keep_model:
        result.model, result.tokenizer = accelerator.unwrap_model(model), tokenizer
    # Free the DDP wrapper (its reducer holds the process group) while every process is still
    # here; destroying the group first can leave a process waiting for a peer that has exited.
    del model, optimizer, state
    accelerator.free_memory()
    accelerator.end_training()
    return result


# --------------------------------------------------------------------------------------------
# The pieces train() calls, in its order
# --------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """The run's seed drives every random choice that follows: LoRA's initialisation, dropout,
    the data order (through :class:`BatchPlan`)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def prepare_model(cfg: Config):
    """The profile's (quantized) model with a trainable LoRA adapter, its tokenizer, and the
    reference adapter (None: the base model is the reference).

    Preference runs with ``train.init_adapter`` start from that SFT run's adapter (the reference
    is then the SFT model); without one, the adapter starts at zero and the reference is the base
    model with adapters disabled.
    """
    from ..core.models import load_model, load_tokenizer
    from ..core.lora import add_lora, load_trainable_adapter

    tokenizer = load_tokenizer(cfg)
    base = load_model(cfg)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    if cfg.train.shared_prompt:
        from ..core.layouts import attention_implementation

        attention_implementation(base)     # refuses kernels that ignore a 4-D mask, before work
    init = cfg.train.init_adapter
    if cfg.train.stage == "preference" and init:
        adapter = Path(init) / "adapter" if (Path(init) / "adapter").is_dir() else Path(init)
        if not (adapter / "adapter_config.json").is_file():
            raise MissingFileError(f"init_adapter: no adapter in {init} (run the SFT stage "
                                   "first: notebook 03 or `dpo-train cpu stage=sft`)")
        return load_trainable_adapter(base, cfg, adapter), tokenizer, adapter
    return add_lora(base, cfg), tokenizer, None


def run_examples(cfg: Config, tokenizer) -> tuple[list, list]:
    """The tokenized training examples (SFT: prompt + chosen answer) and the held-out pairs the
    in-run evaluation reads (``data.eval_split``: test, or dev for choices)."""
    _, train_examples, _ = load_examples(cfg, tokenizer, "train", cfg.data.train_limit)
    _, eval_examples, _ = load_examples(cfg, tokenizer, cfg.data.eval_split, cfg.data.test_limit)
    if cfg.train.stage == "sft":
        train_examples = sft_examples(train_examples)
    if len(train_examples) < cfg.train.batch_size:
        raise DataError(f"{len(train_examples)} training examples do not fill one batch of "
                        f"{cfg.train.batch_size}")
    return train_examples, eval_examples


def filter_training_pairs(model, examples, cfg: Config, folder: Path, accelerator,
                          progress: bool = True) -> list:
    """The training pairs left after ``data.pair_filter`` drops some (:mod:`dpo_lib.training.ches`):
    ``ches`` or ``random`` drop ``data.pair_filter_share`` of them (``ches``: scored with the model
    training starts from), ``file`` the indices ``data.pair_filter_file`` names. Writes
    ``pair_filter.json`` (every pair's scores where scored, the dropped indices) into the run
    folder."""
    from . import ches

    how, share = cfg.data.pair_filter, float(cfg.data.pair_filter_share)
    scores, named, extra = None, None, {}
    if how == "ches":
        sums = ches.answer_hidden_sums(model, examples, pair_layout(cfg),
                                       cfg.train.eval_batch_size, accelerator, progress)
        scores = ches.ches_scores(**sums)
    elif how == "file":
        path = Path(cfg.data.pair_filter_file)
        named = ches.read_drop_file(path, len(examples), str(cfg.data.source))
        extra = {"file": str(path)}
    kept = ches.filter_pairs(len(examples), share, how,
                             None if scores is None else scores[ches.FILTER_SCORE], cfg.seed,
                             dropped=named)
    if accelerator.is_main_process:
        record = {"pair_filter": how, "share": share, **extra, "pool": len(examples),
                  "kept": len(kept), "dropped": sorted(set(range(len(examples))) - set(kept)),
                  "score": ches.FILTER_SCORE if scores is not None else None,
                  **({name: values.tolist() for name, values in scores.items()} if scores else {})}
        (folder / "pair_filter.json").write_text(json.dumps(record) + "\n")
    return [examples[i] for i in kept]


def reference_passes(model, train_examples, eval_examples, cfg: Config, reference_adapter,
                     folder: Path, accelerator, progress: bool = True):
    """The reference log-probs of the training and the held-out pairs (the prepared model, its
    adapter off unless it started from an SFT adapter, under the run's autocast), each cached;
    ``(None, None)`` for SFT and for a reference-free loss (simpo); the held-out pass is skipped
    (``None``) when the run never evaluates (``eval_every: 0``). Writes ``reference_pass.json``
    (pairs, seconds, whether the cache answered) and the cache keys."""
    if cfg.train.stage == "sft" or cfg.train.loss_type in REFERENCE_FREE:
        return None, None
    cache_root, timing, values = reference_cache_root(), {}, []
    revision = model_revision(accelerator.unwrap_model(model))
    passes = [("train", train_examples)] + ([("eval", eval_examples)] if cfg.train.eval_every else [])
    for name, examples in passes:
        key = reference_cache_key(cfg, examples, reference_adapter, revision)
        cached = (cache_root / f"{key}.pt").is_file()
        started = time.perf_counter()
        values.append(reference_pass(model, examples, pair_layout(cfg), cfg.train.eval_batch_size,
                                     accelerator, cache_file=cache_root / f"{key}.pt",
                                     use_adapter=reference_adapter is not None,
                                     progress=progress))
        timing[name] = {"pairs": len(examples), "cached": cached,
                        "seconds": time.perf_counter() - started}
        if accelerator.is_main_process:
            (folder / f"reference_{name}.key").write_text(key + "\n")
    if accelerator.is_main_process:
        (folder / "reference_pass.json").write_text(json.dumps(timing, indent=1) + "\n")
    accelerator.wait_for_everyone()
    return values[0], (values[1] if len(values) > 1 else None)


def step_outside_a_run(cfg: Config, examples, progress: bool = False):
    """The trainer's set-up without a run folder, for taking its step by hand (the memory
    benchmark, the GPU tests, notebook 06): the seed, the model with LoRA
    (:func:`prepare_model`), the prepared model, optimizer and schedule, and the reference pass
    over ``examples`` (cached nowhere). Returns ``(model, tokenizer, state)``; then
    ``training_step(model, [indices, ...], state)`` is the trainer's step on ``examples``."""
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)
    model, tokenizer, reference_adapter = prepare_model(cfg)
    model, optimizer, scheduler = prepare_training(cfg, model, accelerator)
    reference = None
    if cfg.train.stage == "preference" and cfg.train.loss_type not in REFERENCE_FREE:
        reference = reference_pass(model, examples, pair_layout(cfg), cfg.train.eval_batch_size,
                                   accelerator, use_adapter=reference_adapter is not None,
                                   progress=progress)
    model.train()
    return model, tokenizer, TrainState(cfg, accelerator, optimizer, scheduler, layout_for(cfg),
                                        list(examples), pad_id(model), reference)


class BatchPlan:
    """Which examples each micro-batch of each optimizer step holds, on each process.

    Micro-batch ``number`` counts over all processes and steps; epoch ``e`` is shuffled by
    ``(seed, e)`` and grouped by the length of a row in the run's layout
    (:func:`dpo_lib.core.batches.batch_indices`, :func:`dpo_lib.core.layouts.grouping_lengths`), so
    a resumed run, or one split over another number of processes with the same total accumulation,
    sees the same batches."""

    def __init__(self, examples, cfg: Config, accelerator):
        self.examples, self.cfg = examples, cfg
        self.lengths = grouping_lengths(cfg, examples)
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.accumulation = cfg.train.gradient_accumulation_steps
        self.per_epoch = len(examples) // cfg.train.batch_size
        self.examples_per_step = self.accumulation * self.world * cfg.train.batch_size
        self._epoch: tuple[int, list] | None = None

    def indices(self, number: int) -> list[int]:
        epoch, position = divmod(number, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, batch_indices(self.examples, self.cfg.train.batch_size,
                                                self.cfg.train.group_by_length,
                                                seed=self.cfg.seed * 1000 + epoch,
                                                lengths=self.lengths))
        return self._epoch[1][position]

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches (example indices) of optimizer step ``step`` (from 1)."""
        per_step = self.accumulation * self.world
        return [self.indices((step - 1) * per_step + micro * self.world + self.rank)
                for micro in range(self.accumulation)]


def finish_run(run: RunFolder, model, tokenizer, accelerator, started: float, steps: int,
               start: int) -> None:
    """The final adapter, ``run_time.json`` (the whole call: loading, filtering, reference pass,
    steps, evaluations; ``metrics.jsonl`` has the steps alone) and ``run.json`` marked complete."""
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(run.path / "adapter")
        tokenizer.save_pretrained(run.path / "adapter")
        (run.path / "run_time.json").write_text(json.dumps(
            {"wall_seconds": time.perf_counter() - started, "steps": steps,
             "resumed_from_step": start}) + "\n")
        mark_complete(run.path, run.record)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

@command("dpo-train")
def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="dpo-train",
        description="Train SFT or a preference loss from a config file. CONFIG is a profile "
                    "(tiny, cpu, gpu, auto) or a YAML recipe; key=value pairs override single "
                    "keys (dotted, or a unique leaf name: output_dir=runs/x loss_type=ipo).")
    parser.add_argument("config")
    args = parse_run_arguments(parser, argv)
    cfg = load_config(args.config, overrides=args.overrides)
    result = train(cfg, progress=not args.no_progress)
    if result.metrics:
        last = [m for m in result.metrics if "loss" in m][-1]
        print(f"done: {result.output_dir} (step {last['step']}, loss {last['loss']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
