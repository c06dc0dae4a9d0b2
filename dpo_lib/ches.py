"""CHES: which preference pairs pull the chosen answer's likelihood down (likelihood displacement).

Razin et al. 2024 ("Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization") trace the fall of ``log pi(y_w|x)`` under DPO to pairs whose two answers look
alike *to the model*: with ``h_t`` the final hidden state at the position that predicts token
``t`` of an answer (the input of the output layer) and the per-answer sums ::

    s_w = sum_{t in y_w} h_t   [H]        s_l = sum_{t in y_l} h_t   [H]

the *centered hidden embedding similarity* is ::

    CHES(x, y_w, y_l)      = <s_w, s_l> - ||s_w||^2
    CHES_norm(x, y_w, y_l) = <s_w, s_l> / (|y_w| |y_l|) - ||s_w||^2 / |y_w|^2

(``|y|``: answer tokens). Their analysis finds that a DPO step lowers ``log pi(y_w|x)`` the more,
the larger CHES is: the step pushes the hidden states along ``s_w - s_l``, and
``<s_w - s_l, s_w> = -CHES`` is how much of that push points along the chosen answer. The scores are computed with the model
training starts from (SFT), before any step; :func:`filter_pairs` drops the highest share, which
is the filter of their section 6 (they use ``CHES_norm``; both are returned).
"""
from __future__ import annotations

import torch

from .batches import IGNORE_INDEX, collate_preference

#: The score :func:`filter_pairs` ranks by.
FILTER_SCORE = "ches_normalised"


@torch.no_grad()
def answer_hidden_sums(model, examples, batch_size: int, pad_token_id: int,
                       progress: bool = False) -> dict[str, torch.Tensor]:
    """Per pair, the sum of final hidden states over each answer's predicting positions.

    ``examples``: tokenized pairs (:func:`dpo_lib.batches.tokenize_pairs`). Returns fp32
    ``chosen_sums [N, H]``, ``rejected_sums [N, H]``, ``chosen_counts [N]``,
    ``rejected_counts [N]``. One no-grad forward per batch of chosen and rejected rows
    (``[2B, L]``, right-padded), the model as it is (adapter on).
    """
    from .progress import tqdm
    from .forward import length_sorted_batches
    from .logps import final_hidden

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, torch.Tensor] = {}
    try:
        for indices in tqdm(length_sorted_batches(examples, batch_size), desc="CHES",
                            disable=not progress):
            batch = collate_preference([examples[i] for i in indices], pad_token_id)
            ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]).to(device)
            mask = torch.cat([batch["chosen_attention_mask"],
                              batch["rejected_attention_mask"]]).to(device)
            labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]]).to(device)
            hidden = final_hidden(model, input_ids=ids, attention_mask=mask).float()  # [2B, L, H]
            counted = (labels[:, 1:] != IGNORE_INDEX).float()          # [2B, L-1]: predicts t+1
            sums = (hidden[:, :-1] * counted.unsqueeze(-1)).sum(1)     # [2B, H]
            counts = counted.sum(1)                                    # [2B]
            if not out:
                size = len(examples)
                out = {"chosen_sums": torch.zeros(size, sums.shape[1]),
                       "rejected_sums": torch.zeros(size, sums.shape[1]),
                       "chosen_counts": torch.zeros(size), "rejected_counts": torch.zeros(size)}
            half = len(indices)
            out["chosen_sums"][indices] = sums[:half].cpu()
            out["rejected_sums"][indices] = sums[half:].cpu()
            out["chosen_counts"][indices] = counts[:half].cpu()
            out["rejected_counts"][indices] = counts[half:].cpu()
    finally:
        model.train(was_training)
    return out


def ches_scores(chosen_sums: torch.Tensor, rejected_sums: torch.Tensor,
                chosen_counts: torch.Tensor, rejected_counts: torch.Tensor) -> dict:
    """``ches [N]`` and ``ches_normalised [N]`` from the sums of :func:`answer_hidden_sums`
    (``[N, H]`` sums, ``[N]`` token counts), by the formulas of the module docstring."""
    inner = (chosen_sums * rejected_sums).sum(-1)                      # <s_w, s_l>   [N]
    chosen_square = (chosen_sums * chosen_sums).sum(-1)                # ||s_w||^2    [N]
    w, l = chosen_counts.clamp(min=1), rejected_counts.clamp(min=1)
    return {"ches": inner - chosen_square,
            "ches_normalised": inner / (w * l) - chosen_square / (w * w)}


def filter_pairs(count: int, share: float, how: str, scores: torch.Tensor | None = None,
                 seed: int = 0) -> list[int]:
    """Indices (in order) of the pairs kept when ``round(share * count)`` of ``count`` are dropped.

    ``how="ches"``: the highest ``scores [count]`` go (ties: the later index); ``"random"``: a
    seeded uniform draw goes (the control for "fewer, different pairs").
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"data.pair_filter_share must be in [0, 1); got {share}")
    drop = round(share * count)
    if how == "ches":
        if scores is None or len(scores) != count:
            raise ValueError("pair_filter=ches needs one score per pair")
        order = sorted(range(count), key=lambda i: (-float(scores[i]), -i))
        dropped = set(order[:drop])
    elif how == "random":
        generator = torch.Generator().manual_seed(seed)
        dropped = set(torch.randperm(count, generator=generator)[:drop].tolist())
    else:
        raise ValueError(f"data.pair_filter={how!r}: choose null, ches or random")
    return [i for i in range(count) if i not in dropped]


def spearman(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Spearman rank correlation of two ``[N]`` tensors (average ranks for ties) and its
    two-sided p-value against no correlation (scipy's)."""
    from scipy.stats import spearmanr

    result = spearmanr(a.numpy(), b.numpy())
    return float(result.statistic), float(result.pvalue)
