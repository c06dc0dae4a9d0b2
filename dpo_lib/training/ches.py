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
is the filter of their section 6 (they use ``CHES_norm``; both are returned), or, as controls, a
seeded random share or the indices a file names (:func:`read_drop_file`).
"""
from __future__ import annotations

import torch

from ..core.errors import ConfigError, DataError, MissingFileError


#: The score :func:`filter_pairs` ranks by.
FILTER_SCORE = "ches_normalised"


def answer_hidden_sums(model, examples, layout, batch_size: int, accelerator=None,
                       progress: bool = False) -> dict[str, torch.Tensor]:
    """Per pair, the sum of final hidden states over each answer's predicting positions.

    ``examples``: tokenized pairs (:func:`dpo_lib.core.batches.tokenize_pairs`); ``layout``: a
    pair layout (:mod:`dpo_lib.core.layouts`), whose :meth:`hidden_sums` runs one no-grad forward
    per batch through :func:`dpo_lib.core.scoring.pass_over_pairs`, the model as it is (adapter
    on). Returns fp32 ``chosen_sums [N, H]``, ``rejected_sums [N, H]``, ``chosen_counts [N]``,
    ``rejected_counts [N]``.
    """
    from ..core.scoring import pass_over_pairs

    indices, rows = pass_over_pairs(model, examples, layout, batch_size,
                                    lambda m, batch, _: layout.hidden_sums(m, batch),
                                    accelerator, progress=progress, desc="CHES")
    table = torch.zeros(len(examples), rows.shape[1])
    table[indices] = rows
    hidden = (rows.shape[1] - 2) // 2
    return {"chosen_sums": table[:, :hidden], "rejected_sums": table[:, hidden:2 * hidden],
            "chosen_counts": table[:, -2], "rejected_counts": table[:, -1]}


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
                 seed: int = 0, dropped: list[int] | None = None) -> list[int]:
    """Indices (in order) of the pairs kept of ``count``.

    ``how="ches"``: the ``round(share * count)`` highest ``scores [count]`` go (ties: the later
    index); ``"random"``: a seeded uniform draw of as many goes (the control for "fewer, different
    pairs"); ``"file"``: the indices ``dropped`` go (a list made elsewhere, e.g. a control drawn
    per kind of pair: :func:`read_drop_file`), each an index of the pool, none twice.
    """
    if not 0.0 <= share < 1.0:
        raise ConfigError(f"data.pair_filter_share must be in [0, 1); got {share}")
    drop = round(share * count)
    if how == "ches":
        if scores is None or len(scores) != count:
            raise ValueError("pair_filter=ches needs one score per pair")
        order = sorted(range(count), key=lambda i: (-float(scores[i]), -i))
        gone = set(order[:drop])
    elif how == "random":
        generator = torch.Generator().manual_seed(seed)
        gone = set(torch.randperm(count, generator=generator)[:drop].tolist())
    elif how == "file":
        if dropped is None:
            raise ValueError("pair_filter=file needs the list of dropped indices")
        bad = [i for i in dropped if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i < count]
        if bad:
            raise DataError(f"pair_filter=file: {len(bad)} entries are not indices of the pool "
                            f"of {count} pairs (the first: {bad[0]!r})")
        if len(set(dropped)) != len(dropped):
            raise DataError("pair_filter=file: an index is listed twice")
        if len(dropped) >= count:
            raise DataError(f"pair_filter=file drops all {count} pairs of the pool")
        gone = set(dropped)
    else:
        raise ConfigError(f"data.pair_filter={how!r}: choose null, ches, random or file")
    return [i for i in range(count) if i not in gone]


def read_drop_file(path, pool: int, source: str | None = None) -> list[int]:
    """The indices a ``pair_filter=file`` run drops, from ``path``: a JSON list of indices, or an
    object whose ``dropped`` is one (another run's ``pair_filter.json``, or a file of
    :mod:`dpo_lib.lessons.controls`). Where the object records the ``pool`` size (or the data
    ``source``) it was made for, a different one is refused: the indices would name other pairs."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data.pair_filter_file: no file {path}")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"data.pair_filter_file {path}: not JSON ({error})") from None
    if isinstance(content, dict):
        if content.get("pool") is not None and content["pool"] != pool:
            raise DataError(f"data.pair_filter_file {path} was made for a pool of "
                            f"{content['pool']} pairs; this run's pool has {pool} "
                            f"(data.train_limit)")
        if source is not None and content.get("source") not in (None, source):
            raise DataError(f"data.pair_filter_file {path} was made for data "
                            f"{content['source']!r}; this run reads {source!r}")
        content = content.get("dropped")
    if not isinstance(content, list):
        raise DataError(f"data.pair_filter_file {path}: expected a list of indices, or an "
                        "object with 'dropped'")
    return content


def spearman(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Spearman rank correlation of two ``[N]`` tensors (average ranks for ties) and its
    two-sided p-value against no correlation (scipy's)."""
    from scipy.stats import spearmanr

    result = spearmanr(a.numpy(), b.numpy())
    return float(result.statistic), float(result.pvalue)
