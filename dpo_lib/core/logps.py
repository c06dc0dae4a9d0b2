"""Log-probabilities of answer tokens: the one home of "how likely is this answer under the model".

Every pass of the trainer, the reference pass, evaluation and the export checks reads log-probs
through these functions:

* :func:`response_logps` — from logits ``[B, N, V]`` and the tokens they predict ``[B, N]``: summed
  (or token-mean) log-probs ``[B]``, computed a chunk of positions at a time in fp32;
* :func:`sequence_logps` — the same with Hugging Face's label convention (labels aligned with the
  inputs, shifted here);
* :func:`head_logps` — from final hidden states ``[B, N, H]`` through the output layer in chunks,
  so that no ``[B, N, V]`` logits exist (``train.chunked_head``);
* :func:`model_states` and :func:`states_logps` — the one place that chooses between the two:
  the model's logits, or its final hidden states and output layer;
* :func:`next_token_log_probs` / :func:`token_logps` — whole next-token distributions ``[B, T-1,
  V]`` and the log-prob of each next token ``[B, T-1]`` (the export checks, notebook 01).

Labels/targets equal to :data:`~dpo_lib.core.batches.IGNORE_INDEX` (-100: prompt and padding) do not
count; :func:`answer_counts` counts the tokens that do.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .batches import IGNORE_INDEX
from .errors import ConfigError

#: Elements of fp32 logits processed at once (64 MiB of fp32).
CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------
# From logits or hidden states
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
    @torch.profiler.record_function("output_layer")
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
    @torch.profiler.record_function("output_layer")
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


def _summed(logits: torch.Tensor, targets: torch.Tensor, average: bool,
            ignore_index: int) -> torch.Tensor:
    """``[B]`` sums (token means when ``average``) of ``log softmax(logits[:, i])[targets[:, i]]``
    over counted ``i``; ``logits [B, >=N, V]`` (positions past ``N`` are not read), ``targets [B, N]``."""
    counted = targets != ignore_index                                               # [B, N]
    token_logps = _LabelLogProbs.apply(logits, targets.masked_fill(~counted, 0))    # [B, N] fp32
    summed = (token_logps * counted).sum(-1)                                        # [B]
    if average:
        return summed / counted.sum(-1).clamp(min=1)
    return summed


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
        ``[B]`` fp32 (fp64 for fp64 logits): ``sum_t log softmax(logits[:, t])[labels[:, t+1]]``
        over counted ``t`` (divided by their number when ``average``).

    Memory: the label logit is gathered and ``logsumexp`` is taken over at most
    :data:`CHUNK_ELEMENTS` logits at a time, so no fp32 ``[B, L, V]`` log-softmax is held for the
    backward pass (only the ``[B, L-1]`` normalisers); the gradient w.r.t. ``logits`` is of course
    full size, in the logits' dtype.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"need logits [B, L, V] and labels [B, L]; got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return _summed(logits, labels[:, 1:], average, ignore_index)


def response_logps(logits: torch.Tensor, targets: torch.Tensor, average: bool = False,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """:func:`sequence_logps` without the shift: ``logits[:, i]`` predicts ``targets[:, i]``.

    For logits already picked at the positions that predict each answer token (shared-prompt
    packing, :class:`dpo_lib.core.layouts.PackedLayout`). ``logits [B, N, V]``, ``targets [B, N]`` (ids or
    ``ignore_index``); returns ``[B]`` fp32 sums (token means when ``average``).
    """
    if logits.dim() != 3 or targets.dim() != 2 or logits.shape[:2] != targets.shape:
        raise ValueError(f"need logits [B, N, V] and targets [B, N]; got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    return _summed(logits, targets, average, ignore_index)


#: Elements of the ``[M, V]`` softmax the output layer keeps from forward for backward on a CPU
#: (1 GiB of fp32), where the product is the scarce part; the chunks past it, and all of them on a
#: GPU (memory is), are recomputed in backward (one more ``[n, H] x [H, V]`` product each).
SAVED_SOFTMAX_ELEMENTS = 1 << 28


class _HeadLabelLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] for ``hidden [M, H]``, ``weight [V, H]``,
    ``targets [M]``, in fp32: the output layer applied a chunk of rows at a time, so that no
    ``[M, V]`` logits are ever held at once beyond :data:`SAVED_SOFTMAX_ELEMENTS` (on a CPU; none
    on a GPU).

    Forward turns each chunk's logits in place into its softmax ``p`` and keeps the chunks that fit
    the budget; backward forms ``d logits = g (onehot(target) - p)`` from a kept chunk in place, or
    from the output layer applied again (the chunks past the budget, or a second backward), then
    ``d hidden = d logits @ weight``. The ``[M]`` log-normalisers are kept for the recomputation.
    """

    @staticmethod
    @torch.profiler.record_function("output_layer")
    def forward(ctx, hidden, weight, bias, targets):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        log_norm = torch.empty_like(out)
        kept = []
        budget = SAVED_SOFTMAX_ELEMENTS if any(ctx.needs_input_grad[:3]) \
            and hidden.device.type == "cpu" else 0
        for start in range(0, hidden.shape[0], rows):
            stop = min(hidden.shape[0], start + rows)
            # hidden in the layer's dtype, as backward recomputes it (under autocast an fp32
            # final norm can meet a bf16 head; backward runs outside autocast)
            logits = F.linear(hidden[start:stop].to(weight.dtype), weight, bias).to(dtype)  # [n, V]
            log_norm[start:stop] = torch.logsumexp(logits, dim=-1)
            out[start:stop] = logits.gather(-1, targets[start:stop, None]).squeeze(-1) \
                - log_norm[start:stop]
            if logits.numel() <= budget:          # the first chunks only: backward counts them
                budget -= logits.numel()
                kept.append(logits.sub_(log_norm[start:stop, None]).exp_())      # p, [n, V]
            else:
                budget = 0
        ctx.save_for_backward(hidden, weight, bias, targets, log_norm)
        ctx.softmax = kept
        return out

    @staticmethod
    @torch.profiler.record_function("output_layer")
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, log_norm = ctx.saved_tensors
        kept, ctx.softmax = ctx.softmax, []       # used up in place: a 2nd backward recomputes
        dtype = log_norm.dtype
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for index, start in enumerate(range(0, hidden.shape[0], rows)):
            stop = min(hidden.shape[0], start + rows)
            g = grad_out[start:stop].to(dtype).unsqueeze(-1)                        # [n, 1]
            chunk = hidden[start:stop].to(weight.dtype)
            if index < len(kept):
                d_logits = kept[index].mul_(-g)                                     # [n, V]
                kept[index] = None
            else:
                logits = F.linear(chunk, weight, bias).to(dtype)
                d_logits = logits.sub_(log_norm[start:stop, None]).exp_().mul_(-g)  # [n, V]
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
# From a model: logits, or final hidden states and the output layer
# --------------------------------------------------------------------------------------------

def output_head(model) -> torch.nn.Linear:
    """The model's output layer, for :func:`head_logps`: a plain ``nn.Linear``
    (LoRA and bitsandbytes leave the output layer alone), or a clear error."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    config = getattr(inner, "config", None)
    if type(head) is not torch.nn.Linear or getattr(config, "final_logit_softcapping", None) \
            or getattr(config, "logit_scale", None):
        raise ConfigError(f"train.chunked_head needs a plain linear output layer without logit "
                         f"scaling; {type(inner).__name__} has {type(head).__name__}: set "
                         f"chunked_head=false")
    return head


def final_norm(model) -> torch.nn.Module | None:
    """The module whose output is the final hidden state (the decoder's last norm), looked up
    through DDP and peft wrappers; None for an architecture that names it otherwise."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    for name in ("norm", "final_layer_norm", "ln_f", "final_layernorm"):
        module = getattr(decoder, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def final_hidden(model, **inputs) -> torch.Tensor:
    """``[B, L, H]`` final hidden states (after the last norm), through the model's own forward
    (so that DDP and peft wrappers see the call) with logits for one position only.

    The states are taken from the final norm's output by a forward hook: asking the model for
    ``output_hidden_states`` instead would keep every layer's ``[B, L, H]`` states alive until the
    call returns, memory that a no-grad pass (the reference and evaluation passes) never needs.
    """
    norm = final_norm(model)
    if norm is None:
        return model(**inputs, logits_to_keep=1, output_hidden_states=True).hidden_states[-1]
    captured = []
    handle = norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


def model_states(model, chunked_head: bool = False, **inputs) -> torch.Tensor:
    """One forward pass: ``[B, L, V]`` logits, or with ``chunked_head`` the ``[B, L, H]`` final
    hidden states (:func:`final_hidden`) for :func:`states_logps` to put through the output layer."""
    if chunked_head:
        return final_hidden(model, **inputs)
    return model(**inputs).logits


def states_logps(model, states: torch.Tensor, targets: torch.Tensor,
                 chunked_head: bool = False) -> torch.Tensor:
    """Summed log-probs ``[B]`` of ``targets [B, N]`` from :func:`model_states`' output, whose
    position ``i`` predicts ``targets[:, i]`` (positions past ``N`` are not read): through
    :func:`head_logps` with ``chunked_head``, :func:`response_logps`' arithmetic otherwise."""
    if chunked_head:
        return head_logps(states[:, :targets.shape[1]], output_head(model), targets)
    return _summed(states, targets, False, IGNORE_INDEX)


def answer_counts(targets: torch.Tensor) -> torch.Tensor:
    """``[B]`` fp32: the counted tokens (not -100) of each row of ``targets [B, N]``."""
    return (targets != IGNORE_INDEX).sum(-1).float()


def next_token_log_probs(model, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Whole next-token distributions: ``[B, T]`` ids -> ``[B, T - 1, V]`` fp32 log-probs."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Log-probability of each next token: ``[B, T]`` ids -> ``[B, T - 1]`` float32.

    Entry ``[b, t]`` is ``log p(input_ids[b, t + 1] | input_ids[b, :t + 1])``.
    """
    return next_token_log_probs(model, input_ids, attention_mask).gather(
        -1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


class PairLogps(NamedTuple):
    """Summed answer log-probs of a batch of pairs and the answer tokens they sum over: four fp32
    tensors of shape ``[B]`` (or ``[N]`` for a whole set, as the reference pass caches them)."""

    chosen_sums: torch.Tensor
    rejected_sums: torch.Tensor
    chosen_counts: torch.Tensor
    rejected_counts: torch.Tensor

    def logps(self, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen [B], rejected [B])``: the sums, or with ``average`` the token means."""
        if not average:
            return self.chosen_sums, self.rejected_sums
        return (self.chosen_sums / self.chosen_counts.clamp(min=1),
                self.rejected_sums / self.rejected_counts.clamp(min=1))

    def rows(self) -> torch.Tensor:
        """``[B, 4]``: one row per pair, the fields in order (for gathering across processes)."""
        return torch.stack(self, dim=1)

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> "PairLogps":
        """The inverse of :meth:`rows`: ``[B, 4]`` -> four ``[B]`` tensors."""
        return cls(*rows.unbind(1))
