"""Shared-prompt packing: chosen and rejected answers in one sequence behind one copy of the prompt.

A preference pair is ``(prompt, chosen, rejected)`` and in hh-rlhf the prompt is most of the
tokens (about 118 of 118 + 41 + 50 with the SmolLM2 tokenizer). The plain forward pass
(:func:`dpo_lib.forward.concatenated_logps`) runs the prompt twice, once before each answer. Here
each pair is one sequence::

    tokens     p0 p1 p2 | c0 c1 | r0 r1 r2
    segment     0  0  0 |  1  1 |  2  2  2
    position    0  1  2 |  3  4 |  3  4  5

with an attention mask that lets a token see the earlier tokens of the prompt and of its own
answer, never the other answer, and position ids that restart the rejected answer where the prompt
ends. Every answer token then sees exactly what it sees in the plain pass, so log-probs and their
gradients are the same (up to floating-point order), and the prompt's activations are computed
once, with gradients from both answers flowing through them.

The first token of each answer is predicted from the prompt's last position; the others from the
position before them in their own segment. :func:`collate_shared_prompt` records those positions
(``*_rows``) with the tokens they predict (``*_targets``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .batches import IGNORE_INDEX, pad_to
from .logps import PairLogps, answer_counts, model_states, states_logps

PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1


def collate_shared_prompt(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pack tokenized pairs (from :func:`dpo_lib.batches.tokenize_pairs`) into one batch.

    Returns ``[B, T]`` tensors ``input_ids``, ``position_ids``, ``segment_ids`` (0 prompt, 1 chosen,
    2 rejected, -1 padding) and ``packed_attention_mask`` (1 on real tokens), with
    ``T = max(P + C + R)``, and for each side ``[B, N]`` tensors ``<side>_rows`` (the position whose
    logits predict each answer token) and ``<side>_targets`` (that token, or -100 as padding).
    Only answer tokens whose label is not -100 in the example are counted, as in the plain pass.
    """
    ids, positions, segments, rows, targets = [], [], [], {CHOSEN: [], REJECTED: []}, \
        {CHOSEN: [], REJECTED: []}
    for example in examples:
        prompt = example["prompt_input_ids"]
        p = len(prompt)
        if p == 0:
            raise ValueError("shared-prompt packing needs a non-empty prompt in every pair")
        sequence, segment, position = list(prompt), [PROMPT] * p, list(range(p))
        for side, name in ((CHOSEN, "chosen"), (REJECTED, "rejected")):
            full, labels = example[f"{name}_input_ids"], example[f"{name}_labels"]
            if full[:p] != prompt:
                raise ValueError(f"the {name} sequence does not start with the pair's prompt")
            answer = full[p:]
            start = len(sequence)
            # answer token i sits at start + i; it is predicted from the position before it in
            # its own segment, which for i = 0 is the prompt's last position
            rows[side].append([p - 1] + [start + i - 1 for i in range(1, len(answer))])
            targets[side].append([t if lab != IGNORE_INDEX else IGNORE_INDEX
                                  for t, lab in zip(answer, labels[p:])])
            sequence += answer
            segment += [side] * len(answer)
            position += list(range(p, p + len(answer)))
        ids.append(sequence)
        segments.append(segment)
        positions.append(position)
    length = max(len(s) for s in ids)
    batch = {"input_ids": pad_to(ids, pad_token_id, length),
             "position_ids": pad_to(positions, 0, length),
             "segment_ids": pad_to(segments, PADDING, length),
             "packed_attention_mask": pad_to([[1] * len(s) for s in ids], 0, length)}
    for side, name in ((CHOSEN, "chosen"), (REJECTED, "rejected")):
        width = max(1, max(len(r) for r in rows[side]))
        batch[f"{name}_rows"] = pad_to(rows[side], 0, width)
        batch[f"{name}_targets"] = pad_to(targets[side], IGNORE_INDEX, width)
    return batch


def attention_mask_4d(segment_ids: torch.Tensor, dtype: torch.dtype,
                      boolean: bool = True) -> torch.Tensor:
    """``[B, 1, T, T]`` mask: query ``q`` may attend key ``k`` when ``k <= q``, ``k`` is real, and
    ``k`` is a prompt token or in ``q``'s own answer. Padding queries attend only to themselves
    (a row with no allowed key would give NaN). ``boolean``: True = attend (SDPA's convention);
    otherwise an additive float mask of 0 and the dtype's minimum (eager attention's).
    """
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]                 # [B, T, 1], [B, 1, T]
    allowed = causal & (query != PADDING) & (key != PADDING) & ((key == PROMPT) | (key == query))
    allowed |= torch.eye(length, dtype=torch.bool, device=segment_ids.device) & (query == PADDING)
    allowed = allowed[:, None]                                                   # [B, 1, T, T]
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


#: Attention implementations that apply a custom ``[B, 1, T, T]`` mask. Others (flash_attention_2
#: and 3, and kernels taking only a padding mask) would silently attend across the two answers.
MASK_AWARE_ATTENTION = ("eager", "sdpa")


def attention_implementation(model) -> str:
    """The model's attention implementation, or ValueError where it cannot take the packed mask."""
    inner = getattr(model, "module", model)
    implementation = getattr(getattr(inner, "config", None), "_attn_implementation", None) or "sdpa"
    if implementation not in MASK_AWARE_ATTENTION:
        raise ValueError(
            f"train.shared_prompt needs an attention implementation that applies a 4-D mask "
            f"({' or '.join(MASK_AWARE_ATTENTION)}); this model uses {implementation!r}, which "
            f"ignores it and would let the chosen answer see the rejected one. Set "
            f"shared_prompt=false, or load the model with attn_implementation='sdpa'.")
    return implementation


def shared_prompt_logps(model, batch: dict[str, torch.Tensor],
                        chunked_head: bool = False) -> PairLogps:
    """Summed answer log-probs from one packed forward pass per pair.

    Same contract as :func:`dpo_lib.forward.concatenated_logps`: fp32 ``[B]`` sums and counts.
    ``chunked_head``: the output layer only at the answer-predicting positions, in chunks.
    """
    implementation = attention_implementation(model)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    mask = attention_mask_4d(batch["segment_ids"], dtype, boolean=implementation != "eager")
    states = model_states(model, chunked_head, input_ids=batch["input_ids"], attention_mask=mask,
                          position_ids=batch["position_ids"])                      # [B, T, H|V]
    sums = []
    for side in ("chosen", "rejected"):
        rows = batch[f"{side}_rows"]                                             # [B, N]
        picked = states.gather(1, rows.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
        sums.append(states_logps(model, picked, batch[f"{side}_targets"], chunked_head))  # [B]
    return PairLogps(sums[0], sums[1], answer_counts(batch["chosen_targets"]),
                     answer_counts(batch["rejected_targets"]))


def packed_token_fraction(examples: Sequence[dict]) -> float:
    """Tokens of the packed sequences as a share of the plain pass's (before padding)."""
    packed = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"])
                 - len(e["prompt_input_ids"]) for e in examples)
    plain = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in examples)
    return packed / plain if plain else 1.0
