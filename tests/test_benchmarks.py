"""The TRL comparison runs end to end in tiny (a smoke test: it must run, not meet a time), and its
harness reports as it goes: variants left out are not run, a failed or timed-out job prints its
stderr at once, and the JSON holds every finished row after each job."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="the TRL comparison needs trl (the bench extra)")
ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--pairs", "12", "--batch", "4", "--steps", "1", "--warmup", "1",
        "--max-length", "192"]
COMPARE = [sys.executable, "benchmarks/trl_compare.py"]


def pair_lengths(data_folder):
    """Per pair of the benchmark's data, as dpo_lib tokenizes it for the tiny model:
    (prompt, prompt + chosen, prompt + rejected) tokens, EOS included."""
    from dpo_lib.core.batches import tokenize_pairs
    from dpo_lib.core.data import load_preference_pairs
    from dpo_lib.core.models import load_tokenizer

    pairs, _ = load_preference_pairs(str(data_folder), split="train")
    examples, _ = tokenize_pairs(pairs, load_tokenizer("tiny-gpt-neox"), 10**6, 10**6 - 1)
    return [(len(e["prompt_input_ids"]), len(e["chosen_input_ids"]),
             len(e["rejected_input_ids"])) for e in examples]


def tiny_matmul_parameters():
    """The tiny model's matrix-multiply parameters, counted on the model itself."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_lib.core.models import architecture_config

    model = AutoModelForCausalLM.from_config(architecture_config("tiny-gpt-neox"))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_trl_comparison_runs_and_agrees(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([*COMPARE, *TINY, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    summary = json.loads(out.read_text())
    assert summary["complete"] and not summary["failures"]
    results = summary["results"]
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
    assert by[("preference", "ours")]["reference_seconds"] is not None
    assert by[("preference", "trl-best")]["reference_seconds"] is not None
    assert "measured matrix-multiply peak: " in done.stdout

    # Tokens of the timed step (batch 4 x 1, one step), against the data recomputed here: the
    # sum over some 4 pairs (SFT: 4 prompt + chosen sequences) of their real tokens, so between
    # the 4 shortest and the 4 longest. Plain layout: both answers with the prompt each; packed
    # (ours-shared, ours-fast for DPO): the prompt once. TRL tokenizes prompt and answer its own
    # way: a few tokens per sequence of slack.
    lengths = pair_lengths(summary["args"]["data"])
    per_pair = {"plain": [c + r for p, c, r in lengths], "packed": [c + r - p for p, c, r in lengths],
                "sft": [c for p, c, r in lengths]}
    total_ram_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    parameters = tiny_matmul_parameters()
    assert summary["matmul_parameters"] == parameters
    for (stage, variant), r in by.items():
        if variant == "agreement":
            continue
        kind = "sft" if stage == "sft" else (
            "packed" if variant in ("ours-shared", "ours-fast") else "plain")
        sizes = sorted(per_pair[kind])
        slack = 3 * (1 if stage == "sft" else 2) * 4 if variant.startswith("trl") else 0
        tokens = r["tokens_per_second"] * r["seconds_per_step"]
        assert sum(sizes[:4]) - slack <= tokens + 1e-6 and \
            tokens - 1e-6 <= sum(sizes[-4:]) + slack, (stage, variant, tokens, sizes)
        assert r["pairs_per_second"] * r["seconds_per_step"] == pytest.approx(4 * 1)
        # the peak RSS of a process that ran torch: above torch's own import, within the machine
        assert 100 < r["peak_memory_mb"] < total_ram_mb, (stage, variant)
        per_token = 6 if (stage, variant) == ("preference", "trl-default") else 4
        assert r["gflop_per_second"] == pytest.approx(
            per_token * parameters * r["tokens_per_second"] / 1e9)
        assert r["peak_share"] == pytest.approx(r["gflop_per_second"] / summary["matmul_peak_gflops"])
    # the printed ratios are the ratios of the two rows
    ratios = re.findall(r"^(sft|preference): (ours[\w-]*)/(trl-\w+) pairs per second ([\d.]+)x, "
                        r"peak memory ([\d.]+)x", done.stdout, re.M)
    assert len(ratios) == 10
    for stage, ours, trl, speed, memory in ratios:
        a, b = by[(stage, ours)], by[(stage, trl)]
        assert float(speed) == pytest.approx(a["pairs_per_second"] / b["pairs_per_second"], abs=0.006)
        assert float(memory) == pytest.approx(a["peak_memory_mb"] / b["peak_memory_mb"], abs=0.006)


def test_a_failed_job_reports_at_once_and_a_cut_off_run_keeps_its_rows(tmp_path):
    """``--variants`` without agreement runs no agreement job; the first job fails (its stderr is
    printed before the next job's row), the second finishes, the third hangs and the run is cut
    off from outside: the JSON still holds the finished row and the failure."""
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "TRL_COMPARE_FAULT": "preference:ours=fail,preference:ours-shared=hang"}
    harness = subprocess.Popen(
        [*COMPARE, *TINY, "--stages", "preference", "--variants", "ours,ours-fast,ours-shared",
         "--json", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(600, os.killpg, (harness.pid, signal.SIGKILL))
    watchdog.start()
    lines = []
    try:
        for line in harness.stdout:
            lines.append(line)
            if line.startswith("preference ours-fast"):
                break
        assert harness.poll() is None, "".join(lines)       # still running: in the third job
        while_running = json.loads(out.read_text())
    finally:
        watchdog.cancel()
        os.killpg(harness.pid, signal.SIGKILL)               # the harness and its hanging child
        harness.wait()
    output = "".join(lines)
    print(output)
    assert "agreement" not in output
    assert "3 jobs, each in its own process: preference:ours, preference:ours-fast, " \
           "preference:ours-shared" in output
    failed = output.index("preference ours         FAILED: exit status 1")
    traceback = output.index("RuntimeError: TRL_COMPARE_FAULT: preference:ours fails on purpose")
    row = output.index("preference ours-fast")
    assert failed < traceback < row
    for saved in (while_running, json.loads(out.read_text())):
        assert saved["jobs"] == ["preference:ours", "preference:ours-fast",
                                 "preference:ours-shared"]
        assert not saved["complete"]
        assert [(r["stage"], r["variant"]) for r in saved["results"]] == [
            ("preference", "ours-fast")]
        assert saved["results"][0]["pairs_per_second"] * saved["results"][0]["seconds_per_step"] \
            == pytest.approx(4)
        [failure] = saved["failures"]
        assert (failure["variant"], failure["reason"]) == ("ours", "exit status 1")
        assert "fails on purpose" in failure["stderr_tail"]


def test_a_child_past_its_timeout_is_stopped_and_reported(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "TRL_COMPARE_FAULT": "preference:ours=hang"}
    done = subprocess.run([*COMPARE, *TINY, "--stages", "preference", "--variants", "ours",
                           "--child-timeout", "3", "--json", str(out)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    print(done.stdout)
    assert done.returncode == 1
    assert "preference ours         FAILED: timed out after 3 s" in done.stdout
    assert "TRL_COMPARE_FAULT: preference:ours hangs on purpose" in done.stdout
    assert "1 of 1 jobs failed: preference ours (timed out after 3 s)" in done.stdout
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["results"] == []
    assert saved["failures"][0]["reason"] == "timed out after 3 s"


def test_unknown_variants_are_refused():
    done = subprocess.run([*COMPARE, "--variants", "ours,agreemnt"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown variant or stage agreemnt" in done.stderr


def test_step_levers_runs_the_trainers_step():
    """benchmarks/step_levers.py takes the trainer's step: from a fresh adapter (LoRA B = 0) the
    policy is the reference, so the warm-up step's DPO loss is log 2 (a formula, not a record)."""
    done = subprocess.run([sys.executable, "benchmarks/step_levers.py", "default", "--profile",
                           "tiny", "--steps", "1", "--batch", "4"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    warm_up = re.search(r"warm-up: [\d.]+ s, loss ([\d.]+)", done.stdout)
    assert warm_up and abs(float(warm_up.group(1)) - 0.693147) < 1e-5, done.stdout
    assert re.search(r"default: [\d.]+ s per step over 1 steps", done.stdout), done.stdout


def test_step_levers_counts_ties_apart():
    """A paired comparison's tally: a batch whose two times differ by less than the timer resolves
    counts as neither a win nor a loss (batch 0 of the 2026-12-05 log printed 2.27 s both ways)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from step_levers import tally
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    # off/on of recompute-head's log (cpu profile), the first pair 0.4 % apart
    ratios = [2.28 / 2.27, 2.89 / 2.85, 3.18 / 3.30, 2.82 / 2.88, 3.46 / 3.20]
    assert tally(ratios) == "on faster in 2, off faster in 2, within 0.5% in 1"
