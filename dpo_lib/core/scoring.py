"""Score pairs with a model: the no-grad pass over a whole set that the reference pass,
evaluation, CHES, the comparison of runs and the GGUF checks all make.

:func:`pass_over_pairs` runs any per-batch function over every pair (length-sorted batches, each
process its share, gathered); :func:`score_pairs` is the common case, the summed answer log-probs
of every pair in the order of ``examples``.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .batches import example_length
from .layouts import to_device
from .logps import PairLogps


def pad_id(model) -> int:
    """The model's pad token id (0 when it has none)."""
    model = getattr(model, "module", model)
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def length_sorted_batches(examples, batch_size: int, length=example_length) -> list[list[int]]:
    """Batches of indices sorted by ``length`` (a layout's ``length``: the positions an example
    takes in a row): the least padding for a pass whose order is free."""
    order = sorted(range(len(examples)), key=lambda i: length(examples[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def pass_over_pairs(model, examples, layout, batch_size: int, rows_of, accelerator=None,
                    context=None, progress: bool = False,
                    desc: str = "pass") -> tuple[list[int], torch.Tensor]:
    """A no-grad pass over every pair: length-sorted batches in ``layout``, each process its
    share, gathered.

    ``rows_of(model, batch, indices)`` returns a ``[B, K]`` tensor for one collated batch (on the
    model's device: the batches go where the model's weights are). With an ``accelerator`` the
    pass runs under its autocast, as training does; ``context`` (e.g. :func:`dpo_lib.core.lora.reference_mode`) is entered
    around the pass. Returns ``(indices, rows)``: the example index of each row and the ``[N, K]``
    rows of all processes, in the order the pass made them. The model is in eval mode during the
    pass and back in its previous mode after it.
    """
    from .progress import tqdm

    unwrapped = accelerator.unwrap_model(model) if accelerator else model
    device = next(unwrapped.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = length_sorted_batches(examples, batch_size, layout.length)[rank::world]
    autocast = accelerator.autocast() if accelerator is not None else nullcontext()
    results = []
    was_training = unwrapped.training
    unwrapped.eval()
    try:
        with context if context is not None else nullcontext(), autocast:
            for indices in tqdm(mine, desc=desc, disable=not progress or rank != 0):
                batch = to_device(layout.collate([examples[i] for i in indices],
                                                 pad_id(unwrapped)), device)
                results.append((indices, rows_of(unwrapped, batch, indices).float().cpu()))
    finally:
        unwrapped.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    return ([i for indices, _ in results for i in indices],
            torch.cat([values for _, values in results]))


def score_pairs(model, examples, layout, batch_size: int, accelerator=None, context=None,
                progress: bool = False, desc: str = "scoring pairs") -> PairLogps:
    """Every pair's summed answer log-probs and token counts under ``model`` as it is: a
    :class:`~dpo_lib.core.logps.PairLogps` of fp32 ``[N]`` tensors in the order of ``examples``.
    The arguments are :func:`pass_over_pairs`'."""
    indices, rows = pass_over_pairs(model, examples, layout, batch_size,
                                    lambda m, batch, _: layout.logps(m, batch).rows(),
                                    accelerator, context, progress, desc)
    table = torch.zeros(len(examples), 4)
    table[indices] = rows
    return PairLogps.from_rows(table)
