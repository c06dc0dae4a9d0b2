"""Tokenized preference pairs and their batches, as the DPO reference implementation makes them.

:func:`tokenize_pairs` turns ``{"prompt", "chosen", "rejected"}`` texts (from :mod:`dpo_lib.data`)
into token-id lists with labels (the prompt masked to :data:`IGNORE_INDEX`); the collators pad them
into ``[B, L]`` tensors; :func:`batch_indices` draws an epoch's batches (length-grouped or not).
"""
from __future__ import annotations

from typing import Sequence

import torch

#: The label of a position that does not count (prompt and padding): PyTorch's cross-entropy default.
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------
# Tokenization, as the DPO reference implementation does it
# --------------------------------------------------------------------------------------------

class TokenizationReport(dict):
    """Counts from :func:`tokenize_pairs`: ``pairs``, ``prompt_truncated``, ``response_truncated``."""

    def __str__(self):
        return ", ".join(f"{key}: {value}" for key, value in self.items())


def _truncate(prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length):
    """Prompt keeps its end, responses keep their start (the reference implementation's rule)."""
    prompt_cut = response_cut = False
    longer = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longer > max_length and len(prompt_ids) > max_prompt_length:
        prompt_ids, prompt_cut = prompt_ids[-max_prompt_length:], True
    if len(prompt_ids) + longer > max_length:
        room = max_length - len(prompt_ids)
        chosen_ids, rejected_ids, response_cut = chosen_ids[:room], rejected_ids[:room], True
    return prompt_ids, chosen_ids, rejected_ids, prompt_cut, response_cut


def tokenize_pairs(pairs: Sequence[dict], tokenizer, max_length: int, max_prompt_length: int,
                   progress: bool = False):
    """Tokenize preference pairs into model inputs.

    Prompt and responses are tokenized separately (no special tokens), EOS is appended to each
    response, then the pair is truncated to ``max_length``: first the prompt to its last
    ``max_prompt_length`` tokens, then both responses to their first ``max_length - len(prompt)``.
    Labels copy the input ids with the prompt masked to -100.

    Returns ``(examples, report)``; each example has lists ``prompt_input_ids`` (P),
    ``chosen_input_ids``/``chosen_labels`` (P + C) and ``rejected_input_ids``/``rejected_labels``
    (P + R). ``report`` counts the truncated prompts and responses.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length "
                         f"({max_length}): the responses need room after the prompt")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end responses with")
    from .progress import tqdm

    report = TokenizationReport(pairs=len(pairs), prompt_truncated=0, response_truncated=0)
    examples = []
    chunk = 512
    bar = tqdm(total=len(pairs), desc="tokenizing", unit="pair", disable=not progress)
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        encoded = {key: tokenizer([p[key] for p in part], add_special_tokens=False)["input_ids"]
                   for key in ("prompt", "chosen", "rejected")}
        for prompt_ids, chosen_ids, rejected_ids in zip(
                encoded["prompt"], encoded["chosen"], encoded["rejected"]):
            eos = [tokenizer.eos_token_id]
            prompt_ids, chosen_ids, rejected_ids, prompt_cut, response_cut = _truncate(
                prompt_ids, chosen_ids + eos, rejected_ids + eos, max_length, max_prompt_length)
            report["prompt_truncated"] += prompt_cut
            report["response_truncated"] += response_cut
            masked = [IGNORE_INDEX] * len(prompt_ids)
            examples.append({
                "prompt_input_ids": prompt_ids,
                "chosen_input_ids": prompt_ids + chosen_ids,
                "chosen_labels": masked + chosen_ids,
                "rejected_input_ids": prompt_ids + rejected_ids,
                "rejected_labels": masked + rejected_ids,
            })
        bar.update(len(part))
    bar.close()
    return examples, report


def sft_examples(examples: Sequence[dict]) -> list[dict]:
    """SFT examples from tokenized pairs: the prompt and the *chosen* response, loss on the response."""
    return [{"input_ids": e["chosen_input_ids"], "labels": e["chosen_labels"]} for e in examples]


# --------------------------------------------------------------------------------------------
# Collation and batching
# --------------------------------------------------------------------------------------------

def pad_to(sequences: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    """Right-pad integer lists to ``length``: a LongTensor of shape ``[len(sequences), length]``."""
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, :len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return out


def collate_preference(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of tokenized pairs into one batch, chosen and rejected to the same length L.

    Returns ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_labels`` and the same three for
    ``rejected``, each ``[B, L]``, so that ``torch.cat`` of chosen and rejected is a ``[2B, L]`` batch
    for one forward pass. Padding is on the right: ids ``pad_token_id``, mask 0, labels -100.
    """
    length = max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in examples)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = [e[f"{side}_input_ids"] for e in examples]
        batch[f"{side}_input_ids"] = pad_to(ids, pad_token_id, length)
        batch[f"{side}_attention_mask"] = pad_to([[1] * len(s) for s in ids], 0, length)
        batch[f"{side}_labels"] = pad_to([e[f"{side}_labels"] for e in examples], IGNORE_INDEX,
                                         length)
    return batch


def collate_sft(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad SFT examples: ``input_ids``, ``attention_mask``, ``labels``, each ``[B, L]``."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = [e["input_ids"] for e in examples]
    return {"input_ids": pad_to(ids, pad_token_id, length),
            "attention_mask": pad_to([[1] * len(s) for s in ids], 0, length),
            "labels": pad_to([e["labels"] for e in examples], IGNORE_INDEX, length)}


def real_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """``(tokens, positions)`` of a collated batch over all its attention masks: the real
    (non-padding) tokens and all positions given to the model."""
    masks = [value for key, value in batch.items() if key.endswith("attention_mask")]
    return sum(int(mask.sum()) for mask in masks), sum(mask.numel() for mask in masks)


def padding_fraction(batch: dict[str, torch.Tensor]) -> float:
    """Share of padded positions among all positions of a collated batch (all its masks)."""
    tokens, positions = real_tokens(batch)
    return 1.0 - tokens / positions if positions else 0.0


def example_length(example: dict) -> int:
    """Tokens one example occupies in a batch (the longer side of a pair)."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))


def batch_indices(examples: Sequence[dict], batch_size: int, group_by_length: bool = True,
                  seed: int = 0) -> list[list[int]]:
    """Shuffled batches of example indices; with ``group_by_length``, examples of similar length
    share a batch (transformers' mega-batch scheme: shuffle, sort within groups of 50 batches),
    which cuts padding while keeping the order random."""
    generator = torch.Generator().manual_seed(seed)
    if group_by_length:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = get_length_grouped_indices([example_length(e) for e in examples], batch_size,
                                           generator=generator)
    else:
        order = torch.randperm(len(examples), generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padding_report(examples: Sequence[dict], batch_size: int, seed: int = 0,
                   collate=None) -> dict[str, float]:
    """Padding fraction over a whole epoch of batches, shuffled at random vs grouped by length.

    ``collate``: how batches are made (default: by the examples' kind; e.g.
    :func:`dpo_lib.packing.collate_shared_prompt` for the packed layout).
    """
    collate = collate or (collate_sft if "input_ids" in examples[0] else collate_preference)
    result = {}
    for name, grouped in (("random", False), ("length_grouped", True)):
        padded = real = 0
        for indices in batch_indices(examples, batch_size, grouped, seed):
            tokens, positions = real_tokens(collate([examples[i] for i in indices], 0))
            padded += positions - tokens
            real += tokens
        result[name] = padded / (padded + real)
    return result
