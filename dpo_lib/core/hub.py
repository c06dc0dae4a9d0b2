"""The Hugging Face Hub as a data source, and the real hh-rlhf files.

:func:`hh_rlhf_file` finds one real hh-rlhf file (in ``$DPO_HH_RLHF_DIR``, else downloaded once
into the Hugging Face cache); :func:`hub_rows` reads a Hub dataset's split (hh-rlhf subset by
subset); :func:`check_hub_reachable` fails at once, with one clear message, where the Hub cannot be
reached. :mod:`dpo_lib.core.data` reads every source through these.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from .errors import MissingFileError, UserError


class HubUnavailableError(UserError, ConnectionError):
    """The Hugging Face Hub cannot be reached (offline, or no network)."""


HH_RLHF_REPO = "Anthropic/hh-rlhf"
#: The subsets of hh-rlhf with ``{train,test}.jsonl.gz`` files in the chosen/rejected format.
HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
#: The environment variable naming a folder with real hh-rlhf files (CI sets it).
HH_RLHF_DIR_VAR = "DPO_HH_RLHF_DIR"


def local_alternatives() -> str:
    return ("Use a local source instead: source='bundled' (the project's own sample in data/), "
            "or the path of an hh-rlhf .jsonl/.jsonl.gz file or folder (set "
            f"${HH_RLHF_DIR_VAR} to a folder of hh-rlhf files to make them the notebooks' "
            "real data). On a machine with network, the files are at "
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


def hh_rlhf_file(name: str = "harmless-base/test.jsonl.gz", download: bool = True) -> Path:
    """One real hh-rlhf file, ``<subset>/<split>.jsonl.gz`` as laid out on the Hub.

    Looked up in the folder ``$DPO_HH_RLHF_DIR`` (as ``name``, or flat as
    ``harmless-base-test.jsonl.gz``); without that setting, and with ``download``, fetched once
    through ``huggingface_hub`` into the Hugging Face cache (the harmless-base test file is
    about 0.7 MB). Raises ``FileNotFoundError`` (the setting names no such file) or
    :class:`HubUnavailableError` (no setting, and the Hub cannot be reached).
    """
    folder = os.environ.get(HH_RLHF_DIR_VAR)
    flat = name.replace("/", "-")
    if folder:
        for candidate in (Path(folder).expanduser() / name, Path(folder).expanduser() / flat):
            if candidate.is_file():
                return candidate
        raise MissingFileError(f"${HH_RLHF_DIR_VAR}={folder} holds neither {name} nor {flat}")
    if not download:
        raise MissingFileError(f"${HH_RLHF_DIR_VAR} is not set and download=False")
    check_hub_reachable(f"{HH_RLHF_REPO}/{name}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(HH_RLHF_REPO, name, repo_type="dataset"))
    except Exception as error:  # offline mode without the file cached, HTTP errors
        raise HubUnavailableError(f"cannot download {HH_RLHF_REPO}/{name}: {error}") from error


def real_hh_source(name: str = "harmless-base/test.jsonl.gz") -> tuple[str, str]:
    """``(source, how)`` for a notebook that wants real hh-rlhf rows: the file from
    :func:`hh_rlhf_file` when it can be had, else ``"bundled"``; ``how`` says which, and why."""
    try:
        path = hh_rlhf_file(name)
    except (FileNotFoundError, HubUnavailableError) as error:
        return "bundled", (f"real hh-rlhf unavailable ({error}); falling back to the bundled "
                           "synthetic set, which has none of real data's traps")
    where = f"${HH_RLHF_DIR_VAR}" if os.environ.get(HH_RLHF_DIR_VAR) else "the Hugging Face cache"
    return str(path), f"real hh-rlhf: {name} from {where}"


def _load_hub_subset(repo_id: str, subset: str | None, split: str):
    """One subset (``data_dir``) of a Hub dataset as a ``datasets.Dataset``."""
    from datasets import load_dataset

    return load_dataset(repo_id, data_dir=subset, split=split)


def hub_rows(repo_id: str, split: str, data_dir: str | None, limit: int | None, order: str,
              seed: int) -> tuple[list[tuple[str, int, object]], int]:
    """``([(subset, row number, row)], rows available)`` of a Hub dataset's split.

    Without ``data_dir``, hh-rlhf is read subset by subset (:data:`HH_SUBSETS`) and the parts
    concatenated with a ``subset`` column; ``limit`` then takes ``datasets``' own seeded
    ``shuffle(seed).select(range(limit))`` over all of them (``order="file"``: the first rows).
    """
    repo_id = repo_id.removeprefix("hf://")
    subsets = [data_dir] if data_dir else \
        list(HH_SUBSETS) if repo_id == HH_RLHF_REPO else [None]
    try:
        check_hub_reachable(f"the dataset {repo_id!r}")
        from datasets import concatenate_datasets

        parts = []
        for subset in subsets:
            part = _load_hub_subset(repo_id, subset, split)
            parts.append(part.add_column("subset", [subset or repo_id] * len(part)))
        dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    except Exception as error:  # offline, not cached, DNS, HTTP: one clear message
        raise HubUnavailableError(
            f"cannot load dataset {repo_id!r} (data_dir={data_dir!r}, split={split!r}) from the "
            f"Hub: {error}\n{local_alternatives()}") from error
    available = len(dataset)
    dataset = dataset.add_column("row_number", list(range(available)))
    if limit is not None and limit < available:
        if order == "shuffled":
            dataset = dataset.shuffle(seed=seed)
        dataset = dataset.select(range(limit))
    rows = [(row.pop("subset"), row.pop("row_number"), row) for row in dataset]
    return rows, available
