"""The hh-rlhf pipeline: splitting, its traps, accounting, sources, tokenization, batching."""
import gzip
import json
import shutil
import socket

import pytest
import torch

from dpo_lib import data
from dpo_lib.data import (ASSISTANT, HUMAN, IGNORE_INDEX, HubUnavailableError, PairError,
                          batch_indices, collate_preference, collate_sft, load_preference_pairs,
                          padding_fraction, padding_report, sft_examples, split_hh_pair,
                          tokenize_pairs)
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
TRAPS = FIXTURES / "hh_traps.jsonl"
# What each line of hh_traps.jsonl is (see the comments where it was written: the rows are
# described in the same order here).
EXPECTED_TRAPS = ["kept", "kept", "diverges_before_last_turn", "diverges_before_last_turn",
                  "empty_response", "empty_response", "invalid_json", "invalid_json",
                  "identical_responses", "missing_key", "non_string_value", "non_string_value",
                  "no_shared_assistant_turn"]


# ---- split_hh_pair ------------------------------------------------------------------------

def test_split_keeps_leading_space_and_multi_turn_prompt():
    chosen = f"{HUMAN} Hi{ASSISTANT} Hello!{HUMAN} What is 2 plus 2?{ASSISTANT} It is 4."
    rejected = f"{HUMAN} Hi{ASSISTANT} Hello!{HUMAN} What is 2 plus 2?{ASSISTANT} It is 5."
    prompt, good, bad = split_hh_pair(chosen, rejected)
    assert prompt == f"{HUMAN} Hi{ASSISTANT} Hello!{HUMAN} What is 2 plus 2?{ASSISTANT}"
    assert (good, bad) == (" It is 4.", " It is 5.")
    assert prompt + good == chosen and prompt + bad == rejected


def test_split_is_not_a_character_prefix():
    prompt, good, bad = split_hh_pair(f"{HUMAN} Q{ASSISTANT} I think so.",
                                      f"{HUMAN} Q{ASSISTANT} I think not.")
    assert prompt.endswith(ASSISTANT)
    assert good == " I think so." and bad == " I think not."


@pytest.mark.parametrize("chosen, rejected, reason", [
    (f"{HUMAN} Hi{ASSISTANT} Hello!{HUMAN} Bye{ASSISTANT} Ciao", f"{HUMAN} Hi{ASSISTANT} Go.{HUMAN} Bye{ASSISTANT} Ok",
     "diverges_before_last_turn"),
    (f"{HUMAN} Hi{ASSISTANT} Hello!{HUMAN} Bye{ASSISTANT} Ciao", f"{HUMAN} Hi{ASSISTANT} Go.",
     "diverges_before_last_turn"),
    (f"{HUMAN} Hi{ASSISTANT}", f"{HUMAN} Hi{ASSISTANT} Hey", "empty_response"),
    (f"{HUMAN} Hi{ASSISTANT} Hey", f"{HUMAN} Hi{ASSISTANT} \n ", "empty_response"),
    (f"{HUMAN} Hi{ASSISTANT} Hey", f"{HUMAN} Hi{ASSISTANT} Hey", "identical_responses"),
    ("no markers", "none here", "no_shared_assistant_turn"),
    (None, f"{HUMAN} Hi{ASSISTANT} Hey", "non_string_value"),
    (f"{HUMAN} Hi{ASSISTANT} Hey", 3, "non_string_value"),
])
def test_split_refuses_traps_with_named_reason(chosen, rejected, reason):
    with pytest.raises(ValueError) as info:
        split_hh_pair(chosen, rejected)
    assert isinstance(info.value, PairError) and info.value.reason == reason
    assert reason in str(info.value)


def test_rightmost_split_would_have_been_wrong_for_diverging_pair():
    """The trap itself: splitting each text at its own last marker gives wrong answers."""
    chosen = f"{HUMAN} Hi{ASSISTANT} Hello!{HUMAN} Bye{ASSISTANT} Ciao"
    rejected = f"{HUMAN} Hi{ASSISTANT} Go."
    naive_rejected = rejected[rejected.rfind(ASSISTANT) + len(ASSISTANT):]
    assert naive_rejected == " Go."          # an answer to "Hi", not to "Bye"
    with pytest.raises(PairError, match="diverges_before_last_turn"):
        split_hh_pair(chosen, rejected)


# ---- load_preference_pairs: accounting and sources ------------------------------------------

def test_trap_fixture_accounting_adds_up():
    pairs, report = load_preference_pairs(str(TRAPS))
    expected = {}
    for outcome in EXPECTED_TRAPS:
        expected[outcome] = expected.get(outcome, 0) + 1
    assert dict(report) == expected
    assert report.rows_read == len(EXPECTED_TRAPS) == sum(report.values())
    assert len(pairs) == report["kept"] == 2
    assert pairs[1]["chosen"].startswith(" I think")
    assert set(report.examples) == set(expected) - {"kept"}
    table = report.table()
    assert table.loc["total rows read", "count"] == len(EXPECTED_TRAPS)
    assert abs(table["share"].iloc[:-1].sum() - 1.0) < 1e-9


def test_strict_mode_raises_on_first_bad_row():
    with pytest.raises(PairError) as info:
        load_preference_pairs(str(TRAPS), strict=True)
    assert info.value.reason == "diverges_before_last_turn" and "row 2" in str(info.value)


def test_limit_counts_rows_read():
    pairs, report = load_preference_pairs(str(TRAPS), limit=5)
    assert report.rows_read == 5 and len(pairs) == 2


def test_gzip_file_and_hh_folder_layout(tmp_path):
    for subset in ("harmless-base", "helpful-base"):
        (tmp_path / subset).mkdir()
        with gzip.open(tmp_path / subset / "test.jsonl.gz", "wt") as handle:
            handle.write(TRAPS.read_text())
    _, one = load_preference_pairs(str(tmp_path), split="test", data_dir="harmless-base")
    _, both = load_preference_pairs(str(tmp_path), split="test")
    assert one.rows_read == len(EXPECTED_TRAPS) and both.rows_read == 2 * len(EXPECTED_TRAPS)
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        load_preference_pairs(str(tmp_path), split="train")


def test_bundled_source_is_clean_and_split():
    train, train_report = load_preference_pairs("bundled", "train")
    test, test_report = load_preference_pairs("bundled", "test")
    assert dict(train_report) == {"kept": 2000} and dict(test_report) == {"kept": 200}
    assert any(p["prompt"].count(ASSISTANT) > 1 for p in train)  # multi-turn dialogues


def test_unknown_source_names_alternatives():
    with pytest.raises(FileNotFoundError, match="bundled"):
        load_preference_pairs("no/such/file.jsonl")


def test_hub_source_fails_fast_offline(monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(HubUnavailableError) as info:
        load_preference_pairs("Anthropic/hh-rlhf", data_dir="harmless-base")
    message = str(info.value)
    assert "Anthropic/hh-rlhf" in message and "source='bundled'" in message


def test_hub_source_in_offline_mode_without_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with pytest.raises(HubUnavailableError, match="local source"):
        load_preference_pairs("Anthropic/hh-rlhf", split="test")


@pytest.mark.skipif(not data.SHARED_HH_FILE.is_file(), reason="../shared hh-rlhf file absent")
def test_real_hh_rlhf_file():
    pairs, report = load_preference_pairs(str(data.SHARED_HH_FILE))
    assert report.rows_read == 2312 == sum(report.values())
    assert report["kept"] > 2200
    assert report.get("diverges_before_last_turn", 0) > 0 and report.get("empty_response", 0) > 0
    for pair in pairs:
        assert pair["prompt"].startswith(HUMAN) and pair["prompt"].endswith(ASSISTANT)
        for side in ("chosen", "rejected"):
            assert HUMAN not in pair[side] and pair[side].strip()
        assert pair["chosen"] != pair["rejected"]


# ---- tokenization --------------------------------------------------------------------------

class CharTokenizer:
    """One token per character (its code point), EOS = 0: token-by-token checks by hand."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def ids(text):
    return [ord(c) for c in text]


def test_tokenize_masks_prompt_and_appends_eos():
    pair = {"prompt": "Q:", "chosen": " yes", "rejected": " no"}
    [example], report = tokenize_pairs([pair], CharTokenizer(), max_length=16,
                                       max_prompt_length=8)
    assert example["prompt_input_ids"] == ids("Q:")
    assert example["chosen_input_ids"] == ids("Q: yes") + [0]
    assert example["chosen_labels"] == [-100, -100] + ids(" yes") + [0]
    assert example["rejected_input_ids"] == ids("Q: no") + [0]
    assert example["rejected_labels"] == [-100, -100] + ids(" no") + [0]
    assert dict(report) == {"pairs": 1, "prompt_truncated": 0, "response_truncated": 0}


def test_overlong_prompt_keeps_its_end_and_responses_keep_their_start():
    pair = {"prompt": "abcdefghij", "chosen": " 12345678", "rejected": " x"}
    [example], report = tokenize_pairs([pair], CharTokenizer(), max_length=8,
                                       max_prompt_length=4)
    assert example["prompt_input_ids"] == ids("ghij")
    assert example["chosen_input_ids"] == ids("ghij 123")  # EOS cut with the tail
    assert example["rejected_input_ids"] == ids("ghij x") + [0]
    assert example["chosen_labels"] == [IGNORE_INDEX] * 4 + ids(" 123")
    assert dict(report) == {"pairs": 1, "prompt_truncated": 1, "response_truncated": 1}


def test_prompt_not_truncated_when_pair_fits():
    pair = {"prompt": "abcdefgh", "chosen": " y", "rejected": " n"}
    [example], report = tokenize_pairs([pair], CharTokenizer(), max_length=12,
                                       max_prompt_length=4)
    assert example["prompt_input_ids"] == ids("abcdefgh") and report["prompt_truncated"] == 0


def test_tokenize_rejects_bad_lengths():
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_pairs([], CharTokenizer(), max_length=8, max_prompt_length=8)


def test_sft_examples_are_prompt_plus_chosen():
    pair = {"prompt": "Q:", "chosen": " yes", "rejected": " no"}
    examples, _ = tokenize_pairs([pair], CharTokenizer(), 16, 8)
    [sft] = sft_examples(examples)
    assert sft["input_ids"] == ids("Q: yes") + [0]
    assert sft["labels"] == [-100, -100] + ids(" yes") + [0]


def test_real_tokenizer_tokenizes_prompt_and_answer_separately():
    from dpo_lib.models import load_tokenizer

    tokenizer = load_tokenizer("tiny-gpt-neox")
    pair = {"prompt": f"{HUMAN} Hi{ASSISTANT}", "chosen": " Hello there.", "rejected": " Go."}
    [example], _ = tokenize_pairs([pair], tokenizer, 64, 32)
    prompt_ids = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(pair["chosen"], add_special_tokens=False)["input_ids"]
    assert example["chosen_input_ids"] == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(example["chosen_input_ids"][len(prompt_ids):-1]) == " Hello there."


# ---- collation and batching ----------------------------------------------------------------

def test_collate_preference_pads_both_sides_to_one_length():
    pairs = [{"prompt": "Q:", "chosen": " yes", "rejected": " no"},
             {"prompt": "Longer?", "chosen": " a", "rejected": " bb"}]
    examples, _ = tokenize_pairs(pairs, CharTokenizer(), 32, 16)
    batch = collate_preference(examples, pad_token_id=7)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (2, 11)
    assert batch["chosen_input_ids"][0].tolist() == ids("Q: yes") + [0] + [7] * 4
    assert batch["chosen_attention_mask"][0].tolist() == [1] * 7 + [0] * 4
    assert batch["chosen_labels"][0].tolist() == [-100] * 2 + ids(" yes") + [0] + [-100] * 4
    assert batch["rejected_attention_mask"].sum().item() == 6 + 11
    real = 7 + 10 + 6 + 11
    assert padding_fraction(batch) == pytest.approx(1 - real / (4 * 11))


def test_collate_sft():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}]
    batch = collate_sft(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert padding_fraction(batch) == pytest.approx(2 / 6)


def test_length_grouping_covers_every_example_once_and_cuts_padding():
    from dpo_lib.models import load_tokenizer

    pairs, _ = load_preference_pairs("bundled", "train", limit=400)
    examples, _ = tokenize_pairs(pairs, load_tokenizer("tiny-gpt-neox"), 128, 96)
    for grouped in (False, True):
        batches = batch_indices(examples, 8, group_by_length=grouped, seed=1)
        assert sorted(i for b in batches for i in b) == list(range(400))
        assert all(len(b) == 8 for b in batches)
    report = padding_report(examples, 8, seed=1)
    assert report["length_grouped"] < 0.5 * report["random"]
    assert batch_indices(examples, 8, seed=1) == batch_indices(examples, 8, seed=1)
    assert batch_indices(examples, 8, seed=1) != batch_indices(examples, 8, seed=2)
