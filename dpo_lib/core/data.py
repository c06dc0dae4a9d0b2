"""Preference data in Anthropic hh-rlhf format: reading, splitting, accounting.

An hh-rlhf row is ``{"chosen": text, "rejected": text}``, each text a whole dialogue
``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: answer"``. The two texts share
the dialogue up to the last assistant turn and differ in the answer. :func:`split_hh_pair` turns a
row into ``(prompt, chosen_response, rejected_response)``; :func:`load_preference_pairs` reads a
whole source and accounts for every row; :mod:`dpo_lib.core.batches` turns the pairs into model
inputs as the DPO reference implementation does.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .config import BUNDLED_DIR
from .errors import DataError, MissingFileError
from .hub import hh_rlhf_file, hub_rows, local_alternatives

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"

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


class PairError(DataError):
    """A row that cannot become a preference pair; ``reason`` is a key of :data:`OUTCOMES`."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {OUTCOMES[reason]}" + (f" ({detail})" if detail else ""))


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
    reader can look at what was skipped; ``subsets`` counts the kept pairs by the subset (file or
    folder) they came from; ``available`` is the number of rows the split had before ``limit``
    drew from it, and ``held_out`` the rows of the source set aside for the other split (a source
    without its own test split, see :func:`load_preference_pairs`). ``table()`` gives a pandas
    DataFrame.
    """

    def __init__(self, source: str):
        super().__init__(kept=0)
        self.source = source
        self.examples: dict[str, tuple[int, object]] = {}
        self.subsets: dict[str, int] = {}
        self.available: int | None = None
        self.held_out = 0

    @property
    def rows_read(self) -> int:
        return sum(self.values())

    def add(self, outcome: str, row_number: int, row, subset: str | None = None) -> None:
        self[outcome] = self.get(outcome, 0) + 1
        if outcome != "kept":
            self.examples.setdefault(outcome, (row_number, row))
        elif subset is not None:
            self.subsets[subset] = self.subsets.get(subset, 0) + 1

    def table(self):
        import pandas as pd

        total = self.rows_read
        rows = [{"outcome": key, "count": count, "share": count / total if total else 0.0,
                 "meaning": OUTCOMES[key]} for key, count in self.items()]
        rows.append({"outcome": "total rows read", "count": total, "share": 1.0, "meaning": ""})
        return pd.DataFrame(rows).set_index("outcome")

    def __str__(self):
        drawn = f" (drawn from {self.available})" if self.available not in (None,
                                                                             self.rows_read) else ""
        lines = [f"{self.source}: {self.rows_read} rows read{drawn}"]
        lines += [f"  {key:<27} {count:>7}" for key, count in self.items()]
        if self.held_out:
            lines.append(f"  {'held out for the other split':<27} {self.held_out:>7}")
        if len(self.subsets) > 1:
            lines.append("  kept pairs by subset: " + ", ".join(
                f"{name} {count}" for name, count in sorted(self.subsets.items())))
        return "\n".join(lines)


@dataclass
class _InvalidLine:
    line: str
    error: str


def _read_jsonl(path: Path) -> Iterator[object]:
    """The rows of a ``.jsonl``/``.jsonl.gz`` file; a byte-order mark before the first row is
    dropped (``utf-8-sig``), an unparsable line comes back as :class:`_InvalidLine`."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                yield _InvalidLine(line, str(error))


def _subset_name(path: Path, root: Path) -> str:
    """``harmless-base`` for ``root/harmless-base/test.jsonl.gz``, the file's stem for a file."""
    return path.parent.name if path.parent != root else path.name.split(".")[0]


def _split_files(folder: Path, split: str) -> list[Path]:
    """``folder/{split}.jsonl(.gz)``, else the hh-rlhf layout ``folder/*/{split}.jsonl(.gz)``
    (one folder per subset, all of them); empty when the folder has no such split."""
    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (folder / name).is_file():
            return [folder / name]
    return sorted(folder.glob(f"*/{split}.jsonl.gz")) + sorted(folder.glob(f"*/{split}.jsonl"))


_HUB_ID = re.compile(r"^(hf://)?[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: ``data.source`` prefix for one real hh-rlhf file, found by :func:`hh_rlhf_file`.
HH_FILE_PREFIX = "hh-rlhf:"
ORDERS = ("shuffled", "file")


def conversation_key(row) -> str:
    """What decides a row's side of a held-out split: its conversation, named by the first human
    turn (hh-rlhf holds several branches of one red-teaming conversation, each continuing it
    differently; all of them go to the same side), or the raw row where it has no such turn."""
    if isinstance(row, dict):
        text = row.get("chosen")
        if isinstance(text, str) and text.lstrip().startswith(HUMAN.strip()):
            body = text.lstrip()[len(HUMAN.strip()):]
            return " ".join(body.split(ASSISTANT.strip())[0].split())
        return json.dumps(row, sort_keys=True, default=str)
    return row.line if isinstance(row, _InvalidLine) else repr(row)


SPLITS = ("train", "dev", "test")


def split_of(row, seed: int, test_fraction: float, dev_fraction: float | None = None) -> str:
    """``"test"``, ``"dev"`` or ``"train"``: where ``row`` falls when a source without splits of
    its own is divided. A hash of ``(seed, conversation)`` below ``test_fraction`` is test, the
    next ``dev_fraction`` dev, the rest train. Deterministic, independent of the other rows, of
    their order and of any limit (the slices stay the same when ``train_limit`` changes), and
    every branch of one conversation lands on the same side (:func:`conversation_key`)."""
    digest = hashlib.sha256(f"{seed}\x00{conversation_key(row)}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2 ** 64
    if position < test_fraction:
        return "test"
    if dev_fraction and position < test_fraction + dev_fraction:
        return "dev"
    return "train"


def _local_rows(path: Path, split: str | None, data_dir: str | None,
                test_fraction: float | None, seed: int, report: "PairReport",
                dev_fraction: float | None = None):
    """``[(subset, row number, row)]`` of one split of a local file or folder."""
    if split is not None and split not in SPLITS:
        raise DataError(f"split={split!r}: choose {', '.join(SPLITS)} or None (every row)")
    if path.is_file():
        root, files, sliced = path.parent, [path], split is not None
    else:
        root = path / data_dir if data_dir else path
        if split is None:
            files = sorted(root.glob("*.jsonl.gz")) + sorted(root.glob("*.jsonl")) + \
                sorted(root.glob("*/*.jsonl.gz")) + sorted(root.glob("*/*.jsonl"))
            sliced = False
        elif _split_files(root, split) and (split != "train" or _split_files(root, "test")):
            files, sliced = _split_files(root, split), False   # the source's own split
        elif split != "train" and _split_files(root, "test"):
            raise MissingFileError(f"no {split}.jsonl(.gz) in {root} or its subfolders (it has "
                                   f"splits of its own, so none is cut from its training files)")
        else:  # train files only: every split is a slice of them
            files, sliced = _split_files(root, "train"), True
            if not files:
                raise MissingFileError(f"no test.jsonl(.gz) or train.jsonl(.gz) in {root} or "
                                       "its subfolders")
    if sliced and split == "dev" and not dev_fraction:
        raise DataError(f"{path}: split='dev' needs dev_fraction (config data.dev_fraction)")
    if sliced and not test_fraction:
        raise DataError(
            f"{path} has no {split!r} split of its own: pass test_fraction (config "
            f"data.test_fraction, e.g. 0.15) to hold out a seeded slice of it for 'test' and "
            f"train on the rest, or split=None to read every row")
    rows = []
    for file in files:
        subset = _subset_name(file, root)
        for number, row in enumerate(_read_jsonl(file)):
            if sliced and split_of(row, seed, test_fraction, dev_fraction) != split:
                report.held_out += 1
                continue
            rows.append((subset, number, row))
    return rows


def iter_rows(source: str | os.PathLike, split: str | None = "train",
              data_dir: str | None = None) -> Iterator[object]:
    """Raw rows of a source, in file order: ``"bundled"``, a local file or folder, a real
    hh-rlhf file (``"hh-rlhf:harmless-base/test.jsonl.gz"``), or a Hub dataset id.
    ``split=None`` reads every row of a file or folder."""
    rows, _ = _rows(source, split, data_dir, None, "file", 0, None, PairReport(str(source)))
    for _, _, row in rows:
        yield row


def _resolve(source) -> str | Path:
    text = str(source)
    if text == "bundled":
        return BUNDLED_DIR
    if text.startswith(HH_FILE_PREFIX):
        return hh_rlhf_file(text[len(HH_FILE_PREFIX):])
    path = Path(text).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(text):
        return text
    raise MissingFileError(f"data source {text!r} is neither 'bundled', an existing path, "
                            f"nor a Hub dataset id. {local_alternatives()}")


def _rows(source, split, data_dir, limit, order, seed, test_fraction, report, dev_fraction=None):
    """The rows ``limit`` draws, and how many were available."""
    if order not in ORDERS:
        raise DataError(f"order={order!r}: choose {' or '.join(ORDERS)}")
    resolved = _resolve(source)
    if isinstance(resolved, str):
        if split is None:
            raise DataError("a Hub dataset is read one split at a time: pass split='train' "
                             "or split='test'")
        return hub_rows(resolved, split, data_dir, limit, order, seed)
    rows = _local_rows(resolved, split, data_dir, test_fraction, seed, report, dev_fraction)
    available = len(rows)
    if limit is not None and limit < available:
        if order == "shuffled":
            import numpy as np

            picked = np.random.default_rng(seed).permutation(available)[:limit]
            rows = [rows[i] for i in picked]
        else:
            rows = rows[:limit]
    return rows, available


def load_preference_pairs(source, split: str | None = "train", limit: int | None = None,
                          strict: bool = False, data_dir: str | None = None,
                          order: str = "shuffled", seed: int = 0,
                          test_fraction: float | None = None, dev_fraction: float | None = None):
    """Read ``limit`` rows of one split of ``source`` and split each into a preference pair.

    ``source``: ``"bundled"``; a ``.jsonl``/``.jsonl.gz`` file; a folder holding
    ``{split}.jsonl(.gz)`` (or subset folders that do, as hh-rlhf is laid out: all subsets are
    read, or the one ``data_dir`` names); ``"hh-rlhf:<subset>/<split>.jsonl.gz"``, one real
    hh-rlhf file (:func:`hh_rlhf_file`); or a Hub dataset id such as ``"Anthropic/hh-rlhf"``.

    ``split``: ``"train"``, ``"dev"`` or ``"test"``. A source without splits of its own (a single
    file, or a folder without test files) is divided by a seeded hash of each row's conversation
    (:func:`split_of`): ``test_fraction`` of the conversations go to ``"test"``, the next
    ``dev_fraction`` to ``"dev"``, the rest to ``"train"``; disjoint, every branch of a
    conversation on one side, and the same whatever ``limit`` is. Without ``test_fraction`` that
    is an error, never a silent reuse of the same rows. ``split=None`` reads every row of a local
    source.

    ``limit``: the number of rows to draw. ``order="shuffled"`` draws a seeded uniform sample over
    all rows of the split, whatever subset they are in (the Hub: ``datasets``' own shuffle and
    select); ``order="file"`` takes the first rows in file order.

    Returns ``(pairs, report)``: ``pairs`` a list of ``{"prompt", "chosen", "rejected"}`` dicts,
    ``report`` a :class:`PairReport` mapping ``kept`` and each skip reason to its count (adding up
    to the rows read), with the kept pairs per subset. With ``strict=True`` the first bad row
    raises :class:`PairError`.
    """
    report = PairReport(str(source) + (f" [{data_dir}]" if data_dir else "")
                        + (f" ({split})" if split else ""))
    rows, report.available = _rows(source, split, data_dir, limit, order, seed, test_fraction,
                                   report, dev_fraction)
    pairs = []
    for subset, number, row in rows:
        try:
            if isinstance(row, _InvalidLine):
                raise PairError("invalid_json", row.error)
            pair = parse_hh_row(row)
        except PairError as error:
            if strict:
                raise PairError(error.reason, f"row {number} of {subset} in {report.source}") \
                    from error
            report.add(error.reason, number, row)
            continue
        pairs.append(pair)
        report.add("kept", number, row, subset)
    return pairs, report


def load_split(cfg, split: str, limit: int | None = None):
    """:func:`load_preference_pairs` with a config's ``data`` settings (source, subset, order,
    seed, held-out fraction): what the trainer and the notebooks read. A config saved before
    ``data.order`` existed read its rows in file order, and still does."""
    data = cfg.data
    return load_preference_pairs(data.source, split=split, limit=limit,
                                 data_dir=data.data_dir, order=data.order,
                                 seed=data.seed, test_fraction=data.test_fraction,
                                 dev_fraction=data.dev_fraction)
