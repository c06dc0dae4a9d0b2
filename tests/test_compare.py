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
    assert compare.main(["tiny", f"sft={tmp_path / 'sft'}", f"dpo={tmp_path / 'dpo'}",
                         "--pairs", "12", "--answers", "2", "--out", str(out), "--judge", "3",
                         "--train-pairs", "dpo"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert result["pairs"] == 12 and set(result["accuracy"]) == {"base", "SFT", "DPO"}
    assert result["accuracy"]["SFT"]["reward vs SFT"] == 0
    assert len(result["answers"]) == 2          # bundled data: no hh-rlhf probes
    assert len(result["judged"]["answers"]["DPO"]) == 3
    assert set(result["answers"][0]) == {"prompt", "base", "SFT", "DPO"}
    assert (out / "dpo" / "metrics.jsonl").is_file() and (out / "sft" / "config.yaml").is_file()
    assert {name: len(labels) for name, labels in result["judged"]["labels"].items()} == \
        {"SFT": 3, "DPO": 3}
    assert [row["model"] for row in result["judged"]["sign_tests"]] == ["DPO"]
    training = result["training"]
    assert set(training["tables"]) == {"SFT", "DPO"}
    assert len(training["tables"]["DPO"]["chosen_sums"]) == training["pairs"] == \
        load_config("tiny").data.train_limit
    assert len(result["tables"]["DPO"]["chosen_sums"]) == 12
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
