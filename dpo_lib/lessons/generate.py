"""Greedy generations for a list of prompts, and scoring them with the bundled set's checker."""
from __future__ import annotations

import collections

import torch

from .bundled import judge_response
from ..core.data import HUMAN


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 40,
                     batch_size: int = 48, progress: bool = False) -> list[str]:
    """Greedy answers to hh-rlhf-format prompts (each ending in ``"\\n\\nAssistant:"``).

    Prompts are left-padded in batches of ``batch_size``; an answer ends at EOS or at a new
    ``"\\n\\nHuman:"`` turn, which is cut off. Returns one string per prompt.

    Large batches are the fast default: each new token is one forward of the whole batch, and a
    forward of 48 sequences costs little more than one of 8 (on 2 cores, SmolLM2-135M in NF4, 48
    bundled prompts x 40 tokens: 11 s in one batch, 27 s in batches of 8, the same answers; see
    benchmarks/RESULTS.md, issue 29). Another batch size can change an answer where two tokens
    are within float rounding of each other (a row's arithmetic depends on the batch's shape).
    """
    from ..core.progress import tqdm

    device = next(model.parameters()).device
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    answers = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating",
                          disable=not progress):
            chunk = prompts[start:start + batch_size]
            inputs = tokenizer(chunk, return_tensors="pt", padding=True,
                               add_special_tokens=False).to(device)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
            for row in output[:, inputs["input_ids"].shape[1]:]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                answers.append(text.split(HUMAN)[0].rstrip())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def score_answers(prompts: list[str], answers: list[str]) -> dict[str, float]:
    """Share of answers per checker label (``good``, ``wrong``, ``rude``, ``evasive``, ``unknown``)."""
    labels = collections.Counter(judge_response(p, a).label for p, a in zip(prompts, answers))
    return {label: labels.get(label, 0) / max(len(answers), 1)
            for label in ("good", "wrong", "rude", "evasive", "unknown")}
