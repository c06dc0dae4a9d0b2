"""Batches of pairs through the model: collation in either layout, one forward pass per batch,
and the no-grad pass over a whole set that the reference pass and evaluation share.

A DPO step starts here: :func:`collate_pairs` pads the pairs (chosen and rejected side by side,
or packed behind one prompt, :mod:`dpo_lib.packing`); :func:`pair_logps` runs the policy once and
returns a :class:`~dpo_lib.logps.PairLogps` (summed answer log-probs and token counts ``[B]``);
:mod:`dpo_lib.losses` turns those into the loss. :func:`sft_nll` is the SFT stage's counterpart.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from . import packing
from .batches import collate_preference, example_length
from .logps import PairLogps, answer_counts, model_states, states_logps


def concatenated_logps(model, batch: dict[str, torch.Tensor],
                       chunked_head: bool = False) -> PairLogps:
    """Chosen and rejected in one forward pass.

    ``batch`` from :func:`dpo_lib.batches.collate_preference` (``[B, L]`` tensors). Returns fp32
    ``[B]`` summed response log-probs and the number of response tokens they sum over.
    ``chunked_head``: apply the output layer only at answer positions, in chunks
    (:func:`dpo_lib.logps.head_logps`) instead of taking the model's ``[2B, L, V]`` logits.
    """
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])      # [2B, L]
    attention_mask = torch.cat([batch["chosen_attention_mask"],
                                batch["rejected_attention_mask"]])
    targets = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]       # [2B, L-1]
    states = model_states(model, chunked_head, input_ids=input_ids,
                          attention_mask=attention_mask)                                # [2B, L, V|H]
    sums = states_logps(model, states, targets, chunked_head)                            # [2B]
    counts = answer_counts(targets)                                                      # [2B]
    size = batch["chosen_input_ids"].shape[0]
    return PairLogps(sums[:size], sums[size:], counts[:size], counts[size:])


def collate_pairs(examples, pad_token_id: int, shared: bool = False) -> dict[str, torch.Tensor]:
    """A batch of pairs for :func:`pair_logps`: packed behind one prompt, or chosen and rejected
    padded side by side (:func:`dpo_lib.batches.collate_preference`)."""
    if shared:
        return packing.collate_shared_prompt(examples, pad_token_id)
    return collate_preference(examples, pad_token_id)


def pair_logps(model, batch: dict[str, torch.Tensor], chunked_head: bool = False) -> PairLogps:
    """Summed answer log-probs and counts ``[B]`` of a batch from :func:`collate_pairs` (either
    layout)."""
    if "segment_ids" in batch:
        return packing.shared_prompt_logps(model, batch, chunked_head)
    return concatenated_logps(model, batch, chunked_head)


def sft_nll(model, batch: dict[str, torch.Tensor], chunked_head: bool = False):
    """Token-summed NLL ``[B]`` and the token counts ``[B]`` of one SFT batch
    (:func:`dpo_lib.batches.collate_sft`: ``[B, L]`` ``input_ids``, ``attention_mask``, ``labels``)."""
    targets = batch["labels"][:, 1:]                                                     # [B, L-1]
    states = model_states(model, chunked_head, input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"])
    return -states_logps(model, states, targets, chunked_head), answer_counts(targets)


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def pad_id(model) -> int:
    """The model's pad token id (0 when it has none)."""
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def length_sorted_batches(examples, batch_size: int) -> list[list[int]]:
    """Batches of indices sorted by length: the least padding for a pass whose order is free."""
    order = sorted(range(len(examples)), key=lambda i: example_length(examples[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def pass_over_pairs(model, examples, batch_size: int, rows_of, accelerator=None,
                    shared: bool = False, context=None, progress: bool = False,
                    desc: str = "pass") -> tuple[list[int], torch.Tensor]:
    """A no-grad pass over every pair: length-sorted batches, each process its share, gathered.

    ``rows_of(model, batch, indices)`` returns a ``[B, K]`` tensor for one collated batch (on the
    model's device); ``context`` (e.g. :func:`dpo_lib.models.reference_mode`) is entered around
    the pass. Returns ``(indices, rows)``: the example index of each row and the ``[N, K]`` rows of
    all processes, in the order the pass made them (process by process). The model is in eval
    mode during the pass and back in its previous mode after it.
    """
    from .progress import tqdm

    device = accelerator.device if accelerator else next(model.parameters()).device
    unwrapped = accelerator.unwrap_model(model) if accelerator else model
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = length_sorted_batches(examples, batch_size)[rank::world]
    results = []
    was_training = unwrapped.training
    unwrapped.eval()
    with context if context is not None else nullcontext():
        for indices in tqdm(mine, desc=desc, disable=not progress or rank != 0):
            batch = to_device(collate_pairs([examples[i] for i in indices], pad_id(unwrapped),
                                            shared), device)
            results.append((indices, rows_of(unwrapped, batch, indices).cpu()))
    unwrapped.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    return ([i for indices, _ in results for i in indices],
            torch.cat([values for _, values in results]))
