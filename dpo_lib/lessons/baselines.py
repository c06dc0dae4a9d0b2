"""Baselines that learn nothing, for held-out pair accuracies: the shorter answer, a uniform drop.

An accuracy of 0.57 on held-out pairs means little alone: in hh-rlhf the rejected answer is often
the longer one, so "prefer the shorter answer" is right more than half the time without reading a
word. Each accuracy therefore stands beside the accuracy of models that learn nothing:

* **shorter answer** — prefer the answer with fewer tokens (``n_w < n_l``).
* **uniform per-token drop** — a "trained" model that lowers every answer token's log-prob by the
  same ``delta > 0`` relative to its reference: ``log pi(y|x) = log pi_ref(y|x) - delta * n(y)``
  (what a preference loss can reach by pushing everything down, learning no preference). Then

  - summed implicit reward ``r(y) = beta (log pi - log pi_ref) = -beta delta n(y)``:
    ``r_w > r_l  <=>  n_w < n_l`` — exactly the shorter-answer rule, for every ``delta > 0``;
  - per-token implicit reward ``r(y) / n(y) = -beta delta`` for every answer: every margin is 0,
    every pair a tie — chance (0.5 with ties as half; 0 if a tie counts as wrong, as
    :func:`~dpo_lib.lessons.compare.ranked`'s strict ``>`` would score it);
  - summed log-prob ranking: ``log pi_w - log pi_l = (L_w - L_l) - delta (n_w - n_l)`` with
    ``L = log pi_ref``: as ``delta -> 0+`` the reference's own ranking, its exact ties broken
    toward the shorter answer; as ``delta`` grows, the shorter-answer rule; in between, at the
    ``delta`` a model really dropped (:func:`mean_drop`), a mix;
  - per-token log-prob ranking: ``(L_w/n_w - delta) - (L_l/n_l - delta) = L_w/n_w - L_l/n_l``:
    the reference's per-token ranking, for every ``delta``.

Ties (the baseline has no preference) count as half a right answer in :attr:`Baseline.accuracy`
(a coin flip) and are left out of :func:`against_baseline`'s pair-by-pair sign test.
A table: a :class:`~dpo_lib.core.logps.PairLogps` of ``[N]`` tensors, or a dict with the same four
keys holding lists (``comparison.json``'s ``tables``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stats import sign_p

COLUMNS = ("chosen_sums", "rejected_sums", "chosen_counts", "rejected_counts")


def columns(table) -> tuple[np.ndarray, ...]:
    """``(L_w, L_l, n_w, n_l)``: four ``[N]`` float64 arrays from a PairLogps or a dict."""
    get = table.__getitem__ if isinstance(table, dict) else lambda key: getattr(table, key)
    return tuple(np.asarray(get(key), dtype=np.float64) for key in COLUMNS)


@dataclass(frozen=True)
class Baseline:
    """One baseline on ``N`` pairs: ``right [N]`` (the chosen answer strictly preferred) and
    ``tie [N]`` (no preference: a coin flip); ``meaning`` says what the rule is."""

    name: str
    meaning: str
    right: np.ndarray
    tie: np.ndarray

    @property
    def accuracy(self) -> float:
        """``mean(right + tie / 2)``: ties count as half (the coin's expectation)."""
        return float((self.right + 0.5 * self.tie).mean())

    @property
    def strict_accuracy(self) -> float:
        """``mean(right)``: ties count as wrong, as a strict ``chosen > rejected`` scores them."""
        return float(self.right.mean())


def _from_margin(name: str, meaning: str, margin: np.ndarray) -> Baseline:
    return Baseline(name, meaning, margin > 0, margin == 0)


def mean_drop(model, reference) -> float:
    """The uniform drop matched to a model: ``delta = sum (L_ref - L_model) / sum n`` over both
    answers of every pair — the model's mean per-token fall of log-prob below its reference
    (negative when the model raised its log-probs: a uniform rise, which favours the longer
    answer in the summed log-prob ranking)."""
    mw, ml, nw, nl = columns(model)
    rw, rl, _, _ = columns(reference)
    return float(((rw - mw).sum() + (rl - ml).sum()) / (nw.sum() + nl.sum()))


def length_baselines(table, reference=None, delta: float | None = None) -> dict[str, Baseline]:
    """Name -> :class:`Baseline` for the pairs of ``table`` (only its token counts are read).

    Without ``reference``: ``"shorter answer"``, ``"uniform drop: summed reward"`` (the same
    vectors, derived from ``r = -delta n``) and ``"uniform drop: per-token reward"`` (all ties).
    With a ``reference`` table (``log pi_ref`` of the same pairs), also the drop model's log-prob
    rankings: ``"uniform drop: summed log-prob, delta -> 0+"``, ``"... delta = <delta>"`` when
    ``delta`` is given (e.g. :func:`mean_drop` of a trained model), and ``"uniform drop: per-token
    log-prob"`` (the reference's per-token ranking for every delta). See the module docstring.
    """
    _, _, nw, nl = columns(table)
    longer = nl - nw                              # > 0: the chosen answer is the shorter one
    out = {
        "shorter answer": _from_margin(
            "shorter answer", "prefer the answer with fewer tokens; equal lengths: a coin", longer),
        "uniform drop: summed reward": _from_margin(
            "uniform drop: summed reward",
            "r = -beta*delta*n for every answer: r_w - r_l = beta*delta*(n_l - n_w), "
            "the shorter-answer rule for any delta > 0", longer),
        "uniform drop: per-token reward": _from_margin(
            "uniform drop: per-token reward",
            "r/n = -beta*delta for every answer: every margin 0, chance", np.zeros_like(longer)),
    }
    if reference is None:
        return out
    lw, ll, rnw, rnl = columns(reference)
    if not (np.array_equal(rnw, nw) and np.array_equal(rnl, nl)):
        raise ValueError("reference and table count different answer tokens: not the same pairs")
    summed = lw - ll
    # delta -> 0+: the reference's summed margin, exact ties broken by -delta (n_w - n_l)
    limit = np.where(summed != 0, summed, longer)
    out["uniform drop: summed log-prob, delta -> 0+"] = _from_margin(
        "uniform drop: summed log-prob, delta -> 0+",
        "(L_w - L_l) - delta (n_w - n_l) as delta -> 0+: the reference's summed ranking, "
        "its ties to the shorter answer", limit)
    if delta is not None:
        name = f"uniform drop: summed log-prob, delta = {delta:.4g}"
        out[name] = _from_margin(name, f"(L_w - L_l) - {delta:.4g} (n_w - n_l), L = log pi_ref",
                                 summed + delta * longer)
    out["uniform drop: per-token log-prob"] = _from_margin(
        "uniform drop: per-token log-prob",
        "L_w/n_w - L_l/n_l: the reference's per-token ranking, whatever delta",
        lw / np.maximum(nw, 1) - ll / np.maximum(nl, 1))
    return out


def against_baseline(model_right, baseline: Baseline) -> dict:
    """A model's ``[N]`` right/wrong rankings against a baseline, pair by pair (exact McNemar =
    sign test on the discordant pairs): ``model_alone`` (model right, baseline wrong),
    ``baseline_alone`` (the reverse), ``ties_left_out`` (pairs where the baseline has no
    preference), the two-sided ``p``, and both accuracies (the baseline's with ties as half)."""
    right = np.asarray(model_right, dtype=bool)
    decided = ~baseline.tie
    alone = int((right & ~baseline.right & decided).sum())
    base_alone = int((~right & baseline.right).sum())
    return {"baseline": baseline.name, "model_accuracy": float(right.mean()),
            "baseline_accuracy": baseline.accuracy, "model_alone": alone,
            "baseline_alone": base_alone, "ties_left_out": int(baseline.tie.sum()),
            "p": sign_p(alone, base_alone)}
