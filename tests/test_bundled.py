"""The bundled preference set is what its generator writes, and its checker is right."""
import os
import random

import pytest

from dpo_lib.lessons import bundled
from dpo_lib.core.data import ASSISTANT, BUNDLED_DIR, HUMAN, split_hh_pair


def test_committed_files_are_the_generators_output(tmp_path, capsys):
    bundled.write_bundled(seed=0, out_dir=tmp_path / "bundled", tokenizer_dir=tmp_path / "tok")
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "bundled" / name).read_bytes() == (BUNDLED_DIR / name).read_bytes()
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == \
        (bundled.TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes()


def test_other_seed_gives_other_data():
    assert bundled.generate(20, 5, seed=1) != bundled.generate(20, 5, seed=0)


def test_no_test_question_in_train():
    train, test = bundled.generate(2000, 200, seed=0)
    last = lambda row: bundled.last_question(split_hh_pair(row["chosen"], row["rejected"])[0])
    assert not {last(r) for r in test} & {last(r) for r in train}


def test_checker_agrees_with_the_generator():
    rng = random.Random(123)
    for _ in range(3000):
        row, meta = bundled.make_pair(rng)
        prompt, chosen, rejected = split_hh_pair(row["chosen"], row["rejected"])
        assert bundled.judge_response(prompt, chosen).label == "good", (prompt, chosen)
        assert bundled.judge_response(prompt, rejected).label == meta["rejected_kind"], \
            (prompt, rejected)


def test_a_wrong_fact_pair_differs_in_the_fact_only():
    """A 'wrong' rejected answer is the chosen answer's sentence and wording with the wrong fact
    put in, so that a preference between them is about the fact, not about phrasing or length."""
    rng = random.Random(7)
    seen = 0
    for _ in range(500):
        row, meta = bundled.make_pair(rng)
        if meta["rejected_kind"] != "wrong":
            continue
        _, chosen, rejected = split_hh_pair(row["chosen"], row["rejected"])
        prefix = len(os.path.commonprefix([chosen, rejected]))
        suffix = len(os.path.commonprefix([chosen[::-1], rejected[::-1]]))
        core_chosen, core_rejected = chosen[prefix:len(chosen) - suffix], \
            rejected[prefix:len(rejected) - suffix]
        assert meta["answer"].endswith(core_chosen) or core_chosen in meta["answer"], \
            (chosen, rejected)
        assert len(core_rejected) <= max(len(core_chosen), 1) + 12, (chosen, rejected)
        seen += 1
    assert seen > 150


def prompt(question):
    return f"{HUMAN} Hi{ASSISTANT} Hello!{HUMAN} {question}{ASSISTANT}"


@pytest.mark.parametrize("question, answer, label", [
    ("What is 14 minus 7?", " 14 minus 7 is 7.", "good"),
    ("What is 14 minus 7?", " 7", "good"),
    ("What is 14 minus 7?", " 14 minus 7 is 8.", "wrong"),
    ("How many hours are there in 8 days?", " There are 192 hours in 8 days.", "good"),
    ("How many hours are there in 8 days?", " There are 190 hours in 8 days.", "wrong"),
    ("What is the capital of France?", " Paris, of course.", "good"),
    ("What is the capital of France?", " It is Paris or maybe Rome.", "wrong"),
    ("What is the capital of France?", " Obviously Paris, you idiot.", "rude"),
    ("What is the capital of France?", " Why do you want to know?", "evasive"),
    ("What is the capital of France?", "", "evasive"),
    ("What is the capital of France?", " France is a lovely country.", "wrong"),
    ("What day comes after Monday?", " The day after Monday is Tuesday.", "good"),
    ("What is the plural of \"mouse\"?", " The plural of \"mouse\" is \"mouses\".", "wrong"),
    ("What is the plural of \"mouse\"?", " Mice!", "good"),
    ("Write me a poem.", " Roses are red.", "unknown"),
])
def test_checker_on_hand_written_answers(question, answer, label):
    assert bundled.judge_response(prompt(question), answer).label == label


def test_checker_ignores_a_generated_next_turn():
    verdict = bundled.judge_response(prompt("What is 2 plus 3?"),
                                     f" 2 plus 3 is 5.{HUMAN} What is 2 plus 4? ugh")
    assert verdict.label == "good" and verdict.preferred
