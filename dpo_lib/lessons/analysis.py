"""Reading preference-training curves: load runs, align, smooth, estimate KL, plot, summarise.

A *run* here is a pandas DataFrame with one row per logged record: the columns of
``metrics.jsonl`` (``step``, ``examples``, ``loss``, ``rewards/chosen``, ..., ``eval/...``), the
train and eval records kept apart (eval rows have ``eval/`` columns only). Runs come from
:func:`load_run` (a run folder or its ``metrics.jsonl``) or :func:`load_wandb_export` (a CSV
exported from a Weights & Biases run page).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import DataError, MissingFileError

#: The curves a preference run is read by, in the order they are plotted.
PREFERENCE_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                      "rewards/accuracies", "logps/chosen", "logps/rejected", "kl")


def load_run(path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train, eval)`` frames of one run; ``path`` is a run folder or a ``metrics.jsonl``.

    Eval columns lose their ``eval/`` prefix so that train and eval frames share column names.
    Lines that are not JSON objects are skipped with a warning that counts them.
    """
    path = Path(path)
    file = path / "metrics.jsonl" if path.is_dir() else path
    records, bad = [], 0
    for line in file.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
        else:
            bad += 1
    if bad:
        import warnings

        warnings.warn(f"{file}: skipped {bad} malformed line(s)")
    if not records:
        raise DataError(f"{file} holds no metric records")
    frame = pd.DataFrame(records)
    keys = [c for c in ("step", "examples") if c in frame.columns]
    eval_columns = [c for c in frame.columns if c.startswith("eval/")]
    train_columns = [c for c in frame.columns if c not in eval_columns and c not in keys]
    # a record may hold train values, eval values or both (W&B exports share rows)
    train = frame.loc[frame[train_columns].notna().any(axis=1), keys + train_columns]
    evaluation = frame.loc[frame[eval_columns].notna().any(axis=1), keys + eval_columns]
    evaluation = evaluation.rename(columns=lambda c: c.removeprefix("eval/"))
    return _sorted(train.dropna(axis=1, how="all")), _sorted(evaluation)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("step").drop_duplicates("step", keep="last").reset_index(drop=True)


def load_wandb_export(csv_path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A Weights & Biases CSV export (columns ``Step`` or ``_step`` and ``<run> - <metric>``)."""
    frame = pd.read_csv(csv_path)
    step = "_step" if "_step" in frame.columns else "Step"
    if step not in frame.columns:
        raise DataError(f"{csv_path}: no _step or Step column (columns: {list(frame.columns)})")
    renamed = {step: "step"}
    for column in frame.columns:
        if " - " in column and not column.endswith(("__MIN", "__MAX")):
            renamed[column] = column.split(" - ", 1)[1]
    frame = frame[[c for c in renamed]].rename(columns=renamed)
    path = Path(csv_path).with_suffix(".jsonl.tmp")
    try:
        path.write_text("".join(json.dumps({k: v for k, v in row.items() if pd.notna(v)}) + "\n"
                                for row in frame.to_dict("records")))
        return load_run(path)
    finally:
        path.unlink(missing_ok=True)


def kl_estimate(frame: pd.DataFrame, beta: float) -> pd.Series:
    """An estimate of KL(pi_ref || pi_theta) from the logged implicit rewards.

    With rewards ``r(y) = beta (log pi_theta(y) - log pi_ref(y))`` on answers ``y`` drawn from the
    reference, ``-E[r] / beta = E_ref[log pi_ref - log pi_theta] = KL(pi_ref || pi_theta)``; the mean
    over chosen and rejected answers estimates ``E[r]``. It is exact in expectation only where the
    data's answers are samples of the reference (as after SFT on them, roughly), and it is per
    sequence or per token as the rewards were (``logps/token_averaged``).
    """
    return -(frame["rewards/chosen"] + frame["rewards/rejected"]) / (2 * beta)


def smooth(values: pd.Series, window: int) -> pd.Series:
    """Centred moving average over ``window`` records (1: unchanged); edges use what they have."""
    if window < 1:
        raise ValueError("window must be >= 1")
    return values.rolling(window, center=True, min_periods=1).mean()


def align(runs: dict[str, pd.DataFrame], metric: str, by: str = "step") -> pd.DataFrame:
    """One column per run of ``metric``, indexed by ``step`` or ``examples``; runs of different
    lengths or with gaps leave NaN where they have no record."""
    if by not in ("step", "examples"):
        raise ValueError("align by 'step' or 'examples'")
    columns = {name: frame.set_index(by)[metric] for name, frame in runs.items()
               if metric in frame.columns}
    return pd.DataFrame(columns).sort_index()


def with_kl(frame: pd.DataFrame, beta: float) -> pd.DataFrame:
    """The frame with a ``kl`` column (see :func:`kl_estimate`) where rewards are present."""
    if "rewards/chosen" in frame.columns:
        frame = frame.assign(kl=kl_estimate(frame, beta))
    return frame


def plot_runs(runs: dict[str, tuple[pd.DataFrame, pd.DataFrame]], metrics=PREFERENCE_METRICS,
              beta: float | dict = 0.1, window: int = 1, by: str = "step", title: str = "",
              path=None):
    """A grid of panels, one per metric: each run's train curve (smoothed over ``window``
    records, faint) and eval points (dots), overlaid. ``runs`` maps a label to ``(train, eval)``.
    ``beta`` (or one per run) is needed for the KL panel. Saves to ``path`` when given."""
    import matplotlib.pyplot as plt

    metrics = list(metrics)
    columns = min(4, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.9 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for panel, metric in zip(axes.flat, metrics):
        for (label, (train, evaluation)), colour in zip(runs.items(), colours * 4):
            b = beta[label] if isinstance(beta, dict) else beta
            train, evaluation = with_kl(train, b), with_kl(evaluation, b)
            if metric in train.columns:
                panel.plot(train[by], smooth(train[metric], window), color=colour, alpha=0.45,
                           lw=1, label=f"{label} train")
            if metric in evaluation.columns:
                panel.plot(evaluation[by], evaluation[metric], "o-", color=colour, ms=3, lw=1.5,
                           label=f"{label} eval")
        panel.set_title(metric + (" (estimate)" if metric == "kl" else ""), fontsize=10)
        panel.set_xlabel("optimizer step" if by == "step" else "pairs seen")
    for panel in axes.flat[len(metrics):]:
        panel.axis("off")
    axes.flat[0].legend(fontsize=7)
    smoothing = f", train curves smoothed over {window} steps" if window > 1 else ""
    fig.suptitle(title + smoothing)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def summary(runs: dict[str, pd.DataFrame], metrics=PREFERENCE_METRICS, beta: float = 0.1,
            first: int = 3, last: int = 3) -> pd.DataFrame:
    """Start, end and slope of each metric per run.

    ``start``/``end``: means of the first/last ``first``/``last`` records; ``slope``: least-squares
    slope per 100 steps over the whole run. Frames are single runs (train or eval records).
    """
    rows = []
    for name, frame in runs.items():
        frame = with_kl(frame, beta)
        for metric in metrics:
            if metric not in frame.columns:
                continue
            series = frame[["step", metric]].dropna()
            slope = np.polyfit(series["step"], series[metric], 1)[0] * 100 \
                if len(series) > 1 else float("nan")
            rows.append({"run": name, "metric": metric, "start": series[metric][:first].mean(),
                         "end": series[metric][-last:].mean(), "slope_per_100_steps": slope,
                         "records": len(series)})
    return pd.DataFrame(rows).set_index(["run", "metric"])


def seed_summary(groups: dict[str, list[pd.DataFrame]], metrics=PREFERENCE_METRICS,
                 beta: float = 0.1, last: int = 3, confidence: float = 0.95) -> pd.DataFrame:
    """Across seeds: for each group (e.g. ``"DPO"`` -> one frame per seed) and metric, the mean
    of the per-seed end values and slopes, with a Student-t confidence half-width."""
    from scipy import stats

    rows = []
    for group, frames in groups.items():
        per_seed = pd.concat([summary({i: f}, metrics, beta, last=last)
                              for i, f in enumerate(frames)])
        for metric, values in per_seed.groupby(level="metric", sort=False):
            n = len(values)
            t = stats.t.ppf(0.5 + confidence / 2, n - 1) if n > 1 else float("nan")
            row = {"group": group, "metric": metric, "seeds": n}
            for column in ("end", "slope_per_100_steps"):
                mean = values[column].mean()
                half = t * values[column].std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
                row[column] = mean
                row[column + f"_ci{int(confidence * 100)}"] = half
            rows.append(row)
    return pd.DataFrame(rows).set_index(["group", "metric"])


def load_sweep_runs(folder) -> dict[str, tuple]:
    """``name -> (train, eval)`` frames for every run folder under ``folder``."""
    runs = {path.name: load_run(path) for path in sorted(Path(folder).iterdir())
            if (path / "metrics.jsonl").is_file()}
    if not runs:
        raise MissingFileError(f"no run logs (*/metrics.jsonl) under {folder}")
    return runs


def seed_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of per-seed values: the Student-t interval ``mean -+ t s / sqrt(n)``
    (``n - 1`` degrees of freedom; the half-width of :func:`seed_summary`). With one value the
    half-width is NaN: one run has no interval of its own."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2:
        return (float(values.mean()) if n else float("nan")), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)
    return float(values.mean()), float(half)


def seed_difference(a, b, confidence: float = 0.95) -> dict:
    """Two groups of per-seed values (e.g. each seed's end accuracy under DPO and under IPO):
    ``mean(a) - mean(b)`` with Welch's t interval and two-sided p (unequal variances, the seed as
    the unit: use this where the logs hold per-step means only; with per-pair outcomes compare
    over pairs instead, :func:`dpo_lib.lessons.stats.compare_over_prompts`). Both groups without
    spread give the exact difference, an interval of width 0 and ``p`` 0 (or 1 if equal)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    difference = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return {"difference": difference, "low": float("nan"), "high": float("nan"),
                "p": float("nan"), "n": (len(a), len(b)), "confidence": confidence}
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return {"difference": difference, "low": difference, "high": difference,
                "p": float(difference == 0), "n": (len(a), len(b)), "confidence": confidence}
    test = stats.ttest_ind(a, b, equal_var=False)
    interval = test.confidence_interval(confidence)
    return {"difference": difference, "low": float(interval.low), "high": float(interval.high),
            "p": float(test.pvalue), "n": (len(a), len(b)), "confidence": confidence}
