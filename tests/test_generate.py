"""Greedy generation over a batch of prompts, and the checker's scores."""
import pytest

from dpo_lib.core.config import load_config
from dpo_lib.core.data import load_preference_pairs
from dpo_lib.lessons.generate import generate_answers, score_answers
from dpo_lib.core.models import load_model, load_tokenizer


def test_batched_left_padded_generation_equals_one_by_one():
    cfg = load_config("tiny")
    model, tokenizer = load_model(cfg), load_tokenizer(cfg)
    pairs, _ = load_preference_pairs("bundled", "test", limit=5)
    prompts = [p["prompt"] for p in pairs]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=5)
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert len(batched) == 5 and batched == single
    assert tokenizer.padding_side == "right"  # restored


def test_score_answers_shares():
    pairs, _ = load_preference_pairs("bundled", "test", limit=4)
    prompts = [p["prompt"] for p in pairs]
    answers = [pairs[0]["chosen"], pairs[1]["chosen"], pairs[2]["rejected"], " Roses are red."]
    scores = score_answers(prompts, answers)
    assert sum(scores.values()) == pytest.approx(1.0)
    assert scores["good"] == 0.5
