"""Loading, aligning, smoothing, the KL estimate, plots and summaries of training curves."""
import json

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from dpo_lib.lessons import analysis

matplotlib.use("Agg")


def write_run(folder, steps, eval_steps=(), slope=0.01, seed=0, bad_lines=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    lines = []
    for step in steps:
        chosen = -slope * step + rng.normal(0, 0.01)
        lines.append({"step": step, "examples": 8 * step, "loss": 0.69 - slope * step,
                      "rewards/chosen": chosen, "rewards/rejected": chosen - 0.02 * step,
                      "rewards/margins": 0.02 * step, "rewards/accuracies": min(1, step / 20),
                      "logps/chosen": -50 + chosen, "logps/rejected": -60.0})
        if step in eval_steps:
            lines.append({"step": step, "examples": 8 * step, "eval/loss": 0.7 - slope * step,
                          "eval/rewards/chosen": chosen, "eval/rewards/rejected": chosen - 0.1})
    text = "".join(json.dumps(line) + "\n" for line in lines) + "not json\n" * bad_lines
    (folder / "metrics.jsonl").write_text(text)
    return folder


def test_load_run_splits_train_and_eval(tmp_path):
    run = write_run(tmp_path / "a", range(1, 11), eval_steps=(5, 10))
    train, evaluation = analysis.load_run(run)
    assert list(train["step"]) == list(range(1, 11)) and "eval/loss" not in train
    assert list(evaluation["step"]) == [5, 10]
    assert evaluation["loss"].tolist() == pytest.approx([0.65, 0.6])


def test_malformed_lines_are_counted_not_fatal(tmp_path):
    run = write_run(tmp_path / "a", range(1, 4), bad_lines=2)
    with pytest.warns(UserWarning, match="skipped 2 malformed"):
        train, _ = analysis.load_run(run)
    assert len(train) == 3
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metric records"):
        analysis.load_run(tmp_path / "empty")


def test_align_runs_with_gaps_and_early_stop(tmp_path):
    full = analysis.load_run(write_run(tmp_path / "full", range(1, 11)))[0]
    gaps = analysis.load_run(write_run(tmp_path / "gaps", [1, 2, 5, 6, 9, 10]))[0]
    early = analysis.load_run(write_run(tmp_path / "early", range(1, 5)))[0]
    table = analysis.align({"full": full, "gaps": gaps, "early": early}, "loss")
    assert list(table.index) == list(range(1, 11))
    assert table["gaps"].isna().sum() == 4 and table["early"].isna().sum() == 6
    by_examples = analysis.align({"full": full}, "loss", by="examples")
    assert list(by_examples.index[:2]) == [8, 16]


def test_smoothing_window():
    values = pd.Series([0.0, 3.0, 0.0, 3.0, 0.0])
    assert analysis.smooth(values, 1).tolist() == values.tolist()
    assert analysis.smooth(values, 3).tolist() == pytest.approx([1.5, 1.0, 2.0, 1.0, 1.5])
    with pytest.raises(ValueError):
        analysis.smooth(values, 0)


def test_kl_estimate_on_a_toy_with_known_answer():
    """Answers drawn from pi_ref: -mean implicit reward / beta -> KL(pi_ref || pi)."""
    generator = torch.Generator().manual_seed(0)
    ref = torch.softmax(torch.randn(6, generator=generator), 0)
    policy = torch.softmax(torch.randn(6, generator=generator), 0)
    beta = 0.1
    samples = torch.multinomial(ref, 200_000, replacement=True, generator=generator)
    rewards = beta * (policy.log() - ref.log())[samples]
    half = len(samples) // 2
    frame = pd.DataFrame({"rewards/chosen": [rewards[:half].mean().item()],
                          "rewards/rejected": [rewards[half:].mean().item()]})
    exact = (ref * (ref.log() - policy.log())).sum().item()
    assert analysis.kl_estimate(frame, beta).item() == pytest.approx(exact, rel=0.02)


def test_plot_writes_every_promised_panel(tmp_path):
    runs = {name: analysis.load_run(write_run(tmp_path / name, range(1, 21), (10, 20), seed=i))
            for i, name in enumerate(("DPO", "IPO"))}
    path = tmp_path / "figs" / "curves.png"
    fig = analysis.plot_runs(runs, beta={"DPO": 0.1, "IPO": 0.5}, window=5, path=path)
    assert path.is_file() and path.stat().st_size > 10_000
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                      "rewards/accuracies", "logps/chosen", "logps/rejected", "kl (estimate)"]


def test_summary_and_seed_confidence(tmp_path):
    frames = [analysis.load_run(write_run(tmp_path / f"s{i}", range(1, 21), seed=i,
                                          slope=0.01 * (1 + i)))[0] for i in range(3)]
    table = analysis.summary({"run": frames[0]})
    assert table.loc[("run", "loss"), "slope_per_100_steps"] == pytest.approx(-1.0)
    assert table.loc[("run", "rewards/margins"), "end"] == pytest.approx(0.38)
    seeds = analysis.seed_summary({"DPO": frames})
    row = seeds.loc[("DPO", "loss")]
    assert row["seeds"] == 3 and row["slope_per_100_steps"] == pytest.approx(-2.0)
    # slopes -1, -2, -3: sd 1, t(0.975, 2) = 4.303 -> half-width 4.303 / sqrt(3)
    assert row["slope_per_100_steps_ci95"] == pytest.approx(4.303 / np.sqrt(3), rel=1e-3)


def test_wandb_csv_export(tmp_path):
    csv = tmp_path / "export.csv"
    pd.DataFrame({"Step": [1, 2, 3], "dpo-run - loss": [0.69, 0.6, 0.5],
                  "dpo-run - loss__MIN": [0.6, 0.5, 0.4],
                  "dpo-run - eval/loss": [None, None, 0.55]}).to_csv(csv, index=False)
    train, evaluation = analysis.load_wandb_export(csv)
    assert train["loss"].tolist() == [0.69, 0.6, 0.5] and "loss__MIN" not in train
    assert evaluation["step"].tolist() == [3] and evaluation["loss"].tolist() == [0.55]
