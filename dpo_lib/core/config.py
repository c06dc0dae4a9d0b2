"""Profiles and run configs: one YAML file per recipe, single keys overridable.

A *profile* (``tiny``, ``cpu``, ``gpu``, and ``gpu-smoke`` for GPU CI) is a YAML file in
``configs/`` that fixes the model, the data source, the lengths, batch sizes, steps and
quantization. A recipe file may start from a profile with ``base: <profile or path>`` and change
only what differs.

The profile is chosen by, in order: the ``name`` argument, the ``DPO_PROFILE`` environment
variable, then ``auto`` (``gpu`` when CUDA is available, ``cpu`` otherwise). ``DPO_PROFILE`` may also
be the path of a YAML file.

>>> cfg = load_config("tiny", overrides={"data.max_length": 64, "data.max_prompt_length": 48})
>>> cfg.data.max_length
64
"""
from __future__ import annotations

import copy
import os

from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .errors import ConfigError, DeviceError, MissingFileError, UnknownKeyError
from .schema import (flat_keys, unknown_key_message, check_values, default_settings,
                     validate)

PROFILES = ("tiny", "cpu", "gpu", "gpu-smoke")
ENV_VAR = "DPO_PROFILE"
PACKAGE_DIR = Path(__file__).resolve().parent.parent     # dpo_lib/
REPO_ROOT = PACKAGE_DIR.parent
#: In a checkout (or an editable install) the profiles and the bundled data are read from the
#: repository's ``configs/`` and ``data/``; a wheel carries the same files inside the package
#: (pyproject.toml maps them to ``dpo_lib/configs`` and ``dpo_lib/data_files``), and runs and
#: figures then go under the current directory.
IN_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "configs").is_dir()
CONFIG_DIR = REPO_ROOT / "configs" if IN_CHECKOUT else PACKAGE_DIR / "configs"
DATA_DIR = REPO_ROOT / "data" if IN_CHECKOUT else PACKAGE_DIR / "data_files"
BUNDLED_DIR = DATA_DIR / "bundled"              # the project's preference set (dpo_lib.lessons.bundled)
TINY_TOKENIZER_DIR = DATA_DIR / "tiny-tokenizer"  # the tiny profile's byte-level tokenizer
_WORK_DIR = REPO_ROOT if IN_CHECKOUT else Path.cwd()
# Notebooks save figures/NN_<name>.png here; under pytest the root conftest.py points it to a
# temporary folder, so that tests never touch the committed (cpu profile) figures. Importing this
# module creates no folder: whoever saves a figure creates its folder.
FIGURES_DIR = Path(os.environ.get("DPO_FIGURES_DIR", _WORK_DIR / "figures")).resolve()
RUNS_DIR = _WORK_DIR / "runs"        # run outputs (ignored by git)


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
                raise UnknownKeyError(unknown_key_message(dotted, self._data))
            node = node[part]
        return Config(node) if isinstance(node, Mapping) else node

    def with_overrides(self, overrides: Mapping[str, Any] | Iterable[str] | None) -> "Config":
        """Copy with dotted keys replaced. ``overrides`` is a mapping ``{"data.max_length": 64}``
        or CLI-style strings ``["data.max_length=64"]`` (values parsed as YAML scalars). A key
        without a dot that names exactly one leaf may stand alone (``output_dir=runs/x``)."""
        data = self.to_dict()
        for dotted, value in _normalise_overrides(overrides).items():
            if "." not in dotted and dotted not in data:  # a unique leaf name: output_dir=...
                matches = [key for key in flat_keys(data) if key.endswith("." + dotted)]
                if len(matches) == 1:
                    dotted = matches[0]
            parts = dotted.split(".")
            node = data
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise UnknownKeyError(unknown_key_message(dotted, data))
                node = node[part]
            if parts[-1] not in node:
                raise UnknownKeyError(unknown_key_message(dotted, data))
            node[parts[-1]] = value
        result = Config(data)
        if "train" in data and "data" in data and "model" in data:   # a whole run config
            validate(data)
            check_values(result)
        return result

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self._data, sort_keys=False))
        return path


def _normalise_overrides(overrides) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    result = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
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
    raise ConfigError(
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
        raise MissingFileError(f"config file {path} not found")
    if str(path.resolve()) in seen:
        raise ConfigError(f"config inheritance loops through {path}")
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = base if not Path(base).suffix else str((path.parent / base).resolve())
    return _deep_merge(_read_yaml(base_path, seen + (str(path.resolve()),)), data)


def load_config(name: str | None = None, overrides=None) -> Config:
    """Read a profile or recipe file (see :func:`resolve_profile`) over the schema's defaults
    (:class:`Settings`) and apply dotted overrides; unknown keys and wrongly typed values raise."""
    data = _read_yaml(resolve_profile(name))
    validate(data)
    cfg = Config(_deep_merge(default_settings(), data)).with_overrides(overrides)
    validate(cfg.to_dict())
    check_values(cfg)
    return cfg


def require_device(cfg: Config, what: str = "this") -> None:
    """Fail fast, before any download or training, where the config needs CUDA and there is none.

    A config says so with ``requires_cuda: true`` (the ``gpu`` and ``gpu-smoke`` profiles): their
    4-bit CUDA kernels, 16-bit mixed precision and paged optimizer have no CPU counterpart. Reading
    such a config (e.g. a GPU run's saved ``config.yaml`` on a laptop) stays possible.
    """
    import torch

    if cfg.requires_cuda and not torch.cuda.is_available():
        raise DeviceError(
            f"profile {cfg.get('profile', '?')!r} needs a CUDA GPU for {what}, and torch sees none "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). Without a GPU use "
            f"DPO_PROFILE=cpu (a real model, 4-bit on the CPU) or DPO_PROFILE=tiny; with one, "
            f"install a CUDA build of torch (README: GPU users).")


def mixed_precision(cfg: Config) -> str:
    """``train.mixed_precision`` resolved for this machine: ``auto`` is bf16 on GPUs that support
    it, fp16 on older GPUs, ``no`` on CPU."""
    import torch

    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "no"
        if torch.cuda.is_available():
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def describe(cfg: Config) -> str:
    """One paragraph that a notebook prints at its top: profile, model, data, device."""
    import torch

    device = (f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available()
              else f"cpu ({os.cpu_count()} cores)")
    quant = cfg.model.quantization + (" + double quant" if cfg.model.double_quant else "")
    data = cfg.data.source + (f" [{cfg.data.data_dir}]" if cfg.data.data_dir else "")
    return (f"profile: {cfg.profile}\n"
            f"model:   {cfg.model.name} ({quant})\n"
            f"data:    {data}, max length {cfg.data.max_length} "
            f"(prompt {cfg.data.max_prompt_length})\n"
            f"device:  {device}")
