"""Comparisons over prompts: the unit is the prompt (or pair), never the seed x prompt.

Three seeds of a variant answer the same 48 prompts. Counting 144 "answers" as 144 independent
observations pretends that a prompt answered well three times is three pieces of evidence; it is
one prompt, and the seeds only tell how reliably that prompt is answered. So every test here first
averages each prompt over its seeds, ``a [S_a, P] -> abar [P]``, ``b [S_b, P] -> bbar [P]``,
and then works on the ``P`` per-prompt differences ``d_i = abar_i - bbar_i``:

* :func:`compare_over_prompts` — prompts favouring A or B (sign test), a paired permutation
  (sign-flip) test of ``mean(d)``, and a bootstrap interval for ``mean(d)`` resampling prompts;
* :func:`equivalence_test` — "no difference" as a claim: two one-sided tests against a margin
  stated beforehand;
* :func:`sign_test_power` and :func:`power_statement` — "a difference of X would have been
  detected with probability Y", exactly, from the binomial distribution.

scipy does the tests (``binomtest``, ``permutation_test``, ``bootstrap``, ``ttest_1samp``); the
lesson is what goes into them. :mod:`dpo_lib.lessons.compare` re-exports these names.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


def per_prompt(outcomes) -> np.ndarray:
    """``[S, P]`` (seeds x prompts) or ``[P]`` outcomes -> ``[P]`` float64 means over the seeds.

    Outcomes are 0/1 (good answer or not, right ranking or not) or real-valued scores; a list, a
    numpy array or a CPU tensor."""
    arr = np.asarray(outcomes, dtype=np.float64)
    if arr.ndim == 1:
        return arr
    if arr.ndim == 2:
        return arr.mean(axis=0)
    raise ValueError(f"expected [seeds, prompts] or [prompts] outcomes, got shape {arr.shape}")


def group_means(values, groups) -> np.ndarray:
    """``[N]`` per-pair values and ``[N]`` group ids (the conversation of each pair) -> ``[G]``
    float64 means per group, in the order of the sorted group ids: the unit of the statistics
    when several pairs share one conversation."""
    values, groups = np.asarray(values, dtype=np.float64), np.asarray(groups)
    if values.shape != groups.shape:
        raise ValueError(f"values {values.shape} and groups {groups.shape} differ in shape")
    ids, index = np.unique(groups, return_inverse=True)
    return np.bincount(index, weights=values, minlength=len(ids)) / np.bincount(index)


def _differences(a, b) -> np.ndarray:
    abar, bbar = per_prompt(a), per_prompt(b)
    if abar.shape != bbar.shape:
        raise ValueError(f"a and b cover different prompts: {abar.shape[0]} vs {bbar.shape[0]}")
    return abar - bbar


def _rng_kwarg(function, seed: int) -> dict:
    """scipy >= 1.15 takes ``rng=``; older versions ``random_state=``."""
    name = "rng" if "rng" in inspect.signature(function).parameters else "random_state"
    return {name: np.random.default_rng(seed)}


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def sign_p(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of ``wins`` against ``losses`` under a fair coin
    (``scipy.stats.binomtest``; equals :func:`~dpo_lib.lessons.compare.sign_test_p`)."""
    n = wins + losses
    return float(stats.binomtest(wins, n, 0.5).pvalue) if n else 1.0


@dataclass(frozen=True)
class PromptComparison:
    """:func:`compare_over_prompts`'s result; ``asdict()`` gives a JSON-ready dict."""

    n: int                          # prompts P
    seeds: tuple[int, int]          # S_a, S_b
    mean_a: float                   # mean over prompts of abar
    mean_b: float
    difference: float               # mean(d) = mean_a - mean_b
    a_wins: int                     # prompts with abar_i > bbar_i
    b_wins: int                     # prompts with abar_i < bbar_i
    ties: int                       # prompts with abar_i == bbar_i (left out of the sign test)
    sign_p: float                   # two-sided sign test of a_wins vs b_wins
    permutation_p: float            # two-sided sign-flip test of mean(d)
    interval: tuple[float, float]   # bootstrap interval of mean(d), prompts resampled
    confidence: float

    def asdict(self) -> dict:
        return asdict(self)


def compare_over_prompts(a, b, *, confidence: float = 0.95, n_resamples: int = 9999,
                         seed: int = 0, method: str = "percentile") -> PromptComparison:
    """A against B over the same ``P`` prompts, seeds averaged first.

    Args:
        a, b: ``[S_a, P]`` and ``[S_b, P]`` (or ``[P]``) per-prompt outcomes, 0/1 or real; the
            seed counts may differ (three DPO seeds against the one SFT model).
        confidence: level of the bootstrap interval.
        n_resamples: sign flips and bootstrap resamples; with ``2**P <= n_resamples`` the
            permutation test enumerates every flip (exact).
        seed: seeds both random generators: the same call gives the same p and interval.
        method: ``scipy.stats.bootstrap``'s method; ``"percentile"`` is the one explained here.

    With ``d_i = abar_i - bbar_i`` (``abar_i = (1/S_a) sum_s a[s, i]``):

    * sign test: ``W = #{d_i > 0}``, ``L = #{d_i < 0}`` (ties ``d_i = 0`` say nothing about
      which is better and are left out); under "no difference" ``W ~ Binomial(W + L, 1/2)`` and
      ``p = P(split at least as uneven as W : L)`` (``scipy.stats.binomtest``).
    * permutation (sign-flip) test: under "no difference" each prompt's ``d_i`` is as likely
      ``+d_i`` as ``-d_i``; ``p = P(|mean(e * d)| >= |mean(d)|)`` over random signs
      ``e in {-1, +1}^P`` (``scipy.stats.permutation_test``, one sample: signs flipped). Unlike
      the sign test it weighs a prompt 3/3 vs 0/3 more than 2/3 vs 1/3.
    * bootstrap: ``mean(d*)`` over ``n_resamples`` resamples ``d*`` of the ``P`` prompts with
      replacement; the interval is its ``(1 - c)/2`` and ``(1 + c)/2`` quantiles for the
      percentile method (``scipy.stats.bootstrap``).

    Both tests take "no difference" to mean that ``d_i`` is symmetric about 0, exactly true when
    ``S_a == S_b`` and the runs are exchangeable. With 3 seeds against 1 run and 0/1 outcomes it
    is only true on average over prompts: for a prompt answered well with probability ``q`` by
    every run, ``P(abar > b) = (1 - q)(1 - (1 - q)^3)`` and ``P(abar < b) = q(1 - q^3)`` (0.24
    and 0.10 at ``q = 0.1``, swapped at ``q = 0.9``, equal at 1/2).
    """
    d = _differences(a, b)
    abar, bbar = per_prompt(a), per_prompt(b)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    if np.all(d == 0):
        permutation_p = 1.0
    else:
        permutation_p = float(stats.permutation_test(
            (d,), _mean, permutation_type="samples", vectorized=True, n_resamples=n_resamples,
            alternative="two-sided", **_rng_kwarg(stats.permutation_test, seed)).pvalue)
    if np.ptp(d) == 0:                      # every prompt the same difference: nothing to resample
        interval = (float(d[0]), float(d[0]))
    else:
        ci = stats.bootstrap((d,), _mean, vectorized=True, n_resamples=n_resamples,
                             confidence_level=confidence, method=method,
                             **_rng_kwarg(stats.bootstrap, seed)).confidence_interval
        interval = (float(ci.low), float(ci.high))
    seeds = tuple(np.shape(x)[0] if np.ndim(x) == 2 else 1 for x in (a, b))
    return PromptComparison(n=int(d.shape[0]), seeds=seeds, mean_a=float(abar.mean()),
                            mean_b=float(bbar.mean()), difference=float(d.mean()),
                            a_wins=wins, b_wins=losses, ties=int(d.shape[0]) - wins - losses,
                            sign_p=sign_p(wins, losses), permutation_p=permutation_p,
                            interval=interval, confidence=confidence)


@dataclass(frozen=True)
class Equivalence:
    """:func:`equivalence_test`'s result."""

    n: int                          # prompts
    margin: float                   # the equivalence margin, stated before looking
    alpha: float
    difference: float               # mean(d)
    interval: tuple[float, float]   # (1 - 2 alpha) t-interval of mean(d), or the exact bounds
    p_lower: float                  # H0: mean <= -margin
    p_upper: float                  # H0: mean >= +margin
    p: float                        # max(p_lower, p_upper)
    shown: bool                     # p < alpha: |mean difference| < margin is shown

    def asdict(self) -> dict:
        return asdict(self)


#: Fewer prompts than this that differ at all, and the t approximation of
#: :func:`equivalence_test` is not trusted: the exact bound is used instead.
FEW_DIFFERING = 10


def equivalence_test(a, b, margin: float, alpha: float = 0.05) -> Equivalence:
    """Two one-sided tests (TOST) over prompts: is ``|E[d]| < margin`` shown at level ``alpha``?

    ``a``, ``b``: ``[S, P]`` or ``[P]`` as in :func:`compare_over_prompts`. ``margin > 0`` is
    the largest difference that would not matter (e.g. 0.10 = ten points of good-answer rate);
    it must be fixed before the data are seen, or the test means nothing.

    With ``dbar = mean(d)``, ``se = sd(d) / sqrt(P)`` and ``T ~ t(P - 1)``:

    * ``p_lower = P(T >= (dbar + margin) / se)`` rejects ``H0: E[d] <= -margin``;
    * ``p_upper = P(T <= (dbar - margin) / se)`` rejects ``H0: E[d] >= +margin``;

    equivalence is shown when both reject: ``max(p_lower, p_upper) < alpha``, the same as the
    ``(1 - 2 alpha)`` interval ``dbar -+ t_{1-alpha, P-1} se`` lying inside ``(-margin, margin)``
    (``scipy.stats.ttest_1samp``).

    The t-test approximates; with 0/1 outcomes it fails where few prompts differ (no prompt
    differing would give ``se = 0`` and "shown" from any number of prompts). So when the
    differences lie in ``[-1, 1]`` (0/1 outcomes, or their means over seeds) and fewer than
    :data:`FEW_DIFFERING` prompts differ, an exact bound replaces it: ``E[d] >= margin`` needs
    ``P(d > 0) >= margin`` (as ``d <= 1``), so with ``k+`` of ``P`` prompts above zero
    ``p_upper = P(Binomial(P, margin) <= k+)``, and ``p_lower`` the same with ``k-``; the interval
    is then ``(-U-, U+)``, the exact one-sided ``(1 - alpha)`` upper bounds of ``P(d < 0)`` and
    ``P(d > 0)`` (Clopper-Pearson). It ignores that ups and downs cancel, so it is conservative,
    never too generous. "Not shown" is not "different": it may only mean too few prompts.
    """
    if margin <= 0:
        raise ValueError(f"the equivalence margin must be positive, got {margin}")
    d = _differences(a, b)
    n, dbar = int(d.shape[0]), float(d.mean()) if d.size else 0.0
    if n < 2:
        return Equivalence(n, margin, alpha, dbar, (-np.inf, np.inf), 1.0, 1.0, 1.0, False)
    up, down = int((d > 0).sum()), int((d < 0).sum())
    if np.abs(d).max() <= 1 and up + down < FEW_DIFFERING:
        p_upper = float(stats.binom.cdf(up, n, margin))
        p_lower = float(stats.binom.cdf(down, n, margin))

        def upper_bound(k):                  # exact one-sided (1 - alpha) bound of a rate
            return 1.0 if k == n else float(stats.beta.ppf(1 - alpha, k + 1, n - k))
        interval = (-upper_bound(down), upper_bound(up))
    else:
        p_lower = float(stats.ttest_1samp(d, -margin, alternative="greater").pvalue)
        p_upper = float(stats.ttest_1samp(d, margin, alternative="less").pvalue)
        half = stats.t.ppf(1 - alpha, n - 1) * d.std(ddof=1) / np.sqrt(n)
        interval = (dbar - half, dbar + half)
    p = max(p_lower, p_upper)
    shown = bool(p < alpha)
    return Equivalence(n, margin, alpha, dbar, (float(interval[0]), float(interval[1])),
                       p_lower, p_upper, p, shown)


def sign_test_power(n: int, p_win: float, alpha: float = 0.05) -> float:
    """Exact power of the two-sided sign test on ``n`` untied prompts, each favouring A with
    probability ``p_win`` independently: ``sum over k in R of C(n, k) p^k (1 - p)^(n - k)``,
    ``R = {k : sign_p(k, n - k) <= alpha}`` the splits the test rejects. (At ``p_win = 1/2``
    this is the test's real size, at most ``alpha``: the binomial is discrete.)"""
    if n == 0:
        return 0.0
    ks = np.arange(n + 1)
    rejected = np.array([sign_p(int(k), n - int(k)) <= alpha for k in ks])
    return float(stats.binom.pmf(ks[rejected], n, p_win).sum())


@dataclass(frozen=True)
class Power:
    """:func:`power_statement`'s result; ``statement`` says it in words."""

    n: int
    difference: float
    discordant: float
    alpha: float
    p_win: float
    power: float
    statement: str


def power_statement(n: int, difference: float, discordant: float,
                    alpha: float = 0.05) -> Power:
    """How likely the sign test over ``n`` prompts detects a true ``difference``.

    Assumptions (stated with the result): prompts are independent; each one is *discordant*
    (favours A or B, not a tie) with probability ``discordant``; ``difference = P(favours A) -
    P(favours B)`` — for one 0/1 outcome per prompt exactly the difference of the good-answer
    rates, ``p_A - p_B``. Then a discordant prompt favours A with ``p_win = 1/2 +
    difference / (2 discordant)`` (needs ``|difference| <= discordant``), the number of
    discordant prompts is ``M ~ Binomial(n, discordant)``, and

        ``power = sum_m P(M = m) * sign_test_power(m, p_win, alpha)``   (exact, no simulation).
    """
    if not 0 < discordant <= 1 or abs(difference) > discordant:
        raise ValueError(f"need 0 < discordant <= 1 and |difference| <= discordant, got "
                         f"difference {difference}, discordant {discordant}")
    p_win = 0.5 + difference / (2 * discordant)
    power = float(sum(stats.binom.pmf(m, n, discordant) * sign_test_power(m, p_win, alpha)
                      for m in range(n + 1)))
    statement = (f"a difference of {difference:+.2f} (P(favours A) - P(favours B) per prompt, "
                 f"{discordant:.0%} of prompts untied, prompts independent) would have been "
                 f"detected by the two-sided sign test over {n} prompts at alpha = {alpha} with "
                 f"probability {power:.2f}")
    return Power(n, difference, discordant, alpha, p_win, power, statement)
