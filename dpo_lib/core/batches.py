"""Tokenized preference pairs and the order they are batched in.

:func:`tokenize_pairs` turns ``{"prompt", "chosen", "rejected"}`` texts (from
:mod:`dpo_lib.core.data`) into token-id lists with labels (the prompt masked to
:data:`IGNORE_INDEX`), as the DPO reference implementation does; :func:`load_examples` reads and
tokenizes one split of a config's data; :func:`batch_indices` draws an epoch's batches
(length-grouped or not). How a batch of them is padded and run is a layout's business
(:mod:`dpo_lib.core.layouts`).
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
        from .errors import ConfigError

        raise ConfigError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length "
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


def load_examples(cfg, tokenizer, split: str, limit: int | None):
    """Tokenized preference examples of one split of ``cfg``'s data, the pairs and their row
    accounting: ``(pairs, examples, report)``. No usable pair is a :class:`DataError`."""
    from .data import load_split
    from .errors import DataError

    pairs, report = load_split(cfg, split, limit)
    if not pairs:
        raise DataError(f"no usable pairs in {cfg.data.source} ({split}): {dict(report)}")
    examples, _ = tokenize_pairs(pairs, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length)
    return pairs, examples, report


def sft_examples(examples: Sequence[dict]) -> list[dict]:
    """SFT examples from tokenized pairs: the prompt and the *chosen* response, loss on the response."""
    return [{"input_ids": e["chosen_input_ids"], "labels": e["chosen_labels"]} for e in examples]


# --------------------------------------------------------------------------------------------
# The order of batches (how each batch is padded and run is a layout's: dpo_lib.core.layouts)
# --------------------------------------------------------------------------------------------

def example_length(example: dict) -> int:
    """Tokens one example occupies in a row of a batch with chosen and rejected side by side (the
    longer side of a pair) or in a sequence batch. The packed layout's rows are longer:
    :meth:`dpo_lib.core.layouts.PackedLayout.length`."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))


def batch_indices(examples: Sequence[dict], batch_size: int, group_by_length: bool = True,
                  seed: int = 0, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Shuffled batches of example indices; with ``group_by_length``, examples of similar length
    share a batch (transformers' mega-batch scheme: shuffle, sort within groups of up to 50
    batches), which cuts padding while keeping the order random. ``lengths``: per example, the
    positions it takes in a row of the batch's layout (:func:`dpo_lib.core.layouts.grouping_lengths`;
    default :func:`example_length`); grouping by another length than the rows have leaves padding
    that the right one removes."""
    generator = torch.Generator().manual_seed(seed)
    if group_by_length:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        if lengths is None:
            lengths = [example_length(e) for e in examples]
        order = get_length_grouped_indices(list(lengths), batch_size,
                                           generator=generator)
    else:
        order = torch.randperm(len(examples), generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
