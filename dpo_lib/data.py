"""Preference data in Anthropic hh-rlhf format: reading, splitting, accounting, tokenizing, batching.

An hh-rlhf row is ``{"chosen": text, "rejected": text}``, each text a whole dialogue
``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: answer"``. The two texts share
the dialogue up to the last assistant turn and differ in the answer. :func:`split_hh_pair` turns a
row into ``(prompt, chosen_response, rejected_response)``; :func:`load_preference_pairs` reads a
whole source and accounts for every row; :func:`tokenize_pairs` and the collators make model
inputs as the DPO reference implementation does.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"
IGNORE_INDEX = -100
REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_DIR = REPO_ROOT / "data" / "bundled"
SHARED_HH_FILE = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

#: Every outcome a row can have, with what it means. ``kept`` first, then the skip reasons.
OUTCOMES = {
    "kept": "split into prompt / chosen / rejected",
    "invalid_json": "the line is not valid JSON, or not a JSON object",
    "missing_key": "the row lacks 'chosen' or 'rejected'",
    "non_string_value": "'chosen' or 'rejected' is not a string",
    "no_shared_assistant_turn": "the texts share no '\\n\\nAssistant:' turn",
    "diverges_before_last_turn": "the texts differ before the last assistant turn",
    "empty_response": "the chosen or the rejected answer is empty or whitespace",
    "identical_responses": "chosen and rejected answers are the same text",
}


class PairError(ValueError):
    """A row that cannot become a preference pair; ``reason`` is a key of :data:`OUTCOMES`."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {OUTCOMES[reason]}" + (f" ({detail})" if detail else ""))


class HubUnavailableError(ConnectionError):
    """The Hugging Face Hub cannot be reached (offline, or no network)."""


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split an hh-rlhf pair into ``(prompt, chosen_response, rejected_response)``.

    The prompt is everything up to and including the last ``"\\n\\nAssistant:"`` that both texts
    share, i.e. the right-most marker in ``chosen`` whose whole prefix ``rejected`` has too. The
    responses are the rest of each text exactly as written, leading space included (it tokenizes
    with the answer's first word). A longest common *character* prefix would be wrong: two
    answers that both begin "I think" would lose those words to the prompt.

    Raises :class:`PairError` (a ``ValueError``) naming the reason when the pair cannot be split:
    non-string texts, no shared assistant turn, texts that diverge before the last assistant turn
    (the "answer" would then hold further dialogue), an empty answer, identical answers.
    """
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise PairError("non_string_value",
                        f"chosen is {type(chosen).__name__}, rejected is {type(rejected).__name__}")
    end = None
    pos = chosen.rfind(ASSISTANT)
    while pos != -1:
        candidate = pos + len(ASSISTANT)
        if rejected[:candidate] == chosen[:candidate]:
            end = candidate
            break
        pos = chosen.rfind(ASSISTANT, 0, pos)
    if end is None:
        raise PairError("no_shared_assistant_turn")
    prompt, chosen_response, rejected_response = chosen[:end], chosen[end:], rejected[end:]
    for response in (chosen_response, rejected_response):
        if HUMAN in response or ASSISTANT in response:
            raise PairError("diverges_before_last_turn",
                            f"the shared prefix ends at turn {prompt.count(ASSISTANT)}")
    if not chosen_response.strip() or not rejected_response.strip():
        raise PairError("empty_response")
    if chosen_response == rejected_response:
        raise PairError("identical_responses")
    return prompt, chosen_response, rejected_response


def parse_hh_row(row) -> dict:
    """``{"chosen", "rejected"}`` row -> ``{"prompt", "chosen", "rejected"}``, or :class:`PairError`."""
    if not isinstance(row, dict):
        raise PairError("invalid_json", f"a {type(row).__name__}, not an object")
    missing = [key for key in ("chosen", "rejected") if key not in row]
    if missing:
        raise PairError("missing_key", f"missing {', '.join(missing)}")
    prompt, chosen, rejected = split_hh_pair(row["chosen"], row["rejected"])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


class PairReport(dict):
    """Outcome -> count for every row read; the values add up to ``rows_read``.

    ``examples`` maps each skip reason to ``(row_number, row)`` of its first occurrence, so a
    reader can look at what was skipped; ``table()`` gives a pandas DataFrame.
    """

    def __init__(self, source: str):
        super().__init__(kept=0)
        self.source = source
        self.examples: dict[str, tuple[int, object]] = {}

    @property
    def rows_read(self) -> int:
        return sum(self.values())

    def add(self, outcome: str, row_number: int, row) -> None:
        self[outcome] = self.get(outcome, 0) + 1
        if outcome != "kept":
            self.examples.setdefault(outcome, (row_number, row))

    def table(self):
        import pandas as pd

        total = self.rows_read
        rows = [{"outcome": key, "count": count, "share": count / total if total else 0.0,
                 "meaning": OUTCOMES[key]} for key, count in self.items()]
        rows.append({"outcome": "total rows read", "count": total, "share": 1.0, "meaning": ""})
        return pd.DataFrame(rows).set_index("outcome")

    def __str__(self):
        lines = [f"{self.source}: {self.rows_read} rows read"]
        lines += [f"  {key:<27} {count:>7}" for key, count in self.items()]
        return "\n".join(lines)


def _read_jsonl(path: Path) -> Iterator[object]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                yield _InvalidLine(line, str(error))


@dataclass
class _InvalidLine:
    line: str
    error: str


def _local_files(path: Path, split: str, data_dir: str | None) -> list[Path]:
    if path.is_file():
        return [path]
    folder = path / data_dir if data_dir else path
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (folder / name).is_file():
            return [folder / name]
    nested = sorted(folder.glob(f"*/{split}.jsonl.gz")) + sorted(folder.glob(f"*/{split}.jsonl"))
    if nested:  # the hh-rlhf layout: one folder per subset, all read when no data_dir is given
        return nested
    raise FileNotFoundError(f"no {split}.jsonl(.gz) in {folder} or its subfolders")


_HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _local_alternatives() -> str:
    shared = f"'{SHARED_HH_FILE}'" if SHARED_HH_FILE.is_file() else "a downloaded hh-rlhf file"
    return ("Use a local source instead: source='bundled' (the project's own sample in data/), "
            f"or the path of an hh-rlhf .jsonl/.jsonl.gz file or folder, e.g. {shared}. "
            "On a machine with network, the files are at "
            "https://huggingface.co/datasets/Anthropic/hh-rlhf (one folder per subset).")


def check_hub_reachable(what: str, timeout: float = 5.0) -> None:
    """Raise :class:`HubUnavailableError` at once when the Hub cannot be reached.

    Offline mode (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``) is left to the libraries' caches.
    """
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0].split(":")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        raise HubUnavailableError(
            f"cannot load {what} from the Hugging Face Hub: {host} is unreachable ({error}).") \
            from error


def _hub_rows(repo_id: str, split: str, data_dir: str | None) -> Iterator[object]:
    repo_id = repo_id.removeprefix("hf://")
    try:
        check_hub_reachable(f"the dataset {repo_id!r}")
        from datasets import load_dataset

        dataset = load_dataset(repo_id, data_dir=data_dir, split=split)
    except Exception as error:  # offline, not cached, DNS, HTTP: one clear message
        raise HubUnavailableError(
            f"cannot load dataset {repo_id!r} (data_dir={data_dir!r}, split={split!r}) from the "
            f"Hub: {error}\n{_local_alternatives()}") from error
    yield from dataset


def iter_rows(source: str | os.PathLike, split: str = "train",
              data_dir: str | None = None) -> Iterator[object]:
    """Raw rows of a source: ``"bundled"``, a local file or folder, or a Hub dataset id."""
    if str(source) == "bundled":
        for file in _local_files(BUNDLED_DIR, split, None):
            yield from _read_jsonl(file)
        return
    path = Path(source).expanduser()
    if path.exists():
        for file in _local_files(path, split, data_dir):
            yield from _read_jsonl(file)
        return
    if _HUB_ID.match(str(source)):
        yield from _hub_rows(str(source), split, data_dir)
        return
    raise FileNotFoundError(f"data source {str(source)!r} is neither 'bundled', an existing path, "
                            f"nor a Hub dataset id. {_local_alternatives()}")


def load_preference_pairs(source, split: str = "train", limit: int | None = None,
                          strict: bool = False, data_dir: str | None = None):
    """Read up to ``limit`` rows of ``source`` and split each into a preference pair.

    ``source``: ``"bundled"``, a ``.jsonl``/``.jsonl.gz`` file (``split`` is then ignored), a folder
    holding ``{split}.jsonl(.gz)`` (or subset folders that do, as hh-rlhf is laid out), or a Hub
    dataset id such as ``"Anthropic/hh-rlhf"`` (with ``data_dir`` naming a subset).

    Returns ``(pairs, report)``: ``pairs`` a list of ``{"prompt", "chosen", "rejected"}`` dicts,
    ``report`` a :class:`PairReport` mapping ``kept`` and each skip reason to its count, the counts
    adding up to the rows read. With ``strict=True`` the first bad row raises :class:`PairError`.
    """
    report = PairReport(str(source) + (f" [{data_dir}]" if data_dir else "") + f" ({split})")
    pairs = []
    for number, row in enumerate(iter_rows(source, split, data_dir)):
        if limit is not None and number >= limit:
            break
        try:
            if isinstance(row, _InvalidLine):
                raise PairError("invalid_json", row.error)
            pair = parse_hh_row(row)
        except PairError as error:
            if strict:
                raise PairError(error.reason, f"row {number} of {report.source}") from error
            report.add(error.reason, number, row)
            continue
        pairs.append(pair)
        report.add("kept", number, row)
    return pairs, report


def default_hh_file() -> str:
    """The real hh-rlhf sample beside the project when present, else ``"bundled"``."""
    return str(SHARED_HH_FILE) if SHARED_HH_FILE.is_file() else "bundled"


# --------------------------------------------------------------------------------------------
# Tokenization, as the DPO reference implementation does it
# --------------------------------------------------------------------------------------------

class TokenizationReport(dict):
    """Counts from :func:`tokenize_pairs`: ``pairs``, ``prompt_truncated``, ``response_truncated``."""

    def __str__(self):
        return ", ".join(f"{key}: {value}" for key, value in self.items())


def _truncate(prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length):
    """Prompt keeps its end, responses keep their start (the reference implementation's rule)."""
    prompt_cut = response_cut = False
    longer = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longer > max_length and len(prompt_ids) > max_prompt_length:
        prompt_ids, prompt_cut = prompt_ids[-max_prompt_length:], True
    if len(prompt_ids) + longer > max_length:
        room = max_length - len(prompt_ids)
        chosen_ids, rejected_ids, response_cut = chosen_ids[:room], rejected_ids[:room], True
    return prompt_ids, chosen_ids, rejected_ids, prompt_cut, response_cut


def tokenize_pairs(pairs: Sequence[dict], tokenizer, max_length: int, max_prompt_length: int,
                   progress: bool = False):
    """Tokenize preference pairs into model inputs.

    Prompt and responses are tokenized separately (no special tokens), EOS is appended to each
    response, then the pair is truncated to ``max_length``: first the prompt to its last
    ``max_prompt_length`` tokens, then both responses to their first ``max_length - len(prompt)``.
    Labels copy the input ids with the prompt masked to -100.

    Returns ``(examples, report)``; each example has lists ``prompt_input_ids`` (P),
    ``chosen_input_ids``/``chosen_labels`` (P + C) and ``rejected_input_ids``/``rejected_labels``
    (P + R). ``report`` counts the truncated prompts and responses.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length "
                         f"({max_length}): the responses need room after the prompt")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end responses with")
    from tqdm.auto import tqdm

    report = TokenizationReport(pairs=len(pairs), prompt_truncated=0, response_truncated=0)
    examples = []
    chunk = 512
    bar = tqdm(total=len(pairs), desc="tokenizing", unit="pair", disable=not progress)
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        encoded = {key: tokenizer([p[key] for p in part], add_special_tokens=False)["input_ids"]
                   for key in ("prompt", "chosen", "rejected")}
        for prompt_ids, chosen_ids, rejected_ids in zip(
                encoded["prompt"], encoded["chosen"], encoded["rejected"]):
            eos = [tokenizer.eos_token_id]
            prompt_ids, chosen_ids, rejected_ids, prompt_cut, response_cut = _truncate(
                prompt_ids, chosen_ids + eos, rejected_ids + eos, max_length, max_prompt_length)
            report["prompt_truncated"] += prompt_cut
            report["response_truncated"] += response_cut
            masked = [IGNORE_INDEX] * len(prompt_ids)
            examples.append({
                "prompt_input_ids": prompt_ids,
                "chosen_input_ids": prompt_ids + chosen_ids,
                "chosen_labels": masked + chosen_ids,
                "rejected_input_ids": prompt_ids + rejected_ids,
                "rejected_labels": masked + rejected_ids,
            })
        bar.update(len(part))
    bar.close()
    return examples, report


def sft_examples(examples: Sequence[dict]) -> list[dict]:
    """SFT examples from tokenized pairs: the prompt and the *chosen* response, loss on the response."""
    return [{"input_ids": e["chosen_input_ids"], "labels": e["chosen_labels"]} for e in examples]


# --------------------------------------------------------------------------------------------
# Collation and batching
# --------------------------------------------------------------------------------------------

def pad_to(sequences: Sequence[Sequence[int]], value: int, length: int) -> torch.Tensor:
    """Right-pad integer lists to ``length``: a LongTensor of shape ``[len(sequences), length]``."""
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        out[row, :len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return out


def collate_preference(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of tokenized pairs into one batch, chosen and rejected to the same length L.

    Returns ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_labels`` and the same three for
    ``rejected``, each ``[B, L]``, so that ``torch.cat`` of chosen and rejected is a ``[2B, L]`` batch
    for one forward pass. Padding is on the right: ids ``pad_token_id``, mask 0, labels -100.
    """
    length = max(max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) for e in examples)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = [e[f"{side}_input_ids"] for e in examples]
        batch[f"{side}_input_ids"] = pad_to(ids, pad_token_id, length)
        batch[f"{side}_attention_mask"] = pad_to([[1] * len(s) for s in ids], 0, length)
        batch[f"{side}_labels"] = pad_to([e[f"{side}_labels"] for e in examples], IGNORE_INDEX,
                                         length)
    return batch


def collate_sft(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad SFT examples: ``input_ids``, ``attention_mask``, ``labels``, each ``[B, L]``."""
    length = max(len(e["input_ids"]) for e in examples)
    ids = [e["input_ids"] for e in examples]
    return {"input_ids": pad_to(ids, pad_token_id, length),
            "attention_mask": pad_to([[1] * len(s) for s in ids], 0, length),
            "labels": pad_to([e["labels"] for e in examples], IGNORE_INDEX, length)}


def padding_fraction(batch: dict[str, torch.Tensor]) -> float:
    """Share of padded positions among all positions of a collated batch (all its masks)."""
    masks = [value for key, value in batch.items() if key.endswith("attention_mask")]
    total = sum(mask.numel() for mask in masks)
    return 1.0 - sum(int(mask.sum()) for mask in masks) / total if total else 0.0


def example_length(example: dict) -> int:
    """Tokens one example occupies in a batch (the longer side of a pair)."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return max(len(example["chosen_input_ids"]), len(example["rejected_input_ids"]))


def batch_indices(examples: Sequence[dict], batch_size: int, group_by_length: bool = True,
                  seed: int = 0) -> list[list[int]]:
    """Shuffled batches of example indices; with ``group_by_length``, examples of similar length
    share a batch (transformers' mega-batch scheme: shuffle, sort within groups of 50 batches),
    which cuts padding while keeping the order random."""
    generator = torch.Generator().manual_seed(seed)
    if group_by_length:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = get_length_grouped_indices([example_length(e) for e in examples], batch_size,
                                           generator=generator)
    else:
        order = torch.randperm(len(examples), generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padding_report(examples: Sequence[dict], batch_size: int, seed: int = 0,
                   collate=None) -> dict[str, float]:
    """Padding fraction over a whole epoch of batches, shuffled at random vs grouped by length.

    ``collate``: how batches are made (default: by the examples' kind; e.g.
    :func:`dpo_lib.packing.collate_shared_prompt` for the packed layout).
    """
    collate = collate or (collate_sft if "input_ids" in examples[0] else collate_preference)
    result = {}
    for name, grouped in (("random", False), ("length_grouped", True)):
        padded = real = 0
        for indices in batch_indices(examples, batch_size, grouped, seed):
            batch = collate([examples[i] for i in indices], 0)
            masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
            padded += sum(int((m == 0).sum()) for m in masks)
            real += sum(int(m.sum()) for m in masks)
        result[name] = padded / (padded + real)
    return result
