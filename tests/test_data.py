"""The hh-rlhf pipeline: splitting, its traps, accounting, sources, tokenization, batching."""
import gzip
import json
import socket

import pytest

from dpo_lib.core import data
from dpo_lib.core import hub
from dpo_lib.core.batches import IGNORE_INDEX, batch_indices, sft_examples, tokenize_pairs
from dpo_lib.core.layouts import (PackedLayout, PlainLayout, SequenceLayout, padding_fraction,
                                  padding_report, real_tokens)
from dpo_lib.core.data import ASSISTANT, HUMAN, PairError, load_preference_pairs, split_hh_pair
from dpo_lib.core.hub import HubUnavailableError
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
    pairs, report = load_preference_pairs(str(TRAPS), split=None)
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
        load_preference_pairs(str(TRAPS), split=None, strict=True)
    assert info.value.reason == "diverges_before_last_turn" and "row 2" in str(info.value)


def test_limit_counts_rows_read():
    pairs, report = load_preference_pairs(str(TRAPS), split=None, limit=5, order="file")
    assert report.rows_read == 5 and len(pairs) == 2 and report.available == len(EXPECTED_TRAPS)


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


def _real_hh_file():
    try:
        return hub.hh_rlhf_file(download=False)
    except FileNotFoundError:
        return None


REAL_HH = _real_hh_file()
needs_real_hh = pytest.mark.skipif(REAL_HH is None, reason=f"${hub.HH_RLHF_DIR_VAR} not set "
                                   "(CI sets it to ../shared/data/hh-rlhf)")


@needs_real_hh
def test_real_hh_rlhf_file():
    pairs, report = load_preference_pairs(str(REAL_HH), split=None)
    assert report.rows_read == 2312 == sum(report.values())
    assert report["kept"] > 2200
    assert report.get("diverges_before_last_turn", 0) > 0 and report.get("empty_response", 0) > 0
    for pair in pairs:
        assert pair["prompt"].startswith(HUMAN) and pair["prompt"].endswith(ASSISTANT)
        for side in ("chosen", "rejected"):
            assert HUMAN not in pair[side] and pair[side].strip()
        assert pair["chosen"] != pair["rejected"]


@needs_real_hh
def test_real_file_held_out_slice_is_disjoint_and_stable():
    """The issue's measurement: 99 of the first 99 'test' pairs were among the 'train' pairs."""
    kwargs = dict(test_fraction=0.15, seed=0)
    test, test_report = load_preference_pairs(str(REAL_HH), "test", limit=300, **kwargs)
    train, _ = load_preference_pairs(str(REAL_HH), "train", **kwargs)
    assert len(test) >= 280 and test_report.available > 300
    assert not {p["prompt"] for p in test} & {p["prompt"] for p in train}
    assert len(train) + test_report.available > 2200
    smaller, _ = load_preference_pairs(str(REAL_HH), "train", limit=320, **kwargs)
    again, _ = load_preference_pairs(str(REAL_HH), "test", limit=300, **kwargs)
    assert again == test and not {p["prompt"] for p in smaller} & {p["prompt"] for p in test}


def first_human_turn(prompt: str) -> str:
    """The opening of a conversation, read here directly from the text (not through the
    library's key): what the human said first."""
    return " ".join(prompt.split(HUMAN, 2)[1].split(ASSISTANT)[0].split())


@needs_real_hh
def test_real_file_splits_by_conversation_so_no_held_out_pair_shares_an_opening():
    """Branches of one red-teaming conversation continue it differently; held out by prompt, 28
    of 351 held-out pairs opened with a human turn a training pair opens with. Split by the
    conversation, no held-out (or dev) pair shares its opening with a training pair, and the
    three slices cover every row once."""
    kwargs = dict(test_fraction=0.15, dev_fraction=0.15, seed=0)
    parts = {split: load_preference_pairs(str(REAL_HH), split, **kwargs)
             for split in ("train", "dev", "test")}
    openings = {split: {first_human_turn(p["prompt"]) for p in pairs}
                for split, (pairs, _) in parts.items()}
    assert not openings["test"] & openings["train"]
    assert not openings["dev"] & openings["train"] and not openings["dev"] & openings["test"]
    assert sum(report.rows_read for _, report in parts.values()) == 2312
    assert all(len(pairs) > 250 for pairs, _ in parts.values())
    # no held-out prompt continues a training prompt (one is the other's prefix)
    train_prompts = [p["prompt"] for p in parts["train"][0]]
    for pair in parts["test"][0][:120]:
        assert not any(t.startswith(pair["prompt"]) or pair["prompt"].startswith(t)
                       for t in train_prompts)


# ---- sources, splits and sampling -----------------------------------------------------------

def _row(i: int, subset: str = "s") -> dict:
    prompt = f"{HUMAN} Question {i} from {subset}?{ASSISTANT}"
    return {"chosen": f"{prompt} Answer {i}.", "rejected": f"{prompt} No."}


def _write(path: Path, rows, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("\ufeff" if bom else "") + "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _prompts(pairs) -> set:
    return {p["prompt"] for p in pairs}


def test_byte_order_mark_does_not_lose_the_first_row(tmp_path):
    for name in ("bom.jsonl", "bom.jsonl.gz"):
        file = _write(tmp_path / name, [_row(i) for i in range(3)], bom=True)
        pairs, report = load_preference_pairs(str(file), split=None)
        assert dict(report) == {"kept": 3}, name
        assert pairs[0]["prompt"] == _row(0)["chosen"][:len(pairs[0]["prompt"])]


def test_single_file_needs_a_held_out_fraction_never_reuses_rows(tmp_path):
    file = _write(tmp_path / "pairs.jsonl", [_row(i) for i in range(200)])
    for split in ("train", "test"):
        with pytest.raises(ValueError, match="test_fraction"):
            load_preference_pairs(str(file), split)


def test_single_file_held_out_slice_is_disjoint_seeded_and_stable(tmp_path):
    rows = [_row(i) for i in range(400)] + [_row(7)]          # a duplicate row stays on one side
    file = _write(tmp_path / "pairs.jsonl.gz", rows)
    test, test_report = load_preference_pairs(str(file), "test", test_fraction=0.2)
    train, train_report = load_preference_pairs(str(file), "train", test_fraction=0.2)
    assert not _prompts(test) & _prompts(train)
    assert len(test) + len(train) == len(rows)
    assert 50 < len(test) < 110                                   # about 20% of 401
    assert test_report.held_out == len(train) and train_report.held_out == len(test)
    # stable when the training limit changes, different for another seed
    for limit in (10, 100, None):
        part, _ = load_preference_pairs(str(file), "train", limit=limit, test_fraction=0.2)
        assert not _prompts(part) & _prompts(test)
    assert load_preference_pairs(str(file), "test", test_fraction=0.2)[0] == test
    other, _ = load_preference_pairs(str(file), "test", test_fraction=0.2, seed=1)
    assert _prompts(other) != _prompts(test)


def _hh_folder(root: Path, sizes: dict, splits=("train", "test")) -> Path:
    for subset, size in sizes.items():
        for split in splits:
            _write(root / subset / f"{split}.jsonl.gz",
                   [_row(i, f"{subset}-{split}") for i in range(size)])
    return root


def test_limit_samples_across_every_subset_and_reports_them(tmp_path):
    root = _hh_folder(tmp_path, {"harmless-base": 100, "helpful-base": 100, "helpful-online": 100})
    pairs, report = load_preference_pairs(str(root), "train", limit=60, seed=3)
    assert len(pairs) == 60 and report.available == 300
    assert set(report.subsets) == {"harmless-base", "helpful-base", "helpful-online"}
    assert sum(report.subsets.values()) == 60 and min(report.subsets.values()) >= 8
    assert "kept pairs by subset" in str(report)
    again, _ = load_preference_pairs(str(root), "train", limit=60, seed=3)
    other, _ = load_preference_pairs(str(root), "train", limit=60, seed=4)
    assert again == pairs and other != pairs
    first, first_report = load_preference_pairs(str(root), "train", limit=60, order="file")
    assert first_report.subsets == {"harmless-base": 60}          # file order: the first subset
    with pytest.raises(ValueError, match="order"):
        load_preference_pairs(str(root), "train", limit=60, order="random")


@pytest.mark.parametrize("kind", ["bundled", "file", "split-files", "hh-layout", "train-only",
                                  "hub"])
def test_train_and_test_are_disjoint_on_every_kind_of_source(kind, tmp_path, monkeypatch):
    kwargs = {"test_fraction": 0.25}
    if kind == "bundled":
        source = "bundled"
    elif kind == "file":
        source = str(_write(tmp_path / "all.jsonl", [_row(i) for i in range(120)]))
    elif kind == "split-files":
        _write(tmp_path / "train.jsonl", [_row(i, "train") for i in range(80)])
        _write(tmp_path / "test.jsonl", [_row(i, "test") for i in range(40)])
        source = str(tmp_path)
    elif kind == "hh-layout":
        source = str(_hh_folder(tmp_path, {"a": 50, "b": 50}))
    elif kind == "train-only":
        source = str(_hh_folder(tmp_path, {"a": 60, "b": 60}, splits=("train",)))
    else:
        source = "Anthropic/hh-rlhf"
        _fake_hub(monkeypatch, {subset: 40 for subset in hub.HH_SUBSETS})
    train, _ = load_preference_pairs(source, "train", **kwargs)
    test, _ = load_preference_pairs(source, "test", **kwargs)
    assert train and test and not _prompts(train) & _prompts(test), kind
    if kind == "train-only":
        with pytest.raises(ValueError, match="test_fraction"):
            load_preference_pairs(source, "test")


def _fake_hub(monkeypatch, sizes: dict):
    """The Hub's hh-rlhf without a network: each subset a small ``datasets.Dataset``."""
    from datasets import Dataset

    calls = []

    def load_subset(repo_id, subset, split):
        calls.append((repo_id, subset, split))
        return Dataset.from_list([_row(i, f"{subset}-{split}") for i in range(sizes[subset])])

    monkeypatch.setattr(hub, "check_hub_reachable", lambda what, timeout=5.0: None)
    monkeypatch.setattr(hub, "_load_hub_subset", load_subset)
    return calls


def test_gpu_profile_samples_its_pairs_from_every_hub_subset(monkeypatch):
    from dpo_lib.core.config import load_config

    cfg = load_config("gpu", overrides={"data.train_limit": 200, "data.test_limit": 40})
    calls = _fake_hub(monkeypatch, {subset: 500 for subset in hub.HH_SUBSETS})
    pairs, report = data.load_split(cfg, "train", cfg.data.train_limit)
    assert len(pairs) == 200 and report.available == 2000
    assert set(report.subsets) == set(hub.HH_SUBSETS) and min(report.subsets.values()) > 20
    assert {subset for _, subset, _ in calls} == set(hub.HH_SUBSETS)
    assert data.load_split(cfg, "train", 200)[0] == pairs                # reproducible
    test, test_report = data.load_split(cfg, "test", cfg.data.test_limit)
    assert len(test_report.subsets) == 4 and not _prompts(test) & _prompts(pairs)
    one, one_report = load_preference_pairs("Anthropic/hh-rlhf", "train", limit=50,
                                            data_dir="helpful-base")
    assert one_report.subsets == {"helpful-base": 50}


def test_real_data_setting_and_its_fallbacks(tmp_path, monkeypatch):
    """$DPO_HH_RLHF_DIR first; else a download through huggingface_hub (tested up to the
    network call); offline, the bundled set, and the notebook is told so."""
    import huggingface_hub

    _write(tmp_path / "harmless-base-test.jsonl.gz", [_row(i) for i in range(5)])
    monkeypatch.setenv(hub.HH_RLHF_DIR_VAR, str(tmp_path))
    assert hub.hh_rlhf_file() == tmp_path / "harmless-base-test.jsonl.gz"
    source, how = hub.real_hh_source()
    assert source == str(tmp_path / "harmless-base-test.jsonl.gz") and "DPO_HH_RLHF_DIR" in how
    pairs, _ = load_preference_pairs("hh-rlhf:harmless-base/test.jsonl.gz", split=None)
    assert len(pairs) == 5

    monkeypatch.delenv(hub.HH_RLHF_DIR_VAR)
    downloaded = _write(tmp_path / "cache" / "test.jsonl.gz", [_row(1)])
    asked = []

    def fake_download(repo_id, filename, repo_type=None, **kwargs):
        asked.append((repo_id, filename, repo_type))
        return str(downloaded)

    monkeypatch.setattr(hub, "check_hub_reachable", lambda what, timeout=5.0: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert hub.real_hh_source()[0] == str(downloaded)
    assert asked == [("Anthropic/hh-rlhf", "harmless-base/test.jsonl.gz", "dataset")]

    monkeypatch.undo()
    monkeypatch.delenv(hub.HH_RLHF_DIR_VAR, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    source, how = hub.real_hh_source()
    assert source == "bundled" and "falling back to the bundled" in how


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
    from dpo_lib.core.models import load_tokenizer

    tokenizer = load_tokenizer("tiny-gpt-neox")
    pair = {"prompt": f"{HUMAN} Hi{ASSISTANT}", "chosen": " Hello there.", "rejected": " Go."}
    [example], _ = tokenize_pairs([pair], tokenizer, 64, 32)
    prompt_ids = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(pair["chosen"], add_special_tokens=False)["input_ids"]
    assert example["chosen_input_ids"] == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(example["chosen_input_ids"][len(prompt_ids):-1]) == " Hello there."


# ---- collation and batching ----------------------------------------------------------------

def test_plain_layout_pads_both_sides_to_one_length():
    pairs = [{"prompt": "Q:", "chosen": " yes", "rejected": " no"},
             {"prompt": "Longer?", "chosen": " a", "rejected": " bb"}]
    examples, _ = tokenize_pairs(pairs, CharTokenizer(), 32, 16)
    batch = PlainLayout().collate(examples, pad_token_id=7)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (2, 11)
    assert batch["chosen_input_ids"][0].tolist() == ids("Q: yes") + [0] + [7] * 4
    assert batch["chosen_attention_mask"][0].tolist() == [1] * 7 + [0] * 4
    assert batch["chosen_labels"][0].tolist() == [-100] * 2 + ids(" yes") + [0] + [-100] * 4
    assert batch["rejected_attention_mask"].sum().item() == 6 + 11
    real = 7 + 10 + 6 + 11
    assert padding_fraction(batch) == pytest.approx(1 - real / (4 * 11))


def test_sequence_layout_pads_sft_examples():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}]
    batch = SequenceLayout().collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert padding_fraction(batch) == pytest.approx(2 / 6)


def test_length_grouping_covers_every_example_once_and_cuts_padding():
    from dpo_lib.core.models import load_tokenizer

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


def test_each_layout_groups_by_the_length_of_its_own_rows():
    """A layout's ``length`` is the row its collate makes of one example (the packed layout's
    ``P + C + R``, longer than either side); grouping the packed layout's batches by it leaves
    less padding than grouping by the longer side, which the packed rows do not have."""
    from dpo_lib.core.models import load_tokenizer

    pairs, _ = load_preference_pairs("bundled", "train", limit=400)
    examples, _ = tokenize_pairs(pairs, load_tokenizer("tiny-gpt-neox"), 128, 96)
    for layout, key, items in ((PlainLayout(), "chosen_input_ids", examples),
                               (PackedLayout(), "input_ids", examples),
                               (SequenceLayout(), "input_ids", sft_examples(examples))):
        for example in items[:50]:
            assert layout.length(example) == layout.collate([example], 0)[key].shape[1]
    packed = PackedLayout()
    assert any(packed.length(e) > max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"]))
               for e in examples)

    def padded(batches):
        return sum(real_tokens(packed.collate([examples[i] for i in b], 0))[1] for b in batches) \
            - sum(packed.length(e) for e in examples)

    by_longer_side = padded(batch_indices(examples, 8, seed=1))
    by_packed_row = padded(batch_indices(examples, 8, seed=1,
                                         lengths=[packed.length(e) for e in examples]))
    assert by_packed_row < 0.8 * by_longer_side, (by_packed_row, by_longer_side)
    report = padding_report(examples, 8, packed, seed=1)
    assert report["length_grouped"] == pytest.approx(
        by_packed_row / (by_packed_row + sum(packed.length(e) for e in examples)))
