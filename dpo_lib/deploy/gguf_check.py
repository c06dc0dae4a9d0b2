"""Does the GGUF compute what the transformers model computes? Checks for exported files.

On the same token ids (the tokenizer's, fed to llama.cpp directly):

* :func:`compare_logits`: mean KL(transformers || GGUF) of the next-token distributions, top-1
  agreement and perplexity. A correct f16 conversion gives KL under 1e-4; quantization adds more.
* :func:`pair_logps_gguf` / :func:`pair_logps_hf`: summed response log-probs of held-out
  preference pairs, for the ranking accuracy (chosen more likely than rejected) and, with the
  reference model exported the same way, the DPO implicit-reward accuracy
  (``beta * (log pi - log pi_ref)`` larger for the chosen answer); :func:`verify_exports` divides
  by the answer lengths where the run trained on token means (IPO's default), as training did.
* :func:`runtime_figures`: load time, RAM and tokens per second of a fresh process serving the file.

:func:`verify_exports` puts it all in one table, one row per file; per file it evaluates each
pair's chosen sequence once for both the KL and the pair's log-probs (:func:`check_gguf`) and reuses
the transformers model's log-probs of the held-out text across files.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from .llama_runtime import cpu_threads
from ..core.logps import next_token_log_probs
from ..core.machine import peak_rss_mb
from ..core.errors import MissingFileError


def open_gguf(path: str | os.PathLike, n_ctx: int = 512, logits_all: bool = True):
    """A quiet ``llama_cpp.Llama`` on every available core; ``logits_all`` keeps each position's
    logits (``llm.scores``, ``[n_ctx, vocab]``) for log-probs. Close it with ``.close()``."""
    from llama_cpp import Llama

    if not Path(path).is_file():
        raise MissingFileError(f"no GGUF file at {path}")
    return Llama(str(path), n_ctx=n_ctx, logits_all=logits_all, n_threads=cpu_threads(),
                 n_batch=min(n_ctx, 512), verbose=False)


def _log_softmax(rows: np.ndarray) -> torch.Tensor:
    return torch.log_softmax(torch.from_numpy(np.asarray(rows, dtype=np.float32)), dim=-1)


def gguf_log_probs(llm, ids: list[int]) -> torch.Tensor:
    """``[T - 1, V]`` next-token log-probabilities of llama.cpp for the token ids ``ids`` (``T``)."""
    llm.reset()
    llm.eval(ids)
    return _log_softmax(llm.scores[:len(ids) - 1])


@torch.no_grad()
def hf_log_probs(model, ids: list[int]) -> torch.Tensor:
    """``[T - 1, V]`` next-token log-probabilities of a transformers model (fp32)."""
    return next_token_log_probs(model, torch.tensor([ids], device=model.device))[0].cpu()


class _LogitAgreement:
    """Running sums of KL(model || other), top-1 agreement and both models' next-token NLL."""

    def __init__(self):
        self.kl = self.top1 = self.nll_other = self.nll_model = self.positions = 0.0

    def add(self, reference: torch.Tensor, ours: torch.Tensor, ids: list[int]) -> None:
        """``reference``, ``ours``: ``[T - 1, V]`` next-token log-probs of ``ids`` (``T``)."""
        targets = torch.tensor(ids[1:]).unsqueeze(-1)
        self.kl += (reference.exp() * (reference - ours)).sum(-1).clamp_min(0).sum().item()
        self.top1 += (reference.argmax(-1) == ours.argmax(-1)).sum().item()
        self.nll_other -= ours.gather(-1, targets).sum().item()
        self.nll_model -= reference.gather(-1, targets).sum().item()
        self.positions += len(ids) - 1

    def result(self) -> dict[str, float]:
        """Means per position: ``kl``, ``top1``, the perplexities ``ppl_gguf`` (``other``) and
        ``ppl_hf`` (the model), and ``tokens``, the positions compared."""
        if not self.positions:
            raise ValueError("no sequence of two or more tokens to compare on")
        return {"kl": self.kl / self.positions, "top1": self.top1 / self.positions,
                "ppl_gguf": float(np.exp(self.nll_other / self.positions)),
                "ppl_hf": float(np.exp(self.nll_model / self.positions)),
                "tokens": int(self.positions)}


def compare_logits(other, model, sequences: list[list[int]]) -> dict[str, float]:
    """KL, top-1 agreement and perplexities of ``other`` against ``model`` on the same ids.

    ``other``: an open GGUF (``llama_cpp.Llama``) or a second transformers model (e.g. a merged
    checkpoint against the model as trained). ``kl``: mean over all next-token positions of
    KL(model || other), in nats; ``top1``: share of positions where both pick the same most
    likely token; ``ppl_gguf``/``ppl_hf``: perplexity of the sequences' own next tokens under
    ``other``/``model``; ``tokens``: positions compared.
    """
    other_log_probs = hf_log_probs if isinstance(other, torch.nn.Module) else gguf_log_probs
    agreement = _LogitAgreement()
    for ids in sequences:
        if len(ids) >= 2:
            agreement.add(hf_log_probs(model, ids), other_log_probs(other, ids), ids)
    return agreement.result()


def _response_logp(llm, start: int, ids: list[int]) -> float:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, from the logits llama.cpp has kept."""
    rows = _log_softmax(llm.scores[start - 1:len(ids) - 1])
    return rows.gather(-1, torch.tensor(ids[start:]).unsqueeze(-1)).sum().item()


def pair_logps_gguf(llm, examples: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs ``(chosen [N], rejected [N])`` of tokenized pairs (as
    :func:`dpo_lib.core.batches.tokenize_pairs` makes them) under a GGUF model. The shared prompt is
    evaluated once per pair: the rejected answer continues from the prompt's cached keys/values."""
    chosen, rejected = [], []
    for example in examples:
        prompt = len(example["prompt_input_ids"])
        llm.reset()
        llm.eval(example["chosen_input_ids"])
        chosen.append(_response_logp(llm, prompt, example["chosen_input_ids"]))
        llm.n_tokens = prompt                    # keep the prompt's cache, drop the chosen answer
        llm.eval(example["rejected_input_ids"][prompt:])
        rejected.append(_response_logp(llm, prompt, example["rejected_input_ids"]))
    return np.array(chosen), np.array(rejected)


def check_gguf(llm, model, examples: list[dict], reference: list[torch.Tensor] | None = None):
    """:func:`compare_logits` on the pairs' chosen sequences and :func:`pair_logps_gguf` in one
    pass over the GGUF: each chosen sequence is evaluated once, and its logits give both the KL
    against ``model`` and the chosen answer's log-prob (the same numbers as the two calls).
    ``reference``: ``model``'s :func:`hf_log_probs` of each chosen sequence (``[T - 1, V]``
    each) where the caller has them already, computed here otherwise. Returns
    ``(compare_logits' dict, (chosen [N], rejected [N]))``."""
    if reference is not None and len(reference) != len(examples):
        raise ValueError(f"{len(reference)} reference log-prob tables for {len(examples)} pairs")
    agreement = _LogitAgreement()
    chosen, rejected = [], []
    for i, example in enumerate(examples):
        ids, prompt = example["chosen_input_ids"], len(example["prompt_input_ids"])
        ours = gguf_log_probs(llm, ids)                                   # [T - 1, V]
        theirs = reference[i] if reference is not None else hf_log_probs(model, ids)
        if theirs.shape != ours.shape:
            raise ValueError(f"pair {i}: reference log-probs {tuple(theirs.shape)} for a sequence "
                             f"whose next-token log-probs are {tuple(ours.shape)}")
        agreement.add(theirs, ours, ids)
        chosen.append(ours[prompt - 1:].gather(-1, torch.tensor(ids[prompt:]).unsqueeze(-1))
                      .sum().item())
        llm.n_tokens = prompt                    # keep the prompt's cache, drop the chosen answer
        llm.eval(example["rejected_input_ids"][prompt:])
        rejected.append(_response_logp(llm, prompt, example["rejected_input_ids"]))
    return agreement.result(), (np.array(chosen), np.array(rejected))


def pair_logps_hf(model, examples: list[dict],
                  batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The same as :func:`pair_logps_gguf` for a transformers model: the no-grad pass of
    training and evaluation, :func:`dpo_lib.core.scoring.score_pairs`."""
    from ..core.layouts import PlainLayout
    from ..core.scoring import score_pairs

    table = score_pairs(model, examples, PlainLayout(), batch_size)
    return table.chosen_sums.numpy(), table.rejected_sums.numpy()


def preference_right(policy: tuple[np.ndarray, np.ndarray],
                     reference: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Pair by pair, ``[N]`` booleans: ``ranking``, the chosen log-prob above the rejected one;
    ``reward`` (with a reference), the implicit reward ``log pi - log pi_ref`` above for the
    chosen answer (ties count as wrong; beta > 0 does not change the sign). Two models compared
    on the same pairs are compared pair by pair (a sign test over the pairs they disagree on,
    :func:`dpo_lib.lessons.compare.sign_test`), not by their two accuracies."""
    out = {"ranking": np.asarray(policy[0] > policy[1])}
    if reference is not None:
        margin = (policy[0] - reference[0]) - (policy[1] - reference[1])
        out["reward"] = np.asarray(margin > 0)
    return out


def preference_accuracies(policy: tuple[np.ndarray, np.ndarray],
                          reference: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """``ranking_accuracy`` and (with a reference) ``reward_accuracy``: the means of
    :func:`preference_right`."""
    return {f"{name}_accuracy": float(np.mean(right))
            for name, right in preference_right(policy, reference).items()}


# The serving process measures its own peak memory with dpo_lib.core.machine.peak_rss_mb (its source
# travels in the script: importing dpo_lib there would load torch into the measured process).
_RUNTIME_SCRIPT = """
import json, sys, time
import llama_cpp
""" + inspect.getsource(peak_rss_mb) + """
high_water_mb = peak_rss_mb
path, n_new, threads, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
baseline = high_water_mb()
start = time.perf_counter()
llm = llama_cpp.Llama(path, n_ctx=512, n_threads=threads, verbose=False)
load = time.perf_counter() - start
tokens = llm.tokenize(prompt.encode(), add_bos=True)
start = time.perf_counter()
llm.eval(tokens)
prompt_seconds = time.perf_counter() - start
start, made = time.perf_counter(), 0
for _ in llm.generate(tokens, temp=0.0, reset=False):
    made += 1
    if made == n_new:
        break
decode = time.perf_counter() - start
peak = high_water_mb()
llm.close()
print(json.dumps({"load_s": load, "prompt_tokens_per_second": len(tokens) / prompt_seconds,
                  "tokens_per_second": made / decode, "peak_rss_mb": peak,
                  "python_rss_mb": baseline}))
"""

RUNTIME_PROMPT = ("\n\nHuman: I want to learn to bake bread at home. What do I need, and what "
                  "are the steps for a simple loaf?\n\nAssistant:")


def runtime_figures(path: str | os.PathLike, n_new: int = 64, threads: int | None = None,
                    prompt: str = RUNTIME_PROMPT) -> dict[str, float]:
    """Serve ``path`` in a fresh Python process: ``load_s``, prompt and generation tokens per
    second (greedy, ``n_new`` tokens), and the process's peak RSS (``peak_rss_mb``; Python with
    llama_cpp imported alone takes ``python_rss_mb`` of it), plus ``file_mb``."""
    result = subprocess.run([sys.executable, "-c", _RUNTIME_SCRIPT, str(path), str(n_new),
                             str(threads or cpu_threads()), prompt],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"serving {path} failed:\n{result.stderr[-2000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["file_mb"] = Path(path).stat().st_size / 2**20
    return figures


def held_out(run_dir, n_pairs: int = 48, tokenizer=None):
    """Tokenized held-out (test split) pairs of a run's data, with the run's tokenizer:
    ``(examples, sequences)``; ``sequences`` are prompt + chosen answer, the text for KL."""
    from ..core.models import load_tokenizer
    from ..core.runs import load_run_config
    from ..core.batches import load_examples

    cfg = load_run_config(run_dir)
    tokenizer = tokenizer or load_tokenizer(cfg)
    _, examples, _ = load_examples(cfg, tokenizer, "test", n_pairs)
    return examples, [e["chosen_input_ids"] for e in examples]


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


REFERENCE_CACHE_BYTES = 2 * 2**30


def verify_exports(run_dir, files: dict, reference_files: dict | None = None, n_pairs: int = 48,
                   runtime: bool = True, progress: bool = True):
    """One row per GGUF file of ``files`` (from :func:`dpo_lib.deploy.export.export_run`) and one for the
    merged transformers model: size, bits per weight, KL and top-1 against the transformers
    model, perplexity, ranking and reward accuracy on ``n_pairs`` held-out pairs, and (with
    ``runtime``) load time, RAM and tokens per second. ``reference_files``: the same export of
    the reference (SFT) run, for the reward accuracy; without it that column is left out.
    Returns a pandas DataFrame indexed by file type; ``attrs`` holds ``pairs``, ``tokens``,
    ``parameters`` and ``right``: model -> ``{"ranking": [N] bools, "reward": [N] bools}`` (the
    pairs each row ranks right, from :func:`preference_right`), for paired comparisons.
    """
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from ..core.progress import tqdm

    from ..core.runs import load_run_config
    from ..core.losses import average_logps

    merged = Path(files["merged"])
    tokenizer = AutoTokenizer.from_pretrained(merged)
    examples, sequences = held_out(run_dir, n_pairs, tokenizer)
    n_ctx = max(len(s) for s in [*sequences, *(e["rejected_input_ids"] for e in examples)]) + 8
    if average_logps(load_run_config(run_dir)):       # the run's aggregation: IPO's token means
        counts = [np.array([len(e[f"{side}_input_ids"]) - len(e["prompt_input_ids"])
                            for e in examples]) for side in ("chosen", "rejected")]
    else:
        counts = [1, 1]

    def aggregated(pair):
        return pair[0] / counts[0], pair[1] / counts[1]

    def hf_pairs(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     use_kernels=False).eval()
        return model, aggregated(pair_logps_hf(model, examples))

    model, policy_hf = hf_pairs(merged)
    params = _params(model)
    ref_hf = hf_pairs(reference_files["merged"])[1] if reference_files else None
    positions = sum(len(s) - 1 for s in sequences)
    # the model's log-probs of the held-out text, computed once for every file's KL where they
    # fit in REFERENCE_CACHE_BYTES ([positions, vocab] fp32), per file otherwise
    cached = positions * model.config.vocab_size * 4 <= REFERENCE_CACHE_BYTES
    nll = []
    reference_log_probs = [] if cached else None
    for ids in sequences:
        logps = hf_log_probs(model, ids)
        nll.append(-logps.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).sum().item())
        if cached:
            reference_log_probs.append(logps)
    rows = {"transformers fp32": {"file_mb": params * 4 / 2**20, "bits_per_weight": 32.0,
                                  "kl": 0.0, "top1": 1.0,
                                  "perplexity": float(np.exp(sum(nll) / positions)),
                                  **preference_accuracies(policy_hf, ref_hf)}}
    right = {"transformers fp32": {k: v.tolist() for k, v in preference_right(policy_hf, ref_hf).items()}}
    types = [name for name in files if name != "merged"]
    for name in tqdm(types, desc="verifying GGUF files", disable=not progress):
        path = Path(files[name])
        llm = open_gguf(path, n_ctx)
        try:
            logits, policy = check_gguf(llm, model, examples, reference_log_probs)
            policy = aggregated(policy)
        finally:
            llm.close()
        reference = None
        if reference_files:
            ref_llm = open_gguf(reference_files[name], n_ctx)
            try:
                reference = aggregated(pair_logps_gguf(ref_llm, examples))
            finally:
                ref_llm.close()
        row = {"file_mb": path.stat().st_size / 2**20,
               "bits_per_weight": path.stat().st_size * 8 / params,
               "kl": logits["kl"], "top1": logits["top1"], "perplexity": logits["ppl_gguf"],
               **preference_accuracies(policy, reference)}
        right[name] = {k: v.tolist() for k, v in preference_right(policy, reference).items()}
        if runtime:
            figures = runtime_figures(path)
            row.update(load_s=figures["load_s"], peak_rss_mb=figures["peak_rss_mb"],
                       python_rss_mb=figures["python_rss_mb"],
                       tokens_per_second=figures["tokens_per_second"])
        rows[name] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    table.attrs.update(pairs=len(examples), tokens=positions, parameters=params, right=right)
    return table
