"""Profiles and run configs: one YAML file per recipe, single keys overridable.

A *profile* (``tiny``, ``cpu``, ``gpu``, and ``gpu-smoke`` for GPU CI) is a YAML file in
``configs/`` that fixes the model, the data source, the lengths, batch sizes, steps and
quantization. A recipe file may start from a profile with ``base: <profile or path>`` and change
only what differs.

The profile is chosen by, in order: the ``name`` argument, the ``DPO_PROFILE`` environment
variable, then ``auto`` (``gpu`` when CUDA is available, ``cpu`` otherwise). ``DPO_PROFILE`` may also
be the path of a YAML file.

>>> cfg = load_config("tiny", overrides={"data.max_length": 64})
>>> cfg.data.max_length
64
"""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

PROFILES = ("tiny", "cpu", "gpu", "gpu-smoke")
ENV_VAR = "DPO_PROFILE"
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
# Notebooks save figures/NN_<name>.png here; under pytest the root conftest.py points it to a
# temporary folder, so that tests never touch the committed (cpu profile) figures. Importing this
# module creates no folder: whoever saves a figure creates its folder.
FIGURES_DIR = Path(os.environ.get("DPO_FIGURES_DIR", REPO_ROOT / "figures")).resolve()
RUNS_DIR = REPO_ROOT / "runs"        # run outputs (ignored by git)


class Config(Mapping):
    """A nested mapping read from YAML, with attribute access (``cfg.model.name``).

    ``cfg.get_path("data.max_length")`` reads a dotted key; ``cfg.with_overrides({...})`` returns a
    copy with some keys replaced, refusing keys that the config does not have.
    """

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key):
        value = self._data[key]
        return Config(value) if isinstance(value, Mapping) else value

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(
                f"config has no key {key!r}; it has: {', '.join(self._data)}") from None

    def __setattr__(self, key, value):
        raise AttributeError("Config is read-only; use with_overrides({'a.b': value})")

    def __repr__(self):
        return f"Config({self._data!r})"

    def to_dict(self) -> dict:
        return copy.deepcopy(self._data)

    def get_path(self, dotted: str) -> Any:
        node: Any = self._data
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise KeyError(_unknown_key_message(dotted, self._data))
            node = node[part]
        return Config(node) if isinstance(node, Mapping) else node

    def with_overrides(self, overrides: Mapping[str, Any] | Iterable[str] | None) -> "Config":
        """Copy with dotted keys replaced. ``overrides`` is a mapping ``{"data.max_length": 64}``
        or CLI-style strings ``["data.max_length=64"]`` (values parsed as YAML scalars). A key
        without a dot that names exactly one leaf may stand alone (``output_dir=runs/x``)."""
        data = self.to_dict()
        for dotted, value in _normalise_overrides(overrides).items():
            if "." not in dotted and dotted not in data:  # a unique leaf name: output_dir=...
                matches = [key for key in _flat_keys(data) if key.endswith("." + dotted)]
                if len(matches) == 1:
                    dotted = matches[0]
            parts = dotted.split(".")
            node = data
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise KeyError(_unknown_key_message(dotted, data))
                node = node[part]
            if parts[-1] not in node:
                raise KeyError(_unknown_key_message(dotted, data))
            node[parts[-1]] = value
        return Config(data)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self._data, sort_keys=False))
        return path


def _flat_keys(data: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, Mapping):
            keys.extend(_flat_keys(value, full + "."))
    return keys


def _unknown_key_message(dotted: str, data: Mapping) -> str:
    known = _flat_keys(data)
    close = difflib.get_close_matches(dotted, known, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown config key {dotted!r}.{hint} Known keys: {', '.join(known)}"


def _normalise_overrides(overrides) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    result = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        result[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return result


def _deep_merge(base: dict, update: Mapping) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_profile(name: str | None = None) -> str:
    """The profile name or YAML path to use: ``name``, else ``$DPO_PROFILE``, else ``auto``.

    ``auto`` becomes ``gpu`` when CUDA is available and ``cpu`` otherwise. An unknown name raises
    ``ValueError`` listing the valid ones.
    """
    chosen = (name or os.environ.get(ENV_VAR) or "auto").strip()
    if chosen == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    if chosen in available_profiles():
        return chosen
    if chosen.endswith((".yaml", ".yml")) and Path(chosen).is_file():
        return chosen
    source = "argument" if name else f"${ENV_VAR}"
    raise ValueError(
        f"unknown profile {chosen!r} (from the {source}). Valid profiles: "
        f"{', '.join(available_profiles())}, auto (gpu with CUDA, cpu otherwise), "
        f"or the path of a YAML config file.")


def available_profiles() -> list[str]:
    """Profile names: the built-in ones plus any other YAML in ``configs/`` that names a profile."""
    extra = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem not in PROFILES
                   and "profile" in (yaml.safe_load(p.read_text()) or {}))
    return list(PROFILES) + extra


def _read_yaml(name_or_path: str, seen: tuple = ()) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    if str(path.resolve()) in seen:
        raise ValueError(f"config inheritance loops through {path}")
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = base if not Path(base).suffix else str((path.parent / base).resolve())
    return _deep_merge(_read_yaml(base_path, seen + (str(path.resolve()),)), data)


def load_config(name: str | None = None, overrides=None) -> Config:
    """Read a profile or recipe file (see :func:`resolve_profile`) and apply dotted overrides."""
    return Config(_read_yaml(resolve_profile(name))).with_overrides(overrides)


def require_device(cfg: Config, what: str = "this") -> None:
    """Fail fast, before any download or training, where the config needs CUDA and there is none.

    A config says so with ``requires_cuda: true`` (the ``gpu`` and ``gpu-smoke`` profiles): their
    4-bit CUDA kernels, 16-bit mixed precision and paged optimizer have no CPU counterpart. Reading
    such a config (e.g. a GPU run's saved ``config.yaml`` on a laptop) stays possible.
    """
    import torch

    if cfg.get("requires_cuda", False) and not torch.cuda.is_available():
        raise RuntimeError(
            f"profile {cfg.get('profile', '?')!r} needs a CUDA GPU for {what}, and torch sees none "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). Without a GPU use "
            f"DPO_PROFILE=cpu (a real model, 4-bit on the CPU) or DPO_PROFILE=tiny; with one, "
            f"install a CUDA build of torch (README: GPU users).")


def describe(cfg: Config) -> str:
    """One paragraph that a notebook prints at its top: profile, model, data, device."""
    import torch

    device = (f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available()
              else f"cpu ({os.cpu_count()} cores)")
    quant = cfg.model.quantization + (" + double quant" if cfg.model.get("double_quant") else "")
    data = cfg.data.source + (f" [{cfg.data.data_dir}]" if cfg.data.get("data_dir") else "")
    return (f"profile: {cfg.profile}\n"
            f"model:   {cfg.model.name} ({quant})\n"
            f"data:    {data}, max length {cfg.data.max_length} "
            f"(prompt {cfg.data.max_prompt_length})\n"
            f"device:  {device}")
