"""One micro-batch of the trainer, and held-out evaluation: the functions the training loop, the
benchmarks and the GPU tests all call.

:func:`preference_step_outputs` is a DPO/cDPO/IPO/RPO/SimPO step without the optimizer: policy log-probs
(:func:`dpo_lib.forward.pair_logps`), the cached reference's (:mod:`dpo_lib.reference`), the loss
(:func:`dpo_lib.losses.preference_loss`) and a :class:`PreferenceRows` of what is logged.
:func:`dpo_lib.forward.sft_nll` is the SFT stage's. :func:`evaluate` runs either over held-out pairs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .config import Config
from .forward import pair_logps, pass_over_pairs
from .logps import PairLogps
from .losses import REFERENCE_FREE, default_average, preference_loss, preference_metrics
from .reference import reference_logps


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
        """:func:`dpo_lib.losses.preference_metrics` plus ``logps/accuracies`` (the policy's
        log-prob ranks the chosen answer first), keys prefixed with ``prefix``."""
        metrics = preference_metrics(*self, average, prefix=prefix)
        metrics[prefix + "logps/accuracies"] = \
            (self.chosen_logps > self.rejected_logps).float().mean().item()
        return metrics


def average_logps(cfg: Config) -> bool:
    """Token-mean (True) or summed (False) log-probs for this run's preference loss."""
    setting = cfg.train.average_logps
    return default_average(cfg.train.loss_type) if setting is None else bool(setting)


def preference_step_outputs(model, batch, reference: PairLogps | dict, indices,
                            cfg: Config) -> tuple[torch.Tensor, PreferenceRows]:
    """Losses ``[B]`` (with the graph) and the logged :class:`PreferenceRows` of one micro-batch
    of pairs (``batch`` from :func:`dpo_lib.forward.collate_pairs`, ``indices`` its examples'
    positions in ``reference``; ``{}`` for a reference-free loss, simpo)."""
    average, loss_type = average_logps(cfg), cfg.train.loss_type
    policy = pair_logps(model, batch, cfg.train.chunked_head)
    chosen, rejected = policy.logps(average)
    ref_chosen = ref_rejected = None
    if loss_type not in REFERENCE_FREE:
        ref_chosen, ref_rejected = (t.to(chosen.device) for t in reference_logps(reference, indices,
                                                                                 average))
    losses, chosen_rewards, rejected_rewards = preference_loss(
        chosen, rejected, ref_chosen, ref_rejected, cfg.train.beta, loss_type,
        cfg.train.label_smoothing, chosen_token_mean_logps=policy.logps(average=True)[0],
        rpo_alpha=cfg.train.rpo_alpha, simpo_gamma=cfg.train.simpo_gamma)
    return losses, PreferenceRows(losses.detach(), chosen_rewards, rejected_rewards,
                                  chosen.detach(), rejected.detach())


@torch.no_grad()
def evaluate(model, examples, cfg: Config, accelerator,
             reference: PairLogps | None = None) -> dict[str, float]:
    """Held-out metrics, keys prefixed ``eval/``. SFT stage: token-mean NLL of the chosen answers
    and log-prob preference accuracy; preference stage: the loss and reward metrics of the loss in
    use (``reference``: the held-out reference log-probs; None for a reference-free loss)."""
    preference = cfg.train.stage == "preference"
    if not preference:
        def rows_of(model, batch, indices):
            return pair_logps(model, batch, cfg.train.chunked_head).rows()
    else:
        def rows_of(model, batch, indices):
            return preference_step_outputs(model, batch, reference, indices, cfg)[1].rows()
    _, rows = pass_over_pairs(model, examples, cfg.train.eval_batch_size, rows_of, accelerator,
                              cfg.train.shared_prompt)
    if preference:
        return PreferenceRows.from_rows(rows).metrics(average_logps(cfg), prefix="eval/")
    sums = PairLogps.from_rows(rows)
    chosen, rejected = sums.logps(average=False)
    return {"eval/loss": (-chosen.sum() / sums.chosen_counts.sum()).item(),
            "eval/logps/chosen": chosen.mean().item(),
            "eval/logps/rejected": rejected.mean().item(),
            "eval/logps/accuracies": (chosen / sums.chosen_counts >
                                      rejected / sums.rejected_counts).float().mean().item()}
