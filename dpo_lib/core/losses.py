"""Preference losses (DPO, conservative DPO, IPO, RPO, SimPO) and the logged metrics.

Notation: for a pair (chosen ``w``, rejected ``l``) the *log-ratio margin* is

    h = [log pi(w) - log pi_ref(w)] - [log pi(l) - log pi_ref(l)]

and the implicit rewards are ``beta * (log pi(y) - log pi_ref(y))`` for ``y = w, l``.

===========  =================================================================  ==============
loss_type    per-pair loss                                                      fixed point
===========  =================================================================  ==============
``dpo``      ``-log sigmoid(beta h)``                                           none (h -> inf)
``cdpo``     ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``      beta h = log((1-eps)/eps)
``ipo``      ``(h - 1 / (2 beta))^2``  (``beta`` plays the IPO paper's ``tau``)  h = 1 / (2 beta)
``rpo``      ``-log sigmoid(beta h) - alpha * mean_t log pi(w_t)``               none
``simpo``    ``-log sigmoid(beta (mean_t log pi(w_t) - mean_t log pi(l_t)) - gamma)``  none
===========  =================================================================  ==============

``rpo`` (Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's
``loss_type=["sigmoid", "sft"]``) adds to DPO the chosen answer's negative log-likelihood per token,
weighted by ``alpha`` (``train.rpo_alpha``): a pull on ``log pi(w)`` that DPO's margin alone does
not have. ``simpo`` (Meng et al. 2024) has no reference model: the reward is ``beta`` times the
token-mean log-prob and the pair must be won by a margin ``gamma`` (``train.simpo_gamma``).

Log-prob aggregation: DPO, cDPO and RPO use *summed* response log-probs (:mod:`dpo_lib.core.logps`,
``average=False``); IPO and SimPO use the *token mean* by default (``average=True``), as their
authors' implementations and TRL do, so that ``1 / (2 beta)`` and ``gamma`` are per-token targets.
:func:`default_average`
says which, and :func:`preference_metrics` records the choice under ``logps/token_averaged``.

Non-finite inputs are not checked here (that is a per-step check for the trainer); a NaN log-prob
gives a NaN loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("dpo", "cdpo", "ipo", "rpo", "simpo")
#: Loss types that use no reference model (the trainer skips the reference pass for them).
REFERENCE_FREE = ("simpo",)


def default_average(loss_type: str) -> bool:
    """Whether ``loss_type`` uses token-averaged log-probs by default: True for ``ipo`` and
    ``simpo``."""
    _check_loss_type(loss_type)
    return loss_type in ("ipo", "simpo")


def average_logps(cfg) -> bool:
    """Token-mean (True) or summed (False) log-probs for a run's preference loss: its
    ``train.average_logps``, or when that is null the loss's default (:func:`default_average`)."""
    setting = cfg.train.average_logps
    return default_average(cfg.train.loss_type) if setting is None else bool(setting)


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------

def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    reference_chosen_logps: torch.Tensor | None,
                    reference_rejected_logps: torch.Tensor | None,
                    beta: float | torch.Tensor, loss_type: str = "dpo",
                    label_smoothing: float = 0.0, *,
                    chosen_token_mean_logps: torch.Tensor | None = None,
                    rpo_alpha: float = 1.0, simpo_gamma: float = 0.5):
    """Per-pair preference losses and implicit rewards.

    All log-prob tensors have the same shape ``[...]`` (usually ``[B]``, one value per pair);
    ``beta`` is a float or a tensor that broadcasts against them (e.g. one beta per row).

    With ``h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)``:

    * ``dpo``:  ``-log sigmoid(beta h)`` (``label_smoothing`` must be 0; use ``cdpo``);
    * ``cdpo``: ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, ``eps =
      label_smoothing`` in ``[0, 0.5)``: DPO against labels flipped with probability eps;
    * ``ipo``:  ``(h - 1 / (2 beta))^2``, beta in the role of the IPO paper's tau;
    * ``rpo``:  ``-log sigmoid(beta h) + rpo_alpha * nll``, ``nll = -chosen_token_mean_logps``,
      the chosen answer's negative log-likelihood per token (Pang et al. 2024, Eq. 3; needs
      ``chosen_token_mean_logps [...]``, with the graph, whatever the aggregation of the others);
    * ``simpo``: ``-log sigmoid(beta (policy_chosen - policy_rejected) - simpo_gamma)``: no
      reference (pass ``None``); the log-probs should be token means (Meng et al. 2024).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each of the broadcast shape ``[...]``;
        ``losses`` keeps the graph, the rewards are detached (they are for logging):
        ``beta * (policy - reference)``, for ``simpo`` ``beta * policy`` (its own reward).
    """
    _check_loss_type(loss_type)
    if loss_type != "cdpo" and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing={label_smoothing} is only used by loss_type='cdpo'")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5); got {label_smoothing}")
    if torch.is_tensor(beta):
        if (beta <= 0).any():
            raise ValueError("beta must be positive")
    elif not beta > 0:
        raise ValueError(f"beta must be positive; got {beta}")
    if loss_type == "rpo":
        if chosen_token_mean_logps is None:
            raise ValueError("loss_type='rpo' needs chosen_token_mean_logps (its NLL term)")
        if not rpo_alpha >= 0:
            raise ValueError(f"rpo_alpha must be >= 0; got {rpo_alpha}")

    if loss_type in REFERENCE_FREE:
        chosen_logratio, rejected_logratio = policy_chosen_logps, policy_rejected_logps
    else:
        if reference_chosen_logps is None or reference_rejected_logps is None:
            raise ValueError(f"loss_type={loss_type!r} needs the reference log-probs")
        chosen_logratio = policy_chosen_logps - reference_chosen_logps
        rejected_logratio = policy_rejected_logps - reference_rejected_logps
    h = chosen_logratio - rejected_logratio
    if loss_type == "dpo":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "cdpo":
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "rpo":
        losses = -F.logsigmoid(beta * h) - rpo_alpha * chosen_token_mean_logps
    else:  # simpo
        losses = -F.logsigmoid(beta * h - simpo_gamma)
    chosen_rewards = (beta * chosen_logratio).detach()
    rejected_rewards = (beta * rejected_logratio).detach()
    return losses, chosen_rewards, rejected_rewards


def preference_metrics(losses: torch.Tensor, chosen_rewards: torch.Tensor,
                       rejected_rewards: torch.Tensor, policy_chosen_logps: torch.Tensor,
                       policy_rejected_logps: torch.Tensor, average: bool,
                       prefix: str = "") -> dict[str, float]:
    """Batch means under the names TRL and the DPO reference code log.

    Inputs are ``[B]`` tensors from :func:`preference_loss` and :func:`dpo_lib.core.logps.sequence_logps`;
    ``average`` is the aggregation those log-probs used (True: token mean, False: sum), recorded
    as ``logps/token_averaged`` (1.0 or 0.0) since it changes the scale of every reward.
    ``prefix`` (e.g. ``"eval_"``) is put in front of every name.

    Returns floats: ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies`` (fraction with chosen reward > rejected reward), ``logps/chosen``,
    ``logps/rejected``, ``logps/token_averaged``.
    """
    chosen_rewards = chosen_rewards.detach().float()
    rejected_rewards = rejected_rewards.detach().float()
    metrics = {
        "loss": losses.detach().float().mean().item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "logps/chosen": policy_chosen_logps.detach().float().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().float().mean().item(),
        "logps/token_averaged": float(bool(average)),
    }
    return {prefix + name: value for name, value in metrics.items()}
