"""Preference losses (DPO, conservative DPO, IPO, RPO, SimPO), sequence log-probs and the logged
metrics.

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

Log-prob aggregation: DPO, cDPO and RPO use *summed* response log-probs (``sequence_logps(...,
average=False)``); IPO and SimPO use the *token mean* by default (``average=True``), as their
authors' implementations and TRL do, so that ``1 / (2 beta)`` and ``gamma`` are per-token targets. :func:`default_average`
says which, and :func:`preference_metrics` records the choice under ``logps/token_averaged``.

Non-finite inputs are not checked here (that is a per-step check for the trainer); a NaN log-prob
gives a NaN loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_TYPES = ("dpo", "cdpo", "ipo", "rpo", "simpo")
#: Loss types that use no reference model (the trainer skips the reference pass for them).
REFERENCE_FREE = ("simpo",)
#: Elements of fp32 logits processed at once in :func:`sequence_logps` (64 MiB of fp32).
CHUNK_ELEMENTS = 1 << 24


def default_average(loss_type: str) -> bool:
    """Whether ``loss_type`` uses token-averaged log-probs by default: True for ``ipo`` and
    ``simpo``."""
    _check_loss_type(loss_type)
    return loss_type in ("ipo", "simpo")


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


# --------------------------------------------------------------------------------------------
# Sequence log-probs
# --------------------------------------------------------------------------------------------

def _row_chunks(length: int, vocab: int):
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, length, rows):
        yield start, min(length, start + rows)


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 logits, fp64 for fp64 (tests)."""
    return torch.promote_types(logits.dtype, torch.float32)


class _LabelLogProbs(torch.autograd.Function):
    """log softmax(logits)[label] per position, in fp32 (fp64 for fp64 logits), a chunk of
    positions at a time.

    Forward keeps only the fp32 log-normaliser ``[B, L-1]`` for backward (plus the logits
    themselves, which autograd holds anyway), never a full-vocabulary fp32 copy; backward rebuilds
    the softmax one chunk at a time.
    """

    @staticmethod
    def forward(ctx, logits, safe_labels):
        batch, length = safe_labels.shape
        vocab = logits.shape[-1]
        dtype = _compute_dtype(logits)
        log_norm = torch.empty(batch, length, dtype=dtype, device=logits.device)
        for b in range(batch):
            for start, stop in _row_chunks(length, vocab):
                log_norm[b, start:stop] = torch.logsumexp(logits[b, start:stop].to(dtype), dim=-1)
        label_logits = torch.gather(logits[:, :length], -1, safe_labels.unsqueeze(-1))
        ctx.save_for_backward(logits, safe_labels, log_norm)
        return label_logits.squeeze(-1).to(dtype) - log_norm

    @staticmethod
    def backward(ctx, grad_out):
        logits, safe_labels, log_norm = ctx.saved_tensors
        batch, length = safe_labels.shape
        vocab = logits.shape[-1]
        dtype = log_norm.dtype
        grad = torch.zeros_like(logits)
        for b in range(batch):
            for start, stop in _row_chunks(length, vocab):
                g = grad_out[b, start:stop].to(dtype).unsqueeze(-1)                # [n, 1]
                probs = torch.exp(logits[b, start:stop].to(dtype)
                                  - log_norm[b, start:stop].unsqueeze(-1))         # [n, V]
                chunk = -g * probs
                chunk.scatter_add_(-1, safe_labels[b, start:stop].unsqueeze(-1), g)
                grad[b, start:stop] = chunk.to(grad.dtype)
        return grad, None


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-sequence sum (or token mean) of the label log-probs.

    Convention (Hugging Face): ``labels`` are aligned with the *inputs*, so ``logits[:, t]``
    predicts ``labels[:, t + 1]``; the shift happens here. Positions whose label is
    ``ignore_index`` (prompt and padding, -100) do not count.

    Args:
        logits: ``[B, L, V]``, any float dtype; the arithmetic is fp32 (fp64 for fp64 logits).
        labels: ``[B, L]`` integer token ids or ``ignore_index``.
        average: False: sum over the counted tokens; True: their mean (a row with no counted
            token gives 0).

    Returns:
        ``[B]`` fp32 (fp64 for fp64 logits): ``sum_t log softmax(logits[:, t])[labels[:, t+1]]`` over counted ``t``
        (divided by their number when ``average``).

    Memory: the label logit is gathered and ``logsumexp`` is taken over at most
    :data:`CHUNK_ELEMENTS` logits at a time, so no fp32 ``[B, L, V]`` log-softmax is held for the
    backward pass (only the ``[B, L-1]`` normalisers); the gradient w.r.t. ``logits`` is of course
    full size, in the logits' dtype.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"need logits [B, L, V] and labels [B, L]; got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    targets = labels[:, 1:]                                   # [B, L-1]
    counted = targets != ignore_index                         # [B, L-1]
    safe_targets = targets.masked_fill(~counted, 0)
    token_logps = _LabelLogProbs.apply(logits, safe_targets)  # [B, L-1] fp32
    summed = (token_logps * counted).sum(-1)                  # [B]
    if average:
        return summed / counted.sum(-1).clamp(min=1)
    return summed


def response_logps(logits: torch.Tensor, targets: torch.Tensor, average: bool = False,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """:func:`sequence_logps` without the shift: ``logits[:, i]`` predicts ``targets[:, i]``.

    For logits already picked at the positions that predict each answer token (shared-prompt
    packing, :mod:`dpo_lib.packing`). ``logits [B, N, V]``, ``targets [B, N]`` (ids or
    ``ignore_index``); returns ``[B]`` fp32 sums (token means when ``average``).
    """
    if logits.dim() != 3 or targets.dim() != 2 or logits.shape[:2] != targets.shape:
        raise ValueError(f"need logits [B, N, V] and targets [B, N]; got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    counted = targets != ignore_index
    token_logps = _LabelLogProbs.apply(logits, targets.masked_fill(~counted, 0))    # [B, N]
    summed = (token_logps * counted).sum(-1)
    if average:
        return summed / counted.sum(-1).clamp(min=1)
    return summed


class _HeadLabelLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] for ``hidden [M, H]``, ``weight [V, H]``,
    ``targets [M]``, in fp32: the output layer applied a chunk of rows at a time, in forward and
    again in backward, so that no ``[M, V]`` logits are ever held (only the ``[M]`` normalisers).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        log_norm = torch.empty_like(out)
        for start in range(0, hidden.shape[0], rows):
            stop = min(hidden.shape[0], start + rows)
            # hidden in the layer's dtype, as backward recomputes it (under autocast an fp32
            # final norm can meet a bf16 head; backward runs outside autocast)
            logits = F.linear(hidden[start:stop].to(weight.dtype), weight, bias).to(dtype)  # [n, V]
            log_norm[start:stop] = torch.logsumexp(logits, dim=-1)
            out[start:stop] = logits.gather(-1, targets[start:stop, None]).squeeze(-1) \
                - log_norm[start:stop]
        ctx.save_for_backward(hidden, weight, bias, targets, log_norm)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, log_norm = ctx.saved_tensors
        dtype = log_norm.dtype
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], rows):
            stop = min(hidden.shape[0], start + rows)
            g = grad_out[start:stop].to(dtype).unsqueeze(-1)                        # [n, 1]
            chunk = hidden[start:stop].to(weight.dtype)
            logits = F.linear(chunk, weight, bias).to(dtype)
            d_logits = -g * torch.exp(logits - log_norm[start:stop, None])          # [n, V]
            d_logits.scatter_add_(-1, targets[start:stop, None], g)
            d_logits = d_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start:stop] = (d_logits @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += d_logits.t() @ chunk
            if grad_bias is not None:
                grad_bias += d_logits.sum(0).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None


def head_logps(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor,
               average: bool = False, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """:func:`response_logps` from final hidden states instead of logits: the output layer ``head``
    runs only on the counted positions, a chunk at a time (no ``[B, N, V]`` logits, the vocabulary
    being the largest dimension of small models).

    ``hidden [B, N, H]`` (position ``i`` predicts ``targets[:, i]``), ``targets [B, N]`` (ids or
    ``ignore_index``). Returns ``[B]`` fp32 sums (token means when ``average``).
    """
    counted = targets != ignore_index                                               # [B, N]
    batch_rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)
    token_logps = _HeadLabelLogProbs.apply(hidden[counted], head.weight, head.bias,
                                           targets[counted])                        # [M]
    summed = torch.zeros(targets.shape[0], dtype=token_logps.dtype, device=targets.device)
    summed = summed.index_add(0, batch_rows[counted], token_logps)
    if average:
        return summed / counted.sum(-1).clamp(min=1)
    return summed


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

    Inputs are ``[B]`` tensors from :func:`preference_loss` and :func:`sequence_logps`;
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
