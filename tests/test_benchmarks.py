"""The TRL comparison runs end to end in tiny (a smoke test: it must run, not meet a time)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the TRL comparison needs trl (the bench extra)")
ROOT = Path(__file__).resolve().parent.parent


def test_trl_comparison_runs_and_agrees(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "benchmarks/trl_compare.py", "--model", "tiny",
                           "--pairs", "12", "--batch", "4", "--steps", "1", "--warmup", "1",
                           "--max-length", "192", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    results = json.loads(out.read_text())["results"]
    by = {(r["stage"], r["variant"]): r for r in results}
    assert set(by) == {("preference", "agreement"), ("sft", "ours"), ("sft", "ours-fast"),
                       ("sft", "trl-default"), ("sft", "trl-best"), ("preference", "ours"),
                       ("preference", "ours-shared"), ("preference", "ours-fast"),
                       ("preference", "trl-default"), ("preference", "trl-best")}
    agreement = by[("preference", "agreement")]
    print({k: v for k, v in agreement.items() if "logp" in k})
    assert agreement["max_logp_difference"] < 1e-3     # nats, on summed log-probs of ~300 nats
    assert agreement["max_logp_difference_shared"] < 1e-3
    assert agreement["max_logp_difference_fast"] < 1e-3
    assert abs(agreement["ours_loss"] - agreement["trl_loss"]) < 1e-4
    for key, result in by.items():
        if key[1] != "agreement":
            assert result["pairs_per_second"] > 0 and result["peak_memory_mb"] > 0, key
    assert by[("preference", "ours")]["reference_seconds"] is not None
    assert by[("preference", "trl-best")]["reference_seconds"] is not None
    assert "ours/trl-best" in done.stdout
    assert "measured matrix-multiply peak: " in done.stdout
    summary = json.loads(out.read_text())
    assert summary["matmul_peak_gflops"] > 0 and summary["matmul_parameters"] > 0
    for key, result in by.items():
        if key[1] != "agreement":
            assert result["gflop_per_second"] > 0 and 0 < result["peak_share"], key
