"""The reference model's log-probs: one no-grad pass over every pair, cached on disk.

Preference runs compute the reference log-probs once, before training, and cache them under a key
of (reference model, data, tokenization, arithmetic): during training only the policy runs.
Summed log-probs and token counts are both cached (a :class:`~dpo_lib.core.logps.PairLogps` of ``[N]``
tensors), so a DPO run (sums) and an IPO run (token means) from the same SFT model share one pass.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..core.config import Config, mixed_precision
from ..core.logps import PairLogps
from ..core.models import cache_dir, compute_dtype
from ..core.lora import reference_mode
from ..core.scoring import score_pairs


def reference_cache_root() -> Path:
    """Where reference passes are cached: ``reference_logps/`` in
    :func:`dpo_lib.core.models.cache_dir`."""
    return cache_dir() / "reference_logps"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries whose kernels compute the log-probs (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def model_revision(model) -> str | None:
    """What identifies a loaded base model beyond its name: the Hub commit it came from, or for a
    local folder a digest of its ``config.json`` and its weight files' names and sizes; None for
    weights built from a config (their ``init_seed`` identifies them)."""
    config = getattr(getattr(model, "module", model), "config", None)
    commit = getattr(config, "_commit_hash", None)
    if commit:
        return str(commit)
    folder = Path(str(getattr(config, "name_or_path", "") or ""))
    if not str(folder) or not (folder / "config.json").is_file():
        return None
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for file in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def reference_cache_key(cfg: Config, examples, reference_adapter: Path | None,
                        revision: str | None = None) -> str:
    """Changes when the reference model, the data, the tokenization or the arithmetic changes.

    The model: name, ``revision`` (:func:`model_revision`), quantization, the compute dtype and
    mixed precision as resolved on this machine (``auto`` is bf16 on a GPU, fp32 on a CPU: log-probs
    computed under bf16 autocast are not served to an fp32 run), and the versions of torch,
    transformers, peft and bitsandbytes; the reference adapter's weights; every token id.
    """
    digest = hashlib.sha256()
    model = cfg.model
    identity = [model.name, revision, model.quantization, model.double_quant,
                str(compute_dtype(model.compute_dtype)), mixed_precision(cfg),
                model.init_seed if model.name.startswith(("tiny", "random")) else None,
                cfg.data.max_length, cfg.data.max_prompt_length, library_versions()]
    digest.update(json.dumps(identity).encode())
    if reference_adapter is not None:
        for file in sorted(reference_adapter.glob("adapter_model.*")):
            digest.update(_file_digest(file).encode())
    for example in examples:
        digest.update(np.asarray(example["chosen_input_ids"] + [-1] + example["rejected_input_ids"]
                                 + [-2] + example["chosen_labels"][:1], dtype=np.int64).tobytes())
    return digest.hexdigest()[:24]


def reference_pass(model, examples, layout, batch_size: int, accelerator=None,
                   cache_file: Path | None = None, use_adapter: bool = True,
                   progress: bool = True) -> PairLogps:
    """The reference model's log-probs of every pair (:func:`dpo_lib.core.scoring.score_pairs`),
    read from ``cache_file`` when it holds them, else computed and written there.

    Returns a :class:`~dpo_lib.core.logps.PairLogps` of fp32 ``[N]`` tensors (``chosen_sums``,
    ``rejected_sums``, ``chosen_counts``, ``rejected_counts``), in the order of ``examples``.
    ``use_adapter=False`` disables the LoRA adapters for the pass (the reference is then the base
    model, and no second copy of it is needed). ``layout``: the run's
    (:func:`dpo_lib.core.layouts.layout_for`); with an ``accelerator`` the pass runs on the
    prepared model under the same autocast as training.
    """
    if cache_file is not None and Path(cache_file).is_file():
        return PairLogps(**torch.load(cache_file))
    unwrapped = accelerator.unwrap_model(model) if accelerator else model
    reference = score_pairs(model, examples, layout, batch_size, accelerator,
                            context=None if use_adapter else reference_mode(unwrapped),
                            progress=progress, desc="reference pass")
    if cache_file is not None and (accelerator is None or accelerator.is_main_process):
        save_atomically(reference._asdict(), Path(cache_file))
    return reference


def save_atomically(obj, path: Path) -> None:
    """``torch.save`` into a temporary file beside ``path``, then renamed onto it: a reader (another
    process, another run) finds the complete file or none."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(obj, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def reference_rows(reference: PairLogps, indices) -> PairLogps:
    """The reference's summed log-probs and counts ``[B]`` of the pairs at ``indices`` (a batch's
    positions in the reference table); ``.logps(average)`` gives sums or token means."""
    return PairLogps(*(values[indices] for values in reference))
