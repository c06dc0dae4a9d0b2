"""One optimizer step of either stage, and held-out evaluation: the one step that the trainer,
the memory benchmark, the GPU tests and notebook 06 all take.

::

    accelerator = make_accelerator(cfg)
    model, optimizer, scheduler = prepare_training(cfg, model, accelerator)
    state = TrainState(cfg, accelerator, optimizer, scheduler, layout_for(cfg), examples,
                       pad_id(model), reference)
    result = training_step(model, [[0, 5, 3, 9], [2, 7, 1, 4]], state)     # -> StepResult

:func:`training_step` takes each micro-batch (indices into ``state.examples``): the reference's
rows of those pairs, the batch collated in the run's layout, the forward pass and the loss
(:func:`micro_batch_loss`: the SFT stage's token-mean NLL, or a preference loss against the
cached reference log-probs), backward (gradients synchronised across processes on the last
micro-batch only), then checks that the loss and the
gradient norm are finite on every process before anything changes, clips, and steps the optimizer
and the learning-rate schedule. A non-finite step raises :class:`NonFiniteStepError` before the
optimizer step, so no weight and no checkpoint ever comes from it; only fp16's GradScaler may skip
a step with overflowing gradients (it then logs ``skipped: true`` and ``grad_norm: null``).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from torch.profiler import record_function

from ..core.config import Config, mixed_precision, require_device
from ..core.errors import DeviceError
from ..core.layouts import pair_layout, real_tokens, to_device
from ..core.batches import IGNORE_INDEX
from ..core.logps import PairLogps
from ..core.losses import (average_logps, preference_loss,
                           preference_metrics)
from ..core.scoring import pass_over_pairs
from .reference import reference_rows


class NonFiniteStepError(FloatingPointError):
    """A NaN or inf loss or gradient norm stopped the run before its optimizer step; every
    checkpoint the run has comes from finite steps."""


class PreferenceRows(NamedTuple):
    """What a preference step logs per pair: five ``[B]`` tensors (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor       # the policy's, summed or token-mean as the loss uses them
    rejected_logps: torch.Tensor

    def rows(self) -> torch.Tensor:
        """``[B, 5]``: one row per pair, the fields in order (for gathering across processes)."""
        return torch.stack(self, dim=1)

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> "PreferenceRows":
        """The inverse of :meth:`rows`: ``[B, 5]`` -> five ``[B]`` tensors."""
        return cls(*rows.unbind(1))

    def metrics(self, average: bool, prefix: str = "") -> dict[str, float]:
        """:func:`dpo_lib.core.losses.preference_metrics` plus ``logps/accuracies`` (the policy's
        log-prob ranks the chosen answer first), keys prefixed with ``prefix``."""
        metrics = preference_metrics(*self, average, prefix=prefix)
        metrics[prefix + "logps/accuracies"] = \
            (self.chosen_logps > self.rejected_logps).float().mean().item()
        return metrics


# --------------------------------------------------------------------------------------------
# What a step needs
# --------------------------------------------------------------------------------------------

def make_accelerator(cfg: Config):
    """The run's ``Accelerator`` with the config's mixed precision.

    accelerate keeps one ``AcceleratorState`` per process and refuses an ``Accelerator`` whose
    mixed precision differs from the first one's. A notebook or test that takes a check step in
    fp32 after a bf16 run needs the other one, so a state left with another precision is cleared
    first (the process's distributed state, ``PartialState``, is kept). accelerate's state is one
    shared object: an ``Accelerator`` made before then reports, and autocasts with, the new
    precision, so the earlier run's accelerator must no longer be in use (a finished run's is not)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    require_device(cfg, "training")
    precision = mixed_precision(cfg)
    if precision != "no" and not torch.cuda.is_available():
        raise DeviceError(f"mixed_precision={precision} needs a GPU here; use 'no' or 'auto' on "
                          "CPU")
    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", precision)) != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
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
    if not torch.cuda.is_available():
        raise DeviceError(f"optimizer={name} needs CUDA (bitsandbytes' 8-bit optimizers); "
                          "use optimizer=adamw on CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
    return cls(parameters, **kwargs)


def total_steps(cfg: Config) -> int:
    return cfg.train.sft_steps if cfg.train.stage == "sft" else cfg.train.preference_steps


def prepare_training(cfg: Config, model, accelerator):
    """The optimizer over the trainable (LoRA) parameters, the learning-rate schedule, and the
    model and optimizer prepared by ``accelerator`` (DDP, mixed precision, devices). Returns
    ``(model, optimizer, scheduler)``. Checkpoints go through accelerate's
    ``save_state``/``load_state``: the scheduler is registered (not prepared, which would step it
    once per process), and the frozen base model's weights are left out."""
    from transformers import get_scheduler

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, trainable)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer,
                              num_warmup_steps=cfg.train.warmup_steps,
                              num_training_steps=total_steps(cfg))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())
    return model, optimizer, scheduler


@dataclass
class TrainState:
    """Everything :func:`training_step` needs besides the model and the batches.

    ``layout``: :func:`dpo_lib.core.layouts.layout_for`; ``examples``: the tokenized training
    examples (pairs, or SFT sequences) that micro-batches index; ``pad_token_id``: the model's;
    ``reference``: the reference log-probs of every training pair, aligned with ``examples``
    (:func:`dpo_lib.training.reference.reference_pass`; None for SFT and reference-free losses);
    ``latest_checkpoint``: called to name the last good checkpoint in a
    :class:`NonFiniteStepError`; ``step``: the optimizer steps taken so far."""
    cfg: Config
    accelerator: object
    optimizer: object
    scheduler: object
    layout: object
    examples: list
    pad_token_id: int = 0
    reference: PairLogps | None = None
    latest_checkpoint: object = None
    step: int = 0                   # optimizer steps taken (a resumed run starts at its checkpoint's)
    trainable: list = field(init=False)
    average: bool = field(init=False)

    def __post_init__(self):
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.average = average_logps(self.cfg)     # token means or sums, as the loss uses them


@dataclass
class StepResult:
    """One optimizer step: ``metrics`` is the step's line of ``metrics.jsonl`` without ``step``
    and ``examples`` (the loss and the stage's metrics over every process, ``lr`` (the learning
    rate this step used), ``grad_norm`` (before clipping)
    (None for a step fp16's scaler skipped), ``skipped``, tokens per second, seconds, padding);
    ``losses``: this process's per-example losses ``[n]``."""
    metrics: dict
    losses: torch.Tensor
    skipped: bool


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------

def preference_outputs(model, batch: dict, ref: PairLogps | None, layout, cfg: Config,
                       average: bool) -> tuple[torch.Tensor, PreferenceRows]:
    """Losses ``[B]`` (with the graph) and the logged :class:`PreferenceRows` of one batch of
    pairs: ``batch`` collated by ``layout``, ``ref`` the reference's ``[B]`` rows of the same
    pairs (:func:`dpo_lib.training.reference.reference_rows`; None for a reference-free loss).
    ``average``: the aggregation the loss uses, token means or sums
    (:func:`dpo_lib.core.losses.average_logps`). The policy's log-probs, aggregated, the loss."""
    policy = layout.logps(model, batch)                   # [B] sums and counts, with the graph
    return preference_outputs_of(policy, ref, cfg, average)


def preference_outputs_of(policy: PairLogps, ref: PairLogps | None, cfg: Config,
                          average: bool) -> tuple[torch.Tensor, PreferenceRows]:
    """:func:`preference_outputs` from the policy's ``[B]`` rows (:class:`PairLogps`) once they
    are computed: the aggregation (``average``), the loss and the logged rows."""
    loss_type = cfg.train.loss_type
    chosen, rejected = policy.logps(average)
    ref_chosen = ref_rejected = None
    if ref is not None:
        ref_chosen, ref_rejected = (t.to(chosen.device) for t in ref.logps(average))
    losses, chosen_rewards, rejected_rewards = preference_loss(
        chosen, rejected, ref_chosen, ref_rejected, cfg.train.beta, loss_type,
        cfg.train.label_smoothing, chosen_token_mean_logps=policy.logps(average=True)[0],
        rpo_alpha=cfg.train.rpo_alpha, simpo_gamma=cfg.train.simpo_gamma)
    return losses, PreferenceRows(losses.detach(), chosen_rewards, rejected_rewards,
                                  chosen.detach(), rejected.detach())


def micro_batch_loss(model, batch: dict, ref: PairLogps | None, state: TrainState,
                     accumulation: int,
                     step_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to back-propagate for one micro-batch, already scaled for the optimizer step, and
    its rows to log (``[B, 2]`` NLL and token counts for SFT, ``[B, 5]`` :class:`PreferenceRows`).

    SFT: the summed NLL over ``step_tokens``, the answer tokens of the whole step on every
    process, times the processes (DDP averages gradients over them): the same gradient for any
    split of the step into micro-batches and processes. Preference: the batch mean of the
    per-pair losses over ``accumulation`` micro-batches, against ``ref``, the reference's rows."""
    if state.cfg.train.stage == "sft":
        nll, counts = state.layout.nll(model, batch)
        world = state.accelerator.num_processes
        return nll.sum() / step_tokens * world, torch.stack([nll.detach(), counts], dim=1)
    losses, rows = preference_outputs(model, batch, ref, state.layout, state.cfg, state.average)
    return losses.mean() / accumulation, rows.rows()


def training_step(model, micro_batches: Sequence[Sequence[int]], state: TrainState) -> StepResult:
    """One optimizer step of either stage over ``micro_batches``: lists of indices into
    ``state.examples`` (this process's share of the step). See the module docstring for what
    happens in order."""
    started = time.perf_counter()
    state.step += 1
    accelerator, cfg, optimizer = state.accelerator, state.cfg, state.optimizer
    device = next(p for p in state.trainable).device
    sft = cfg.train.stage == "sft"
    step_tokens = answer_tokens(state.examples, micro_batches, accelerator) if sft else None
    rows, tokens, positions = [], 0, 0
    for number, indices in enumerate(micro_batches):
        indices = list(indices)
        ref = None if sft or state.reference is None else reference_rows(state.reference, indices)
        batch = to_device(state.layout.collate([state.examples[i] for i in indices],
                                               state.pad_token_id), device)
        batch_tokens, batch_positions = real_tokens(batch)
        tokens, positions = tokens + batch_tokens, positions + batch_positions
        last = number == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
            with record_function("forward"):
                loss, micro_rows = micro_batch_loss(model, batch, ref, state,
                                                    len(micro_batches), step_tokens)
            stop_if_not_finite(loss, "loss", state, f"micro-batch {number}, examples {indices}")
            with record_function("backward"):
                accelerator.backward(loss)
        rows.append(micro_rows)
    with record_function("optimizer"):
        grad_norm = accelerator.clip_grad_norm_(state.trainable, cfg.train.max_grad_norm)
        scaler = getattr(accelerator, "scaler", None)
        if scaler is None:    # only fp16's GradScaler may meet overflowing gradients (and skip)
            stop_if_not_finite(grad_norm, "gradient norm", state,
                               "after backward, before clipping")
        lr = optimizer.param_groups[0]["lr"]       # the rate this step uses (logged as "lr")
        optimizer.step()
        skipped = bool(accelerator.optimizer_step_was_skipped)
        if not skipped:
            state.scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    local = torch.cat(rows).to(accelerator.device)
    world = accelerator.num_processes
    gathered = accelerator.gather(local).cpu() if world > 1 else local.cpu()
    tokens_all = int(accelerator.gather(torch.tensor([tokens], device=accelerator.device)).sum()) \
        if world > 1 else tokens
    if sft:
        metrics = {"loss": (gathered[:, 0].sum() / gathered[:, 1].sum()).item()}
    else:
        metrics = PreferenceRows.from_rows(gathered).metrics(state.average)
    seconds = time.perf_counter() - started
    metrics.update({"lr": lr,
                    "grad_norm": None if skipped else float(grad_norm), "skipped": skipped,
                    "tokens_per_second": tokens_all / seconds, "step_seconds": seconds,
                    "padding_fraction": 1 - tokens / max(positions, 1)})
    return StepResult(metrics, local[:, 0].cpu(), skipped)


def answer_tokens(examples, micro_batches, accelerator) -> int:
    """Answer tokens (labels other than -100, after the shift: the tokens the loss scores) of one
    optimizer step's SFT micro-batches, counted in the examples, summed over every process."""
    tokens = sum(sum(label != IGNORE_INDEX for label in examples[i]["labels"][1:])
                 for indices in micro_batches for i in indices)
    if accelerator.num_processes > 1:
        tokens = int(accelerator.reduce(torch.tensor([tokens], device=accelerator.device),
                                        "sum").item())
    return tokens


def stop_if_not_finite(value: torch.Tensor, what: str, state: TrainState, where: str) -> None:
    """Raise :class:`NonFiniteStepError` on every process when ``value`` (a loss or the gradient
    norm) is NaN or inf on any.

    With several processes they first agree (one all-reduce of a flag), so that none raises
    while the others wait for it in a collective; all then raise the same error, naming each
    process that saw a non-finite value and the last checkpoint (from finite steps only: nothing
    is stepped or saved after a non-finite value)."""
    accelerator = state.accelerator
    value = torch.as_tensor(value).detach().float()
    bad = not bool(torch.isfinite(value).all())
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(bad)], device=accelerator.device)
        if accelerator.reduce(flag, "sum").item() == 0:
            return
        from accelerate.utils import gather_object

        seen = gather_object([(accelerator.process_index, value.sum().item(), where)])
    elif not bad:
        return
    else:
        seen = [(0, value.sum().item(), where)]
    places = "; ".join(f"rank {rank}: {what} {number} ({place})"
                       for rank, number, place in seen if not math.isfinite(number))
    kept = state.latest_checkpoint() if state.latest_checkpoint else None
    raise NonFiniteStepError(
        f"non-finite {what} at step {state.step} ({places}); every process stopped before the "
        f"optimizer step. Last "
        f"checkpoint (all from finite steps): {kept if kept else 'none yet'}. Lower the learning "
        f"rate, check the data, or use fp32/bf16 instead of fp16.")


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, examples, cfg: Config, accelerator, reference: PairLogps | None = None,
             policy: PairLogps | None = None) -> dict[str, float]:
    """Held-out metrics, keys prefixed ``eval/``, in the run's pair layout. SFT stage: token-mean
    NLL of the chosen answers and log-prob preference accuracy; preference stage: the loss and
    reward metrics of the loss in use (``reference``: the held-out reference log-probs, ``[N]``
    rows; None for a reference-free loss). ``policy``: the policy's ``[N]`` rows of ``examples``
    where they are known without a pass (at step 0 a policy that starts as its reference scores
    what the reference pass scored, :func:`policy_is_reference`); the model is not run then."""
    layout, average = pair_layout(cfg), average_logps(cfg)
    if cfg.train.stage == "preference" and policy is not None:
        return preference_outputs_of(policy, reference, cfg, average)[1].metrics(
            average, prefix="eval/")
    if cfg.train.stage == "preference":
        def rows_of(model, batch, indices):
            ref = None if reference is None else reference_rows(reference, indices)
            return preference_outputs(model, batch, ref, layout, cfg, average)[1].rows()
        _, rows = pass_over_pairs(model, examples, layout, cfg.train.eval_batch_size, rows_of,
                                  accelerator)
        return PreferenceRows.from_rows(rows).metrics(average, prefix="eval/")
    _, rows = pass_over_pairs(model, examples, layout, cfg.train.eval_batch_size,
                              lambda m, batch, _: layout.logps(m, batch).rows(), accelerator)
    sums = PairLogps.from_rows(rows)
    chosen, rejected = sums.logps(average=False)
    return {"eval/loss": (-chosen.sum() / sums.chosen_counts.sum()).item(),
            "eval/logps/chosen": chosen.mean().item(),
            "eval/logps/rejected": rejected.mean().item(),
            "eval/logps/accuracies": (chosen / sums.chosen_counts >
                                      rejected / sums.rejected_counts).float().mean().item()}


def policy_is_reference(model, reference_adapter) -> bool:
    """Whether the prepared model, before any step, computes exactly what the reference pass
    computed (:func:`dpo_lib.training.train.reference_passes`), so that the held-out pass at step
    0 can read the reference's held-out rows instead of running the model again.

    True when the reference pass ran the model with its own adapter (``reference_adapter``: the
    trainable adapter was loaded from it), or when every ``lora_B`` weight is zero: a fresh LoRA
    adapter adds exactly zero, so the model equals the base model the reference pass ran with
    adapters disabled. False otherwise (an adapter initialised with ``B != 0``)."""
    if reference_adapter is not None:
        return True
    weights = [p for name, p in model.named_parameters() if "lora_B" in name]
    return bool(weights) and all(not p.detach().any() for p in weights)
