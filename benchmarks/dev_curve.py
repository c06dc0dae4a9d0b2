"""A preference run's checkpoints scored on the dev slice: the learning curve on dev (issue 28).

    DPO_HH_RLHF_DIR=... python benchmarks/dev_curve.py runs/cpu-hh-dpo \\
        data/example-runs/cpu-hh-final/dev_curve.json
    python benchmarks/dev_curve.py table data/example-runs/cpu-hh-final/dev_curve.json

Scores every ``checkpoint-<step>/`` of the run and its final ``adapter/`` on every dev pair of
``cpu-hh`` (one no-grad pass each, as ``dpo-compare --split dev``) and writes their log-prob
tables; the SFT model's dev table is the one in ``data/example-runs/cpu-hh-tuning/comparison.json``
(the same SFT adapter, the same pairs: ``dev_curve_table`` checks the token counts).
"""
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_lib.core.batches import tokenize_pairs  # noqa: E402
from dpo_lib.core.config import load_config  # noqa: E402
from dpo_lib.core.data import load_split  # noqa: E402
from dpo_lib.core.layouts import pair_layout  # noqa: E402
from dpo_lib.core.scoring import score_pairs  # noqa: E402
from dpo_lib.lessons.compare import load_models  # noqa: E402


def main(run: Path, out: Path) -> None:
    cfg = load_config("cpu-hh")
    links = Path(tempfile.mkdtemp())
    runs = {"SFT": Path(load_config(str(run / "config.yaml")).train.init_adapter)}
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    for step in steps:                   # load_models reads RUN/adapter: a link per checkpoint
        (links / str(step)).mkdir()
        (links / str(step) / "adapter").symlink_to((run / f"checkpoint-{step}").resolve())
        runs[str(step)] = links / str(step)
    last = json.loads((run / "run_time.json").read_text())["steps"]
    runs[str(last)] = run
    started = time.perf_counter()
    model, tokenizer, use = load_models(cfg, runs)
    pairs, _ = load_split(cfg, "dev", None)
    examples, _ = tokenize_pairs(pairs, tokenizer, cfg.data.max_length, cfg.data.max_prompt_length)
    tables = {}
    for name in [n for n in runs if n != "SFT"]:
        with use(name) as active:
            table = score_pairs(active, examples, pair_layout(cfg), cfg.train.eval_batch_size)
        tables[name] = {k: [round(v, 4) for v in x.tolist()] for k, x in table._asdict().items()}
        print(f"step {name}: {time.perf_counter() - started:.0f} s", flush=True)
    out.write_text(json.dumps({"run": str(run), "pairs": len(examples), "tables": tables}) + "\n")


def table(curve: Path) -> None:
    """RESULTS.md's table: each step's reward accuracy against SFT on dev, beside the
    shorter-answer rule (conversations as the unit), and the chosen answers' log-prob change."""
    import numpy as np
    import torch

    from dpo_lib.core.logps import PairLogps
    from dpo_lib.lessons import baselines, compare

    tuning = json.loads((Path(__file__).resolve().parent.parent / "data" / "example-runs"
                         / "cpu-hh-tuning" / "comparison.json").read_text())
    current = json.loads(curve.read_text())
    tables = {"SFT": PairLogps(**{k: torch.tensor(v) for k, v in tuning["tables"]["SFT"].items()})}
    for name, values in current["tables"].items():
        tables[name] = PairLogps(**{k: torch.tensor(v) for k, v in values.items()})
        assert torch.equal(tables[name].chosen_counts, tables["SFT"].chosen_counts) and \
            torch.equal(tables[name].rejected_counts, tables["SFT"].rejected_counts), "other pairs"
    groups = np.asarray(tuning["conversations"])

    shorter = baselines.length_baselines(tuning["tables"]["SFT"], tuning["tables"]["SFT"],
                                         0.0)["shorter answer"]
    print(f"dev: {current['pairs']} pairs, {len(np.unique(groups))} conversations; "
          f"shorter-answer rule {shorter.accuracy:.3f}")
    print("| DPO step | reward acc. vs SFT, summed | per token | per token vs shorter answer "
          "(conv. wins:losses, p) | summed vs shorter answer (p) | chosen log-prob vs SFT, "
          "nats/token |")
    print("|---|---|---|---|---|---|")
    for name in current["tables"]:
        row = compare.reward_against_shorter(tables, name, groups, shorter)
        a, b = row["per_token_vs_shorter"], row["summed_vs_shorter"]
        print(f"| {name} | {row['summed']:.3f} | {row['per_token']:.3f} | {a.a_wins}:{a.b_wins}, "
              f"{a.sign_p:.2g} | {b.a_wins}:{b.b_wins}, {b.sign_p:.2g} | "
              f"{row['chosen_change']:+.3f} |")

if __name__ == "__main__":
    if sys.argv[1] == "table":
        table(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
