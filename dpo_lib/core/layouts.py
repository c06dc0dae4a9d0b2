"""How a batch meets the model: one object per batch layout, each owning its collation and its
forward pass.

A preference step needs, for every pair of a micro-batch, the summed log-probs of both answers
(:class:`~dpo_lib.core.logps.PairLogps`). Two layouts compute the same numbers:

* :class:`PlainLayout` pads chosen and rejected side by side into ``[B, L]`` tensors and runs them
  as one ``[2B, L]`` batch: the prompt goes through the model twice (TRL's
  ``concatenated_forward``);
* :class:`PackedLayout` puts each pair in one sequence, the prompt once, the two answers kept
  apart by a 4-D attention mask and restarted position ids::

      tokens     p0 p1 p2 | c0 c1 | r0 r1 r2
      segment     0  0  0 |  1  1 |  2  2  2
      position    0  1  2 |  3  4 |  3  4  5

  Every answer token sees exactly what it sees in the plain pass, so log-probs and gradients are
  the same up to floating-point order, and the prompt's activations are computed once.

Both take ``chunked_head``: the output layer applied only at answer positions, a chunk at a time
(:func:`dpo_lib.core.logps.head_logps`), instead of the model's ``[*, L, V]`` logits. Besides
:meth:`~PairLayout.logps` each layout gives :meth:`~PairLayout.hidden_sums`, the final hidden
states summed over each answer (what CHES scores). :class:`SequenceLayout` is the SFT stage's
(one sequence per example, the loss on the answer). :func:`layout_for` chooses once, from the
config; nothing downstream asks a batch which layout it is.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .batches import IGNORE_INDEX, example_length
from .errors import ConfigError, DataError
from .logps import PairLogps, answer_counts, model_states, states_logps

PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1
SIDES = ("chosen", "rejected")


def pad_to(sequences: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    """Right-pad integer lists to ``length``: a LongTensor of shape ``[len(sequences), length]``."""
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, :len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return out


class PairLayout:
    """What every pair layout offers (see the module docstring). ``chunked_head``: the output
    layer only at answer positions, in chunks."""

    name = "pairs"

    def __init__(self, chunked_head: bool = False):
        self.chunked_head = bool(chunked_head)

    def __repr__(self):
        return f"{type(self).__name__}(chunked_head={self.chunked_head})"

    def collate(self, examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def length(self, example: dict) -> int:
        """Positions ``example`` takes in a row of this layout's batches (what batches grouped by
        length sort on: :func:`grouping_lengths`)."""
        raise NotImplementedError

    def answer_states(self, model, batch, hidden: bool):
        """``[(states [B, N, H|V], targets [B, N])]`` for chosen and rejected: the model's output
        at each answer token's predicting position (final hidden states when ``hidden``, else
        logits) and the token it predicts (-100: not counted)."""
        raise NotImplementedError

    def logps(self, model, batch: dict[str, torch.Tensor]) -> PairLogps:
        """fp32 ``[B]`` summed answer log-probs and token counts of a collated batch."""
        raise NotImplementedError

    def hidden_sums(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, 2H + 2]`` fp32: per pair the sum of final hidden states over the chosen answer's
        predicting positions, the same for the rejected answer, and the two token counts."""
        sums, counts = [], []
        for states, targets in self.answer_states(model, batch, hidden=True):
            counted = (targets != IGNORE_INDEX).float()                          # [B, N]
            sums.append((states.float() * counted.unsqueeze(-1)).sum(1))         # [B, H]
            counts.append(counted.sum(1, keepdim=True))                          # [B, 1]
        return torch.cat(sums + counts, dim=1)


class PlainLayout(PairLayout):
    """Chosen and rejected padded side by side, one ``[2B, L]`` forward pass."""

    name = "plain"

    def collate(self, examples, pad_token_id):
        """``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_labels`` and the same three
        for ``rejected``, each ``[B, L]`` (right-padded: ids ``pad_token_id``, mask 0, labels
        -100), chosen and rejected to the same length."""
        length = max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"]))
                     for e in examples)
        batch = {}
        for side in SIDES:
            ids = [e[f"{side}_input_ids"] for e in examples]
            batch[f"{side}_input_ids"] = pad_to(ids, pad_token_id, length)
            batch[f"{side}_attention_mask"] = pad_to([[1] * len(s) for s in ids], 0, length)
            batch[f"{side}_labels"] = pad_to([e[f"{side}_labels"] for e in examples],
                                             IGNORE_INDEX, length)
        return batch

    def length(self, example):
        """The longer side: each answer is a row of its own, both padded to the batch's longest."""
        return example_length(example)

    def _forward(self, model, batch, hidden: bool):
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # [2B, L]
        attention_mask = torch.cat([batch["chosen_attention_mask"],
                                    batch["rejected_attention_mask"]])
        targets = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]   # [2B, L-1]
        states = model_states(model, hidden, input_ids=input_ids,
                              attention_mask=attention_mask)                            # [2B, L, H|V]
        return states, targets

    def answer_states(self, model, batch, hidden):
        states, targets = self._forward(model, batch, hidden)
        size = batch["chosen_input_ids"].shape[0]
        states = states[:, :-1]
        return [(states[:size], targets[:size]), (states[size:], targets[size:])]

    def logps(self, model, batch):
        # both answers through the log-prob arithmetic at once (no per-half copies of the logits)
        states, targets = self._forward(model, batch, self.chunked_head)
        sums = states_logps(model, states, targets, self.chunked_head)                  # [2B]
        counts = answer_counts(targets)                                                 # [2B]
        size = batch["chosen_input_ids"].shape[0]
        return PairLogps(sums[:size], sums[size:], counts[:size], counts[size:])


class PackedLayout(PairLayout):
    """One sequence per pair: the prompt once, then the chosen and the rejected answer, each
    answer seeing the prompt and itself only."""

    name = "packed"

    def length(self, example):
        """``P + C + R``: the prompt once and both answers in one row (``chosen_input_ids`` and
        ``rejected_input_ids`` each hold the prompt)."""
        return (len(example["chosen_input_ids"]) + len(example["rejected_input_ids"])
                - len(example["prompt_input_ids"]))

    def collate(self, examples, pad_token_id):
        """``[B, T]`` tensors ``input_ids``, ``position_ids``, ``segment_ids`` (0 prompt, 1 chosen,
        2 rejected, -1 padding), with ``T = max(P + C + R)``, and per side ``[B, N]`` tensors
        ``<side>_rows`` (the position whose output predicts each answer token: the prompt's last
        for the first token, else the position before it in its own segment) and
        ``<side>_targets`` (that token, or -100). Answer tokens whose label is -100 in the example
        do not count, as in the plain layout."""
        ids, positions, segments = [], [], []
        rows, targets = {CHOSEN: [], REJECTED: []}, {CHOSEN: [], REJECTED: []}
        for example in examples:
            prompt = example["prompt_input_ids"]
            p = len(prompt)
            if p == 0:
                raise DataError("the packed layout (shared_prompt) needs a non-empty prompt in "
                                "every pair")
            sequence, segment, position = list(prompt), [PROMPT] * p, list(range(p))
            for side, name in ((CHOSEN, "chosen"), (REJECTED, "rejected")):
                full, labels = example[f"{name}_input_ids"], example[f"{name}_labels"]
                if full[:p] != prompt:
                    raise ValueError(f"the {name} sequence does not start with the pair's prompt")
                answer = full[p:]
                start = len(sequence)
                rows[side].append([p - 1] + [start + i - 1 for i in range(1, len(answer))])
                targets[side].append([t if label != IGNORE_INDEX else IGNORE_INDEX
                                      for t, label in zip(answer, labels[p:])])
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

    def _forward(self, model, batch, hidden: bool):
        implementation = attention_implementation(model)
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        mask = attention_mask_4d(batch["segment_ids"], dtype, boolean=implementation != "eager")
        return model_states(model, hidden, input_ids=batch["input_ids"], attention_mask=mask,
                            position_ids=batch["position_ids"])                     # [B, T, H|V]

    def answer_states(self, model, batch, hidden):
        states = self._forward(model, batch, hidden)
        picked = []
        for side in SIDES:
            rows = batch[f"{side}_rows"]                                             # [B, N]
            picked.append((states.gather(1, rows.unsqueeze(-1).expand(-1, -1, states.shape[-1])),
                           batch[f"{side}_targets"]))
        return picked

    def logps(self, model, batch):
        sides = self.answer_states(model, batch, self.chunked_head)
        sums = [states_logps(model, states, targets, self.chunked_head)
                for states, targets in sides]                                         # 2 x [B]
        return PairLogps(sums[0], sums[1], answer_counts(sides[0][1]),
                         answer_counts(sides[1][1]))


class SequenceLayout:
    """The SFT stage's: one sequence per example (prompt and chosen answer), the loss on the
    answer tokens."""

    name = "sequence"

    def __init__(self, chunked_head: bool = False):
        self.chunked_head = bool(chunked_head)

    def __repr__(self):
        return f"SequenceLayout(chunked_head={self.chunked_head})"

    def length(self, example: dict) -> int:
        """The sequence's tokens."""
        return len(example["input_ids"])

    def collate(self, examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels``, each ``[B, L]`` (right-padded)."""
        length = max(len(e["input_ids"]) for e in examples)
        ids = [e["input_ids"] for e in examples]
        return {"input_ids": pad_to(ids, pad_token_id, length),
                "attention_mask": pad_to([[1] * len(s) for s in ids], 0, length),
                "labels": pad_to([e["labels"] for e in examples], IGNORE_INDEX, length)}

    def nll(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-summed NLL ``[B]`` of the answer tokens, and their counts ``[B]``."""
        targets = batch["labels"][:, 1:]                                                 # [B, L-1]
        states = model_states(model, self.chunked_head, input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"])
        return -states_logps(model, states, targets, self.chunked_head), answer_counts(targets)


def layout_for(cfg) -> PairLayout | SequenceLayout:
    """The layout a run's config asks for: the SFT stage's sequences, or pairs packed
    (``train.shared_prompt``) or side by side; ``train.chunked_head`` for each."""
    chunked = bool(cfg.train.chunked_head)
    if cfg.train.stage == "sft":
        return SequenceLayout(chunked)
    return PackedLayout(chunked) if cfg.train.shared_prompt else PlainLayout(chunked)


def grouping_lengths(cfg, examples: Sequence[dict]) -> list[int]:
    """Per example, what the trainer's batches grouped by length sort on (``train.group_length``):
    ``row``, the positions it takes in a row of :func:`layout_for`'s layout; ``longer_side``, the
    longer answer (:func:`dpo_lib.core.batches.example_length`), as runs before 2026-12-05 did:
    the same for pairs side by side and for SFT, more padding for the packed layout."""
    length = layout_for(cfg).length if cfg.train.group_length == "row" else example_length
    return [length(e) for e in examples]


def pair_layout(cfg) -> PairLayout:
    """The pair layout of ``cfg`` whatever its stage (an SFT run's model scored on pairs)."""
    chunked = bool(cfg.train.chunked_head)
    return PackedLayout(chunked) if cfg.train.shared_prompt else PlainLayout(chunked)


# --------------------------------------------------------------------------------------------
# The packed layout's mask
# --------------------------------------------------------------------------------------------

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
        raise ConfigError(
            f"train.shared_prompt needs an attention implementation that applies a 4-D mask "
            f"({' or '.join(MASK_AWARE_ATTENTION)}); this model uses {implementation!r}, which "
            f"ignores it and would let the chosen answer see the rejected one. Set "
            f"shared_prompt=false, or load the model with attn_implementation='sdpa'.")
    return implementation


def packed_token_fraction(examples: Sequence[dict]) -> float:
    """Tokens of the packed sequences as a share of the plain layout's (before padding)."""
    packed = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"])
                 - len(e["prompt_input_ids"]) for e in examples)
    plain = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in examples)
    return packed / plain if plain else 1.0


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """A collated batch with every tensor on ``device``."""
    return {key: value.to(device) for key, value in batch.items()}


def real_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(tokens, positions)`` of a collated batch of any layout: the real (non-padding) tokens and
    all positions given to the model."""
    masks = [value for key, value in batch.items() if key.endswith("attention_mask")]
    return sum(int(mask.sum()) for mask in masks), sum(mask.numel() for mask in masks)


def padding_fraction(batch: dict[str, torch.Tensor]) -> float:
    """Share of padded positions among all positions of a collated batch."""
    tokens, positions = real_tokens(batch)
    return 1.0 - tokens / positions if positions else 0.0


def padding_report(examples: Sequence[dict], batch_size: int, layout=None,
                   seed: int = 0) -> dict[str, float]:
    """Padding fraction over a whole epoch of batches in ``layout`` (default: sequences for SFT
    examples, pairs side by side otherwise), shuffled at random vs grouped by the layout's
    length (as the trainer groups them)."""
    from .batches import batch_indices

    if layout is None:
        layout = SequenceLayout() if "input_ids" in examples[0] else PlainLayout()
    result, lengths = {}, [layout.length(e) for e in examples]
    for name, grouped in (("random", False), ("length_grouped", True)):
        padded = real = 0
        for indices in batch_indices(examples, batch_size, grouped, seed, lengths):
            tokens, positions = real_tokens(layout.collate([examples[i] for i in indices], 0))
            padded += positions - tokens
            real += tokens
        result[name] = padded / (padded + real)
    return result
