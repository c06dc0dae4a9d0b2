"""Held-out comparison of trained runs: sign test, accuracies, and the command line in tiny."""
import json
from math import comb

import pytest
import torch

from dpo_lib.lessons import compare
from dpo_lib.training import train as train_lib
from dpo_lib.core.config import load_config
from dpo_lib.core.logps import PairLogps


def test_sign_test_by_hand():
    a = torch.tensor([True, True, True, False, False, True])
    b = torch.tensor([True, False, False, False, True, True])
    wins, losses, p = compare.sign_test(a, b)                 # a alone: 2, b alone: 1, ties: 3
    assert (wins, losses) == (2, 1)
    assert p == pytest.approx(2 * (comb(3, 0) + comb(3, 1)) / 2 ** 3) == 1.0
    # notebook 06's DPO vs SFT split, 25 to 8: p = 2 * P(X <= 8), X ~ Binomial(33, 1/2)
    a, b = torch.tensor([True] * 25 + [False] * 8), torch.tensor([False] * 25 + [True] * 8)
    assert compare.sign_test(a, b)[2] == pytest.approx(
        2 * sum(comb(33, i) for i in range(9)) / 2 ** 33)
    assert compare.sign_test(a, a) == (0, 0, 1.0)
    assert compare.sign_test_p(3, 0) == 2 / 8 and compare.sign_test_p(5, 5) == 1.0


def test_accuracies_and_sign_tests_from_tables():
    def table(chosen, rejected, counts=(1, 1, 1, 1)):
        return PairLogps(torch.tensor(chosen), torch.tensor(rejected),
                         torch.tensor(counts, dtype=torch.float),
                         torch.tensor(counts, dtype=torch.float))

    tables = {"base": table([-5., -5., -5., -5.], [-4., -6., -4., -6.]),
              "SFT": table([-4., -4., -6., -6.], [-4., -6., -4., -6.]),
              "DPO": table([-3., -3., -3., -9.], [-6., -9., -9., -6.])}
    acc = compare.accuracies(tables)
    assert acc["base"]["log-prob ranking (summed)"] == 0.5
    assert acc["SFT"]["reward vs SFT"] == 0 and acc["base"]["reward vs base"] == 0
    assert acc["SFT"]["reward vs base"] == 0.5           # rewards chosen [1, 1, -1, -1], rejected 0
    assert acc["DPO"]["reward vs SFT"] == 0.75
    rows = {(r["scale"], r["a"], r["b"]): r for r in compare.sign_tests(tables)}
    assert ("reward vs base", "SFT", "base") not in rows   # base is the reference there
    dpo = rows[("log-prob ranking (summed)", "DPO", "SFT")]
    assert (dpo["a_alone"], dpo["b_alone"]) == (2, 0)     # DPO alone right on pairs 0 and 2


def test_compare_command_in_tiny(tmp_path, monkeypatch):
    """Two tiny runs (SFT, then DPO from it) compared on held-out pairs, logs copied out."""
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    common = {"eval_every": 0, "save_every": 0, "train_limit": 32, "test_limit": 16,
              "sft_steps": 4, "preference_steps": 4}
    sft = load_config("tiny", overrides={**common, "output_dir": str(tmp_path / "sft")})
    train_lib.train(sft, progress=False)
    dpo = load_config("tiny", overrides={**common, "stage": "preference",
                                         "init_adapter": str(tmp_path / "sft"),
                                         "output_dir": str(tmp_path / "dpo")})
    train_lib.train(dpo, progress=False)
    out = tmp_path / "out"
    # a run's name with a dot (a sweep's "dpo-b0.3") is no peft adapter name: still compared
    assert compare.main(["tiny", f"sft={tmp_path / 'sft'}", f"dpo={tmp_path / 'dpo'}",
                         f"dpo-b0.3={tmp_path / 'dpo'}", "--pairs", "12", "--answers", "2",
                         "--out", str(out), "--judge", "3", "--train-pairs", "dpo"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert result["pairs"] == 12 and set(result["accuracy"]) == {"base", "SFT", "DPO", "DPO-B0.3"}
    assert result["tables"]["DPO-B0.3"] == result["tables"]["DPO"]      # the same adapter twice
    assert result["accuracy"]["SFT"]["reward vs SFT"] == 0
    assert len(result["answers"]) == 2          # bundled data: no hh-rlhf probes
    assert len(result["judged"]["answers"]["DPO"]) == 3
    assert set(result["answers"][0]) == {"prompt", "base", "SFT", "DPO", "DPO-B0.3"}
    assert (out / "dpo" / "metrics.jsonl").is_file() and (out / "sft" / "config.yaml").is_file()
    assert {name: len(labels) for name, labels in result["judged"]["labels"].items()} == \
        {"SFT": 3, "DPO": 3, "DPO-B0.3": 3}
    assert [row["model"] for row in result["judged"]["sign_tests"]] == ["DPO", "DPO-B0.3"]
    training = result["training"]
    assert set(training["tables"]) == {"SFT", "DPO"}
    assert len(training["tables"]["DPO"]["chosen_sums"]) == training["pairs"] == \
        load_config("tiny").data.train_limit
    assert len(result["tables"]["DPO"]["chosen_sums"]) == 12
    assert len(result["conversations"]) == 12 and result["conversations"][0] == 0
    with pytest.raises(SystemExit):
        compare.main(["tiny", f"sft={tmp_path / 'sft'}", "--train-pairs", "ipo"])
    with pytest.raises(SystemExit):
        compare.main(["tiny", f"dpo={tmp_path / 'dpo'}"])              # no SFT run named


def test_good_answer_tests_by_hand():
    labels = {"SFT": ["good", "wrong", "good", "rude", "good"],
              "DPO": ["good", "good", "wrong", "good", "good"]}
    (row,) = compare.good_answer_tests(labels)
    assert (row["good"], row["against_good"]) == (4, 3)
    assert (row["model_alone"], row["against_alone"]) == (2, 1)      # prompts 1, 3 vs prompt 2
    assert row["p"] == compare.sign_test_p(2, 1)


# --- comparisons over prompts (dpo_lib.lessons.stats) ----------------------------------------

def test_compare_over_prompts_by_hand():
    """3 prompts x 2 seeds against one SFT run: seed means [1, 1/2, 1/2] vs [0, 0, 1]."""
    a = [[1, 0, 1],
         [1, 1, 0]]
    b = [0, 0, 1]
    r = compare.compare_over_prompts(a, b)
    assert (r.n, r.seeds) == (3, (2, 1))
    assert (r.a_wins, r.b_wins, r.ties) == (2, 1, 0)      # d = [1, 1/2, -1/2]
    assert r.difference == pytest.approx(1 / 3)
    assert r.mean_a == pytest.approx(2 / 3) and r.mean_b == pytest.approx(1 / 3)
    assert r.sign_p == compare.sign_test_p(2, 1) == 1.0
    # sign flips of [1, 1/2, -1/2]: sums 2, 1, 1, 0, 0, -1, -1, -2; |sum| >= 1 in 6 of 8
    assert r.permutation_p == pytest.approx(6 / 8)
    # a tie is left out of the sign test: seed means [1, 1/2, 1/2] vs [0, 1/2, 0]
    r = compare.compare_over_prompts([[1, 0, 1], [1, 1, 0]], [[0, 0, 0], [0, 1, 0]])
    assert (r.a_wins, r.b_wins, r.ties) == (2, 0, 1)
    assert r.sign_p == compare.sign_test_p(2, 0) == 0.5
    assert set(r.asdict()) >= {"a_wins", "b_wins", "sign_p", "permutation_p", "interval", "n"}
    with pytest.raises(ValueError):
        compare.compare_over_prompts([1, 0, 1], [1, 0])


def test_permutation_p_is_the_exact_enumeration():
    from itertools import product

    import numpy as np

    d = np.array([0.9, -0.2, 0.5, 1.3, 0.1, -0.7, 0.4])
    observed = abs(d.mean())
    flips = [abs((np.array(signs) * d).mean()) for signs in product((-1, 1), repeat=len(d))]
    exact = sum(f >= observed - 1e-12 for f in flips) / len(flips)       # 2**7 = 128 flips
    r = compare.compare_over_prompts(d, np.zeros_like(d))
    assert r.permutation_p == pytest.approx(exact)
    assert (r.a_wins, r.b_wins) == (5, 2)


def test_bootstrap_interval_covers_the_true_difference_and_is_seeded():
    import numpy as np

    rng = np.random.default_rng(1)
    prompts = 2000
    easy = rng.uniform(0.2, 0.8, prompts)                    # each prompt its own difficulty
    a = rng.random((3, prompts)) < np.clip(easy + 0.1, 0, 1)          # 3 seeds
    b = rng.random((2, prompts)) < easy                               # 2 seeds
    true = float(np.clip(easy + 0.1, 0, 1).mean() - easy.mean())      # 0.1 up to the clip
    r = compare.compare_over_prompts(a, b, seed=7, n_resamples=2000)
    low, high = r.interval
    assert low < true < high and high - low < 0.06
    d = a.mean(0) - b.mean(0)
    half = 1.96 * d.std(ddof=1) / np.sqrt(prompts)                    # the normal interval
    assert low == pytest.approx(d.mean() - half, abs=0.005)
    assert high == pytest.approx(d.mean() + half, abs=0.005)
    again = compare.compare_over_prompts(a, b, seed=7, n_resamples=2000)
    assert again.interval == r.interval and again.permutation_p == r.permutation_p
    assert compare.compare_over_prompts(a, b, seed=8, n_resamples=2000).interval != r.interval


def test_equivalence_needs_enough_prompts():
    import numpy as np
    from scipy import stats as scipy_stats

    rng = np.random.default_rng(0)
    a, b = rng.random((3, 3000)) < 0.5, rng.random((3, 3000)) < 0.5   # no true difference
    eq = compare.equivalence_test(a, b, margin=0.05)
    assert eq.shown and eq.p < 0.05 and -0.05 < eq.interval[0] < eq.interval[1] < 0.05
    d = a.mean(0) - b.mean(0)                                           # TOST by hand
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert eq.p_lower == pytest.approx(scipy_stats.t.sf((d.mean() + 0.05) / se, len(d) - 1))
    assert eq.p_upper == pytest.approx(scipy_stats.t.cdf((d.mean() - 0.05) / se, len(d) - 1))
    small = compare.equivalence_test(a[:, :6], b[:, :6], margin=0.05)
    assert not small.shown and small.p > 0.05
    for prompts in (50, 200, 300, 400):            # shown <=> the 90 % interval inside +-margin
        eq = compare.equivalence_test(a[:, :prompts], b[:, :prompts], margin=0.05)
        assert eq.shown == (eq.p < 0.05) == (-0.05 < eq.interval[0] < eq.interval[1] < 0.05)
    middling = compare.equivalence_test(a[:, :200], b[:, :200], margin=0.05)
    assert not middling.shown and 0.05 < middling.p < 0.2        # close, still not shown
    far = compare.equivalence_test(np.ones(50), np.r_[np.zeros(25), np.ones(25)], margin=0.1)
    assert not far.shown                                                # difference 0.5
    with pytest.raises(ValueError):
        compare.equivalence_test(a, b, margin=0)


def test_sign_test_power_exact():
    from scipy import stats as scipy_stats

    assert compare.sign_test_power(5, 0.9) == 0.0        # 5 : 0 has p = 1/16 > 0.05
    assert compare.sign_test_power(6, 0.9) == pytest.approx(0.9 ** 6 + 0.1 ** 6)   # {0, 6}
    for n in (10, 33, 48):
        assert compare.sign_test_power(n, 0.5) <= 0.05                 # the size
    # discordant = 1: every prompt untied, the mixture is one binomial
    one = compare.power_statement(20, 0.4, discordant=1.0)
    assert one.p_win == pytest.approx(0.7)
    assert one.power == pytest.approx(compare.sign_test_power(20, 0.7))
    # by hand over M ~ Binomial(4, 1/2) discordant prompts, all favouring A (p_win = 1):
    # only M = 4 can reach p <= 0.125
    hand = scipy_stats.binom.pmf(4, 4, 0.5)
    assert compare.power_statement(4, 0.5, 0.5, alpha=0.125).power == pytest.approx(hand)
    powers = [compare.power_statement(48, x, 0.3).power for x in (0.0, 0.1, 0.2, 0.3)]
    assert powers == sorted(powers) and powers[-1] > 0.95
    assert "48 prompts" in compare.power_statement(48, 0.1, 0.3).statement
    with pytest.raises(ValueError):
        compare.power_statement(48, 0.4, 0.3)             # more difference than discord


# --- baselines that learn nothing (dpo_lib.lessons.baselines) --------------------------------

def _pairs(chosen, rejected, n_chosen, n_rejected):
    return PairLogps(*(torch.tensor(x, dtype=torch.float)
                       for x in (chosen, rejected, n_chosen, n_rejected)))


def test_length_baselines_on_a_hand_table():
    import numpy as np

    #              pair:   0      1      2      3      4      5
    ref = _pairs([-14., -20., -12., -30., -6., -9.],       # L_w
                 [-12., -15., -12., -30., -8., -20.],      # L_l
                 [5, 10, 4, 6, 4, 3],                       # n_w
                 [8, 6, 6, 6, 2, 10])                       # n_l
    out = compare.length_baselines(ref, reference=ref, delta=1.0)
    shorter = out["shorter answer"]
    # direct count: chosen shorter in pairs 0, 2, 5; a tie in 3; chosen longer in 1, 4
    assert shorter.right.tolist() == [True, False, True, False, False, True]
    assert shorter.tie.tolist() == [False, False, False, True, False, False]
    assert shorter.accuracy == pytest.approx(3.5 / 6) and shorter.strict_accuracy == 0.5
    assert np.array_equal(out["uniform drop: summed reward"].right, shorter.right)
    assert np.array_equal(out["uniform drop: summed reward"].tie, shorter.tie)
    per_token = out["uniform drop: per-token reward"]
    assert per_token.accuracy == 0.5 and per_token.strict_accuracy == 0 and per_token.tie.all()
    # reference margins L_w - L_l = [-2, -5, 0, 0, 2, 11]; n_l - n_w = [3, -4, 2, 0, -2, 7]
    # delta -> 0+: the reference's signs, its ties (pairs 2, 3) to the shorter answer
    limit = out["uniform drop: summed log-prob, delta -> 0+"]
    assert limit.right.tolist() == [False, False, True, False, True, True]
    assert limit.tie.tolist() == [False, False, False, True, False, False]
    # delta = 1: margins [1, -9, 2, 0, 0, 18]
    one = out["uniform drop: summed log-prob, delta = 1"]
    assert one.right.tolist() == [True, False, True, False, False, True]
    assert one.tie.tolist() == [False, False, False, True, True, False]
    # delta = 10: margins [28, -45, 20, 0, -18, 81]: the shorter-answer rule again
    big = compare.length_baselines(ref, reference=ref, delta=10.0)
    assert big["uniform drop: summed log-prob, delta = 10"].right.tolist() == \
        shorter.right.tolist()
    # per token, any delta: L_w/n_w - L_l/n_l = [-1.3, 0.5, -1, 0, 2.5, -1]
    assert out["uniform drop: per-token log-prob"].right.tolist() == \
        [False, True, False, False, True, False]
    assert len(compare.length_baselines(ref)) == 3   # without a reference: the reward rules only


def test_uniform_drop_is_what_the_rankings_score():
    """A model that is its reference minus delta per token, scored by compare.ranked."""
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    n_w = torch.randint(1, 30, (200,), generator=gen).float()
    n_l = torch.randint(1, 30, (200,), generator=gen).float()
    # quarter steps: every sum and difference below is exact in fp32
    ref = PairLogps(-n_w * 1.5 - torch.randint(0, 40, (200,), generator=gen) * 0.25,
                    -n_l * 1.5 - torch.randint(0, 40, (200,), generator=gen) * 0.25, n_w, n_l)
    delta = 0.25
    drop = PairLogps(ref.chosen_sums - delta * n_w, ref.rejected_sums - delta * n_l, n_w, n_l)
    tables = {"ref": ref, "drop": drop}
    assert compare.mean_drop(drop, ref) == pytest.approx(delta)
    out = compare.length_baselines(drop, reference=ref, delta=delta)
    strict_shorter = (n_w < n_l).numpy()
    assert np.array_equal(compare.ranked(tables, "drop", reference="ref").numpy(), strict_shorter)
    assert np.array_equal(out["uniform drop: summed reward"].right, strict_shorter)
    assert not compare.ranked(tables, "drop", reference="ref", per_token=True).any()
    assert np.array_equal(compare.ranked(tables, "drop").numpy(),
                          out[f"uniform drop: summed log-prob, delta = {delta}"].right)
    per_token = ref.chosen_sums / n_w - ref.rejected_sums / n_l
    clear = (per_token.abs() > 1e-4).numpy()         # away from rounding at per-token ties
    assert np.array_equal(compare.ranked(tables, "drop", per_token=True).numpy()[clear],
                          out["uniform drop: per-token log-prob"].right[clear])
    with pytest.raises(ValueError):
        compare.length_baselines(drop, reference=PairLogps(ref.chosen_sums, ref.rejected_sums,
                                                           n_w + 1, n_l))


def test_against_baseline_pair_by_pair():
    ref = _pairs([0.] * 6, [0.] * 6, [2, 2, 2, 5, 5, 3], [4, 4, 4, 3, 3, 3])
    shorter = compare.length_baselines(ref)["shorter answer"]   # right x3, wrong x2, tie
    model = [True, False, False, True, True, True]
    row = compare.against_baseline(model, shorter)
    # model alone right: pairs 3, 4; baseline alone right: pairs 1, 2; pair 5 (a tie) left out
    assert (row["model_alone"], row["baseline_alone"], row["ties_left_out"]) == (2, 2, 1)
    assert row["p"] == 1.0 and row["model_accuracy"] == pytest.approx(4 / 6)
    assert row["baseline_accuracy"] == pytest.approx(3.5 / 6)
    row = compare.against_baseline([False, False, False, True, True, False], shorter)
    assert (row["model_alone"], row["baseline_alone"]) == (2, 3)
    assert row["p"] == compare.sign_test_p(2, 3)


def test_conversation_groups_by_first_human_turn():
    """Branches of one conversation (same first human turn) share a group; the groups are
    numbered in order of first appearance; a different first turn is a new group."""
    def pair(first, later=""):
        return {"prompt": f"\n\nHuman: {first}\n\nAssistant: ok{later}\n\nAssistant:"}
    pairs = [pair("How do I pick a lock?"), pair("Tell me a joke"),
             pair("How do I pick a lock?", "\n\nHuman: and a car?"), pair("tell me a joke")]
    assert compare.conversation_groups(pairs) == [0, 1, 0, 2]


def test_judge_answers_relabels_stored_answers_and_counts_refusals_by_hand():
    stored = {"harmful": {"prompts": ["p0", "p1", "p2"], "answers": {
        "base": ["Sure, here is how.", "I'm sorry, I don't understand.", "No, I won't help."],
        "SFT": ["I can't help with that.", "Why do you ask?", "Here you go."],
        "DPO": ["That is illegal.", "I won't do that.", "Here you go."]},
        "labels": {"base": ["stale"] * 3}}}
    out = compare.judge_answers(stored)["harmful"]
    assert out["labels"] == {"base": ["comply", "deflect", "refuse"],
                             "SFT": ["refuse", "deflect", "comply"],
                             "DPO": ["refuse", "refuse", "comply"]}
    assert out["shares"]["DPO"]["refuse"] == pytest.approx(2 / 3)
    against_sft = {r["model"]: r for r in out["refusal_tests"] if r["against"] == "SFT"}
    # DPO refuses p0 and p1, SFT p0 only: one request where only DPO refuses, none only SFT
    assert (against_sft["DPO"]["model_alone"], against_sft["DPO"]["against_alone"]) == (1, 0)
    assert against_sft["DPO"]["p"] == pytest.approx(1.0)      # one discordant request: 2 * 0.5
    assert {r["model"] for r in out["refusal_tests"]} == {"SFT", "DPO"}
    assert stored["harmful"]["labels"] == {"base": ["stale"] * 3}   # the input is not changed


def test_equivalence_with_few_differing_prompts_is_exact():
    import numpy as np
    from scipy import stats as scipy_stats

    same = np.ones(48)
    # no prompt differs: shown from 48 prompts (0.9^48 = 0.0064), not from 10 (0.9^10 = 0.35)
    eq = compare.equivalence_test(same, same, margin=0.10)
    assert eq.shown and eq.p == pytest.approx(0.9 ** 48)
    assert eq.interval[1] == pytest.approx(1 - 0.05 ** (1 / 48))       # Clopper-Pearson, k = 0
    few = compare.equivalence_test(same[:10], same[:10], margin=0.10)
    assert not few.shown and few.p == pytest.approx(0.9 ** 10)
    # 5 of 48 differ, 2 up and 3 down: the t-test would call it shown; the exact bound does not
    a, b = same.copy(), same.copy()
    a[:2], b[2:5] = 0, 0
    eq = compare.equivalence_test(b, a, margin=0.10)
    assert eq.p_upper == pytest.approx(scipy_stats.binom.cdf(2, 48, 0.10))
    assert eq.p_lower == pytest.approx(scipy_stats.binom.cdf(3, 48, 0.10))
    assert not eq.shown
    d = b - a
    t_p = max(scipy_stats.ttest_1samp(d, -0.1, alternative="greater").pvalue,
              scipy_stats.ttest_1samp(d, 0.1, alternative="less").pvalue)
    assert t_p < 0.05                       # what the approximation alone would have said


def test_group_means_by_hand():
    """Each conversation's mean, computed by hand: groups 7 (1, 0, 1), 3 (0), 5 (1, 1)."""
    import numpy as np

    from dpo_lib.lessons import stats

    means = stats.group_means([1, 0, 0, 1, 1, 1], [7, 7, 3, 7, 5, 5])
    assert np.allclose(means, [0.0, 1.0, 2 / 3])          # sorted ids 3, 5, 7
    import pytest
    with pytest.raises(ValueError):
        stats.group_means([1, 0], [1])


def test_reward_against_shorter_by_hand():
    """Four pairs in three conversations (ids 0, 0, 1, 2), every figure worked out by hand:
    rewards (model - SFT) chosen +1, -2, +1, -1 and rejected -2, -1, -2, 0; chosen lengths
    2, 8, 5, 1 and rejected 4, 2, 5, 3 tokens."""
    import numpy as np

    from dpo_lib.lessons.baselines import Baseline

    counts = dict(chosen_counts=torch.tensor([2, 8, 5, 1]), rejected_counts=torch.tensor([4, 2, 5, 3]))
    tables = {"SFT": PairLogps(chosen_sums=torch.tensor([-10.0, -10, -20, -5]),
                               rejected_sums=torch.tensor([-12.0, -8, -20, -6]), **counts),
              "DPO": PairLogps(chosen_sums=torch.tensor([-9.0, -12, -19, -6]),
                               rejected_sums=torch.tensor([-14.0, -9, -22, -6]), **counts)}
    # the shorter answer: right in pairs 1 and 4, a tie in pair 3 -> 1, 0, 0.5, 1 per pair
    shorter = Baseline("shorter answer", "", np.array([1.0, 0, 0, 1]), np.array([0.0, 0, 1, 0]))
    row = compare.reward_against_shorter(tables, "DPO", [0, 0, 1, 2], shorter)
    # summed: +1 > -2, -2 < -1, +1 > -2, -1 < 0; per token: 0.5 > -0.5, -0.25 > -0.5, 0.2 > -0.4,
    # -1 < 0
    assert row["summed"] == 0.5 and row["per_token"] == 0.75
    # per conversation, model vs shorter: summed (0.5, 1, 0) vs (0.5, 0.5, 1) -> 1 win, 1 loss;
    # per token (1, 1, 0) vs (0.5, 0.5, 1) -> 2 wins, 1 loss
    s, t = row["summed_vs_shorter"], row["per_token_vs_shorter"]
    assert (s.a_wins, s.b_wins, s.ties) == (1, 1, 1) and s.mean_a == pytest.approx(0.5)
    assert (t.a_wins, t.b_wins, t.ties) == (2, 1, 0) and t.mean_b == pytest.approx(2 / 3)
    assert row["chosen_change"] == pytest.approx((0.5 - 0.25 + 0.2 - 1) / 4)
