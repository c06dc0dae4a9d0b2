"""One trainer for SFT and the preference losses (DPO, cDPO, IPO), built on accelerate.

The same code runs in a notebook (:func:`train`), from the command line::

    dpo-train CONFIG [key=value ...]                    # or: python -m dpo_lib.train ...
    torchrun --nproc_per_node 2 -m dpo_lib.train ...    # several processes (DDP; gloo on CPU)
    accelerate launch -m dpo_lib.train ...              # several GPUs

One optimizer step: each micro-batch goes through :func:`dpo_lib.steps.preference_step_outputs`
(or :func:`dpo_lib.forward.sft_nll`), the gradients are clipped, the optimizer and scheduler step,
and the step's rows are gathered from every process into the logged metrics. The run folder
(config, ``metrics.jsonl``, checkpoints, the final adapter) is described in :mod:`dpo_lib.runs`;
the reference pass and its cache in :mod:`dpo_lib.reference`.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from . import data as data_lib
from . import packing
from .cli import command
from .batches import (batch_indices, collate_sft, real_tokens, sft_examples,
                      tokenize_pairs)
from .config import Config, load_config, mixed_precision, require_device
from .losses import REFERENCE_FREE
from .forward import collate_pairs, pad_id, sft_nll, to_device
from .logps import answer_counts
from .reference import (model_revision, precompute_reference_logps, reference_cache_key,
                        reference_cache_root)
from .runs import (MetricsLog, RunResult, latest_checkpoint, load_checkpoint, output_dir,
                   read_metrics, resume_checkpoint, run_name, save_checkpoint)
from .steps import PreferenceRows, average_logps, evaluate, preference_step_outputs


class NonFiniteLossError(FloatingPointError):
    """A NaN or inf loss stopped the run; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------
# Set-up pieces
# --------------------------------------------------------------------------------------------

def make_accelerator(cfg: Config):
    from accelerate import Accelerator

    require_device(cfg, "training")
    precision = mixed_precision(cfg)
    if precision != "no" and not torch.cuda.is_available():
        raise ValueError(f"mixed_precision={precision} needs a GPU here; use 'no' or 'auto' on CPU")
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def learning_rate(cfg: Config) -> float:
    """The stage's peak learning rate: ``preference_learning_rate`` (when set) for preference
    runs, ``learning_rate`` otherwise."""
    preference = cfg.train.preference_learning_rate
    if cfg.train.stage == "preference" and preference is not None:
        return float(preference)
    return float(cfg.train.learning_rate)


def make_optimizer(cfg: Config, parameters):
    name = cfg.train.optimizer
    kwargs = dict(lr=learning_rate(cfg), weight_decay=cfg.train.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, **kwargs)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        if not torch.cuda.is_available():
            raise ValueError(f"optimizer={name} needs CUDA (bitsandbytes' 8-bit optimizers); "
                             "use optimizer=adamw on CPU")
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        return cls(parameters, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, adamw_8bit or paged_adamw_8bit")


def load_examples(cfg: Config, tokenizer, split: str, limit: int):
    """Tokenized preference examples of one split, and the row accounting."""
    pairs, report = data_lib.load_split(cfg, split, limit)
    if not pairs:
        raise ValueError(f"no usable pairs in {cfg.data.source} ({split}): {dict(report)}")
    examples, _ = tokenize_pairs(pairs, tokenizer, cfg.data.max_length,
                                cfg.data.max_prompt_length)
    return pairs, examples, report


def micro_batches(examples, cfg: Config, epoch: int) -> list[list[int]]:
    """The epoch's micro-batches of example indices: shuffled by (seed, epoch), length-grouped."""
    return batch_indices(examples, cfg.train.batch_size, cfg.train.group_by_length,
                         seed=cfg.seed * 1000 + epoch)


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------

def prepare_model(cfg: Config, progress: bool = True):
    """The profile's quantized model with a trainable LoRA adapter, and its tokenizer.

    Preference runs with ``train.init_adapter`` start from that SFT run's adapter (the reference
    is then the SFT model); without one, the adapter starts at zero and the reference is the
    base model with adapters disabled.
    """
    from .models import add_lora, load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg)
    base = load_model(cfg)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    init = cfg.train.init_adapter
    if cfg.train.stage == "preference" and init:
        adapter = Path(init) / "adapter" if (Path(init) / "adapter").is_dir() else Path(init)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"init_adapter: no adapter in {init} (run the SFT stage "
                                    "first: notebook 03 or `python -m dpo_lib.train sft`)")
        return _load_trainable_adapter(base, cfg, adapter), tokenizer, adapter
    return add_lora(base, cfg), tokenizer, None


def _load_trainable_adapter(base, cfg: Config, adapter: Path):
    """``base`` with a saved LoRA adapter, trainable (as :func:`dpo_lib.models.add_lora` prepares)."""
    from peft import PeftModel, prepare_model_for_kbit_training

    from .models import is_quantized, set_gradient_checkpointing

    if is_quantized(base):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    set_gradient_checkpointing(base, cfg.model.gradient_checkpointing)
    return PeftModel.from_pretrained(base, adapter, is_trainable=True)


def train(cfg: Config, progress: bool = True, keep_model: bool = False) -> RunResult:
    """Run the stage ``cfg.train.stage`` (``sft`` or ``preference``) and return its metrics."""
    from .progress import tqdm
    from transformers import get_scheduler

    run_started = time.perf_counter()
    stage = cfg.train.stage
    if stage not in ("sft", "preference"):
        raise ValueError(f"train.stage={stage!r}: choose sft or preference")
    accelerator = make_accelerator(cfg)
    folder = output_dir(cfg)
    resume_from = resume_checkpoint(cfg, folder)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        cfg.save(folder / "config.yaml")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    model, tokenizer, reference_adapter = prepare_model(cfg, progress)
    if cfg.train.shared_prompt:
        packing.attention_implementation(model)     # refuses kernels that ignore a 4-D mask
    _, train_examples, _ = load_examples(cfg, tokenizer, "train", cfg.data.train_limit)
    _, eval_examples, _ = load_examples(cfg, tokenizer, "test", cfg.data.test_limit)
    if stage == "sft":
        train_examples = sft_examples(train_examples)
    elif cfg.data.pair_filter:
        train_examples = filter_training_pairs(model, train_examples, cfg, folder, accelerator,
                                               progress)
    total_steps = cfg.train.sft_steps if stage == "sft" else cfg.train.preference_steps

    reference = eval_reference = None
    # a reference-free loss (simpo) has no reference pass and no reference model
    if stage == "preference" and cfg.train.loss_type not in REFERENCE_FREE:
        cache_root = reference_cache_root()
        timing = {}
        for name, examples in (("train", train_examples), ("eval", eval_examples)):
            key = reference_cache_key(cfg, examples, reference_adapter, model_revision(model))
            cached = (cache_root / f"{key}.pt").is_file()
            reference_started = time.perf_counter()
            values = precompute_reference_logps(
                model, examples, cfg.train.eval_batch_size, accelerator,
                cache_file=cache_root / f"{key}.pt", use_adapter=reference_adapter is not None,
                progress=progress, shared=cfg.train.shared_prompt,
                chunked=cfg.train.chunked_head)
            if name == "train":
                reference = values
            else:
                eval_reference = values
            timing[name] = {"pairs": len(examples), "cached": cached,
                            "seconds": time.perf_counter() - reference_started}
            if accelerator.is_main_process:
                (folder / f"reference_{name}.key").write_text(key + "\n")
        if accelerator.is_main_process:
            (folder / "reference_pass.json").write_text(json.dumps(timing, indent=1) + "\n")
        accelerator.wait_for_everyone()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, trainable)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer,
                              num_warmup_steps=cfg.train.warmup_steps,
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Checkpoints through accelerate's save_state/load_state: the scheduler is registered (not
    # prepared, which would step it once per process), and the frozen base model's weights are
    # left out (the adapter is saved beside them).
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())

    start_step = 0
    if resume_from is not None:
        start_step = load_checkpoint(resume_from, model, accelerator)
    log = MetricsLog(folder / "metrics.jsonl", accelerator, cfg,
                     start_step if resume_from is not None else None)

    accumulation, world = cfg.train.gradient_accumulation_steps, accelerator.num_processes
    per_step = accumulation * world          # micro-batches per optimizer step, all processes
    if stage == "sft":
        collate = collate_sft
    else:
        def collate(examples, pad):
            return collate_pairs(examples, pad, cfg.train.shared_prompt)
    pad = pad_id(accelerator.unwrap_model(model))
    epoch_batches: dict[int, list] = {}

    def micro_batch(number: int) -> list[int]:
        per_epoch = len(train_examples) // cfg.train.batch_size
        if per_epoch == 0:
            raise ValueError(f"{len(train_examples)} training examples do not fill one batch of "
                             f"{cfg.train.batch_size}")
        epoch, position = divmod(number, per_epoch)
        if epoch not in epoch_batches:
            epoch_batches.clear()
            epoch_batches[epoch] = micro_batches(train_examples, cfg, epoch)
        return epoch_batches[epoch][position]

    if start_step == 0 and stage == "preference" and cfg.train.eval_every:
        log.write({"step": 0, "examples": 0,
                   **evaluate(model, eval_examples, cfg, accelerator, eval_reference)})
    model.train()
    bar = tqdm(total=total_steps, initial=start_step, desc=run_name(cfg),
               disable=not progress or not accelerator.is_local_main_process)
    metrics: dict = {}
    for step in range(start_step + 1, total_steps + 1):
        started = time.perf_counter()
        rows, tokens, positions = [], 0, 0
        numbers = [(step - 1) * per_step + micro * world + accelerator.process_index
                   for micro in range(accumulation)]
        step_indices = [micro_batch(number) for number in numbers]
        step_batches = [collate([train_examples[i] for i in indices], pad)
                        for indices in step_indices]
        if stage == "sft":  # the tokens of the whole optimizer step, all micro-batches and processes
            step_tokens = sft_step_tokens(step_batches, accelerator)
        for micro, (indices, batch) in enumerate(zip(step_indices, step_batches)):
            batch = to_device(batch, accelerator.device)
            batch_tokens, batch_positions = real_tokens(batch)
            tokens, positions = tokens + batch_tokens, positions + batch_positions
            sync = micro == accumulation - 1
            context = accelerator.no_sync(model) if not sync else nullcontext()
            with context, accelerator.autocast():
                if stage == "sft":
                    nll, counts = sft_nll(model, batch, cfg.train.chunked_head)
                    rows.append(torch.stack([nll.detach(), counts], dim=1))
                    # the step's token mean: summed NLL over the step's tokens on all processes
                    # (times the processes, as DDP averages gradients over them): the same
                    # gradient for any split of the step into micro-batches and processes
                    loss = nll.sum() / step_tokens * world
                else:
                    losses, step_rows = preference_step_outputs(model, batch, reference,
                                                                indices, cfg)
                    loss = losses.mean() / accumulation
                    rows.append(step_rows.rows())
                stop_if_not_finite(loss, step, micro, indices, folder, accelerator)
                accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16: the GradScaler skipped the step
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        local = torch.cat(rows).to(accelerator.device)
        gathered = accelerator.gather(local).cpu() if world > 1 else local.cpu()
        tokens_all = int(accelerator.gather(torch.tensor([tokens], device=accelerator.device))
                         .sum()) if world > 1 else tokens
        if stage == "sft":
            metrics = {"loss": (gathered[:, 0].sum() / gathered[:, 1].sum()).item()}
        else:
            metrics = PreferenceRows.from_rows(gathered).metrics(average_logps(cfg))
        record = {"step": step, "examples": step * per_step * cfg.train.batch_size, **metrics,
                  "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                  "tokens_per_second": tokens_all / (time.perf_counter() - started),
                  "step_seconds": time.perf_counter() - started,
                  "padding_fraction": 1 - tokens / max(positions, 1)}
        log.write(record)
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{record[k]:.3f}" for k in
                         ("loss", "rewards/accuracies") if k in record})
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == total_steps):
            log.write({"step": step, "examples": record["examples"],
                       **evaluate(model, eval_examples, cfg, accelerator, eval_reference)})
        if cfg.train.save_every and step % cfg.train.save_every == 0:
            save_checkpoint(folder, model, optimizer, scheduler, step, accelerator, cfg)
    bar.close()
    log.close()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(folder / "adapter")
        tokenizer.save_pretrained(folder / "adapter")
        # the whole call: loading, filtering, reference pass, steps, evaluations (metrics.jsonl
        # has the steps alone: step_seconds)
        (folder / "run_time.json").write_text(json.dumps(
            {"wall_seconds": time.perf_counter() - run_started, "steps": total_steps,
             "resumed_from_step": start_step}) + "\n")
    accelerator.wait_for_everyone()
    result = RunResult(folder, read_metrics(folder) if accelerator.is_main_process else [])
    if keep_model:
        result.model, result.tokenizer = accelerator.unwrap_model(model), tokenizer
    # Free the DDP wrapper (its reducer holds the process group) while every process is still
    # here; destroying the group first can leave a process waiting for a peer that has exited.
    del model, optimizer
    accelerator.free_memory()
    accelerator.end_training()
    return result


def filter_training_pairs(model, examples, cfg: Config, folder: Path, accelerator,
                          progress: bool = True) -> list:
    """The training pairs left after ``data.pair_filter`` (``ches`` or ``random``) drops
    ``data.pair_filter_share`` of them, scored with the model training starts from
    (:mod:`dpo_lib.ches`). Writes ``pair_filter.json`` (every pair's scores, the dropped indices)
    into the run folder."""
    from . import ches

    how, share = cfg.data.pair_filter, float(cfg.data.pair_filter_share)
    scores = None
    if how == "ches":
        sums = ches.answer_hidden_sums(accelerator.unwrap_model(model), examples,
                                       cfg.train.eval_batch_size, pad_id(model), progress)
        scores = ches.ches_scores(**sums)
    kept = ches.filter_pairs(len(examples), share, how,
                             None if scores is None else scores[ches.FILTER_SCORE], cfg.seed)
    if accelerator.is_main_process:
        record = {"pair_filter": how, "share": share, "pool": len(examples), "kept": len(kept),
                  "dropped": sorted(set(range(len(examples))) - set(kept)),
                  "score": ches.FILTER_SCORE if scores is not None else None,
                  **({name: values.tolist() for name, values in scores.items()} if scores else {})}
        (folder / "pair_filter.json").write_text(json.dumps(record) + "\n")
    return [examples[i] for i in kept]


def sft_step_tokens(batches, accelerator) -> int:
    """Answer tokens (labels other than -100 after the shift) in one optimizer step's SFT
    micro-batches, summed over every process."""
    tokens = sum(int(answer_counts(batch["labels"][:, 1:]).sum()) for batch in batches)
    if accelerator.num_processes > 1:
        tokens = int(accelerator.reduce(torch.tensor([tokens], device=accelerator.device),
                                        "sum").item())
    return tokens


def stop_if_not_finite(loss: torch.Tensor, step: int, micro: int, indices, folder: Path,
                       accelerator) -> None:
    """Raise :class:`NonFiniteLossError` on every process when the loss is NaN or inf on any.

    With several processes they first agree (one all-reduce of a flag per micro-batch), so that
    none raises while the others wait for it in the gradient all-reduce; all then raise the same
    error, naming each process that saw a non-finite loss.
    """
    bad = not bool(torch.isfinite(loss.detach()).all())
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(bad)], device=accelerator.device)
        if accelerator.reduce(flag, "sum").item() == 0:
            return
        from accelerate.utils import gather_object

        seen = gather_object([(accelerator.process_index, loss.item(), list(indices))])
    elif not bad:
        return
    else:
        seen = [(0, loss.item(), list(indices))]
    where = "; ".join(f"rank {rank}: loss {value}, examples {examples}"
                      for rank, value, examples in seen if not math.isfinite(value))
    kept = latest_checkpoint(folder)
    raise NonFiniteLossError(
        f"non-finite loss at step {step} (micro-batch {micro}; {where}); every process stopped. "
        f"Last good checkpoint: {kept if kept else 'none yet'}. Lower the learning rate, check the "
        f"data, or use fp32/bf16 instead of fp16.")


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
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, overrides=args.overrides)
    result = train(cfg, progress=not args.no_progress)
    if result.metrics:
        last = [m for m in result.metrics if "loss" in m][-1]
        print(f"done: {result.output_dir} (step {last['step']}, loss {last['loss']:.4f})")
    return 0



if __name__ == "__main__":
    sys.exit(main())
