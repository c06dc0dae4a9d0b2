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
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, get_args, get_origin, get_type_hints

import yaml

from .errors import ConfigError, DeviceError, MissingFileError, UnknownKeyError

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


# --------------------------------------------------------------------------------------------
# The schema: every key, its type, its default and what it does
# --------------------------------------------------------------------------------------------
# A profile or recipe YAML states only what differs from these defaults (or from its ``base:``).
# The defaults are the tiny profile's: a config that runs anywhere in seconds.

def _key(default, meaning: str):
    return field(default=default, metadata={"meaning": meaning})


@dataclass
class ModelSettings:
    name: str = _key("tiny-gpt-neox", "tiny-gpt-neox, smollm2-135m-instruct, random:<arch> "
                     "(dpo_lib.core.models.ARCHITECTURES), a Hub id or a local folder")
    init_seed: int = _key(0, "the random weights of tiny-gpt-neox and random:<arch> models "
                          "(the run's seed only changes the data order)")
    quantization: Literal["none", "nf4", "fp4", "int8", "bf16", "fp16", "fp32"] = _key(
        "none", "none (the compute dtype) | nf4 | fp4 | int8 | bf16 | fp16 | fp32")
    double_quant: bool = _key(False, "nf4/fp4: quantize the quantization constants too")
    quant_storage: Optional[str] = _key(None, "dtype the packed 4-bit weights are stored in; "
                                        "bfloat16 for FSDP (configs/accelerate/fsdp_qlora.yaml)")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _key(
        "auto", "auto: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU")
    lora_r: int = _key(8, "LoRA rank")
    lora_alpha: int = _key(16, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = _key(0.0, "dropout on the LoRA input")
    gradient_checkpointing: bool = _key(False, "recompute activations in backward (less memory)")
    lora_target_modules: Optional[list] = _key(None, "null: every linear layer of the blocks; "
                                               "or a list of module names")
    trust_remote_code: bool = _key(False, "run the model's own code from the Hub (auto_map); "
                                   "true only for code you have read")
    hub_kernels: bool = _key(False, "let transformers replace layers with kernels downloaded "
                             "from the Hub at load (its `kernels` integration); false: the "
                             "installed code only, no download, works offline")


@dataclass
class DataSettings:
    source: str = _key("bundled", "bundled | a .jsonl/.jsonl.gz file or folder | "
                       "hh-rlhf:<subset>/<split>.jsonl.gz | a Hub dataset id (Anthropic/hh-rlhf)")
    data_dir: Optional[str] = _key(None, "a subset of a Hub dataset or folder (e.g. harmless-base); "
                                   "null: all")
    order: Literal["file", "shuffled"] = _key(
        "file", "file: the first rows (the bundled set is written in random order); "
        "shuffled: a seeded sample over all rows")
    seed: int = _key(0, "the data sample and the held-out slice (apart from the run's seed)")
    test_fraction: Optional[float] = _key(None, "a source without a test split: this share of "
                                          "conversations held out for 'test' (e.g. 0.15)")
    dev_fraction: Optional[float] = _key(None, "and this share of the rest's conversations for "
                                         "'dev' (the slice choices are made on)")
    train_limit: Optional[int] = _key(256, "training pairs read (null: all)")
    test_limit: Optional[int] = _key(64, "held-out pairs read for the in-run evaluation (null: all)")
    max_length: int = _key(128, "tokens of prompt + answer; longer pairs are truncated")
    max_prompt_length: int = _key(96, "tokens the prompt keeps (its end) when a pair is too long")
    pair_filter: Optional[Literal["ches", "random"]] = _key(
        None, "preference stage: null | ches | random: drop a share of the training pairs first")
    pair_filter_share: float = _key(0.0, "that share: ches drops the highest CHES scores "
                                    "(dpo_lib.training.ches), random a seeded draw")


@dataclass
class TrainSettings:
    stage: Literal["sft", "preference"] = _key("sft", "sft | preference")
    loss_type: Literal["dpo", "cdpo", "ipo", "rpo", "simpo"] = _key(
        "dpo", "the preference loss (dpo_lib.core.losses)")
    beta: float = _key(0.1, "DPO's beta; IPO's tau")
    label_smoothing: float = _key(0.0, "cdpo's eps")
    rpo_alpha: float = _key(1.0, "rpo: weight of the chosen answer's per-token NLL added to DPO")
    simpo_gamma: float = _key(0.5, "simpo: target margin of the token-mean rewards "
                              "(beta x mean log-prob)")
    average_logps: Optional[bool] = _key(None, "null: the loss's default (summed for dpo/cdpo/rpo, "
                                         "token mean for ipo/simpo)")
    init_adapter: Optional[str] = _key(None, "preference stage: an SFT run's folder; its adapter "
                                       "is the start and the reference (null: the base model)")
    batch_size: int = _key(8, "pairs (or SFT examples) per micro-batch")
    eval_batch_size: int = _key(16, "pairs per batch of the no-grad passes (reference, evaluation)")
    gradient_accumulation_steps: int = _key(1, "micro-batches per optimizer step and process")
    sft_steps: int = _key(20, "optimizer steps of the SFT stage")
    preference_steps: int = _key(20, "optimizer steps of the preference stage")
    learning_rate: float = _key(1.0e-3, "peak learning rate")
    preference_learning_rate: Optional[float] = _key(None, "the preference stage's peak learning "
                                                     "rate (null: learning_rate)")
    lr_scheduler: Literal["cosine", "linear", "constant"] = _key("cosine", "after warmup")
    warmup_steps: int = _key(2, "linear warm-up steps")
    max_grad_norm: float = _key(1.0, "gradient clipping norm")
    weight_decay: float = _key(0.0, "AdamW weight decay")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = _key(
        "adamw", "the 8-bit ones (bitsandbytes) need CUDA")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _key(
        "auto", "auto: bf16, or fp16 on GPUs without bf16; no on CPU")
    group_by_length: bool = _key(True, "batches of similar lengths (less padding), order still random")
    shared_prompt: bool = _key(False, "chosen and rejected packed behind one copy of the prompt "
                               "(dpo_lib.core.layouts.PackedLayout)")
    chunked_head: bool = _key(False, "the output layer only at answer positions, in chunks "
                              "(no [B, L, V] logits; dpo_lib.core.logps.head_logps)")
    eval_every: int = _key(10, "evaluate on the held-out pairs every this many steps (0: never)")
    save_every: int = _key(10, "write checkpoint-<step>/ every this many steps (0: never)")
    output_dir: Optional[str] = _key(None, "null: runs/<profile>-<stage>[-<loss_type>]")
    resume: bool = _key(False, "continue this output_dir's run from its newest checkpoint")
    overwrite: bool = _key(False, "start afresh in an output_dir that holds another run, "
                           "deleting that run's files first")
    wandb: Literal["disabled", "offline", "online"] = _key("disabled", "Weights & Biases logging")
    wandb_project: str = _key("dpo-quant", "the wandb project")


@dataclass
class Settings:
    """Every key of a run's config. ``dpo_lib.core.config.describe_keys()`` lists them with meanings."""

    profile: str = _key("tiny", "the profile's name (runs/<profile>-... and notebook titles)")
    requires_cuda: bool = _key(False, "fail fast where torch sees no CUDA GPU (4-bit CUDA kernels, "
                               "16-bit mixed precision, paged optimizers)")
    seed: int = _key(0, "the run's seed: data order, dropout, LoRA initialisation")
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)


def default_settings() -> dict:
    """The schema's defaults as a nested dict (what a YAML file adds to or overrides)."""
    return asdict(Settings())


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """``(dotted key, type, default, meaning)`` for every key of the schema."""
    rows = []

    def walk(cls, prefix=""):
        hints = get_type_hints(cls)
        for item in fields(cls):
            if is_dataclass(hints[item.name]):
                walk(hints[item.name], f"{prefix}{item.name}.")
            else:
                default = item.default
                rows.append((prefix + item.name, _type_name(hints[item.name]), default,
                             item.metadata.get("meaning", "")))
    walk(Settings)
    return rows


def _choices(annotation) -> tuple | None:
    """The allowed values of a ``Literal[...]`` (or ``Optional[Literal[...]]``) key, else None."""
    for candidate in (annotation, *get_args(annotation)):
        if get_origin(candidate) is Literal:
            return get_args(candidate)
    return None


def _type_name(annotation) -> str:
    choices = _choices(annotation)
    optional = type(None) in get_args(annotation)
    if choices is not None:
        return " | ".join(map(str, choices)) + (" | null" if optional else "")
    args = [a for a in get_args(annotation) if a is not type(None)]
    if args:
        return f"{args[0].__name__} or null"
    return annotation.__name__


def choices(dotted: str) -> tuple | None:
    """The allowed values of a key that has a fixed set (``train.loss_type``, ...), else None."""
    cls = Settings
    *parents, leaf = dotted.split(".")
    for part in parents:
        cls = get_type_hints(cls)[part]
    return _choices(get_type_hints(cls)[leaf])


def validate(data: Mapping, cls=Settings, prefix: str = "") -> None:
    """Refuse keys the schema does not have, values of the wrong type and values outside a key's
    allowed set, each with a one-line :class:`~dpo_lib.core.errors.ConfigError` that says what
    is allowed."""
    hints = get_type_hints(cls)
    for key, value in data.items():
        dotted = prefix + key
        if key not in hints:
            raise UnknownKeyError(_unknown_key_message(dotted, default_settings()))
        expected = hints[key]
        if is_dataclass(expected):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {dotted!r} must be a mapping of keys, not {value!r}")
            validate(value, expected, dotted + ".")
            continue
        if value is None and type(None) in get_args(expected):
            continue
        allowed_values = _choices(expected)
        if allowed_values is not None:
            if value not in allowed_values or isinstance(value, bool):
                close = difflib.get_close_matches(str(value), list(map(str, allowed_values)), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"config key {dotted!r} must be one of "
                                  f"{', '.join(map(str, allowed_values))}"
                                  f"{', or null' if type(None) in get_args(expected) else ''}; "
                                  f"got {value!r}{hint}")
            continue
        allowed = [a for a in get_args(expected) if a is not type(None)] or [expected]
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            continue
        if bool not in allowed and isinstance(value, bool) or \
                not isinstance(value, tuple(allowed)):
            raise ConfigError(f"config key {dotted!r} must be {_type_name(expected)}; got {value!r}")


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
                raise UnknownKeyError(_unknown_key_message(dotted, self._data))
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
                    raise UnknownKeyError(_unknown_key_message(dotted, data))
                node = node[part]
            if parts[-1] not in node:
                raise UnknownKeyError(_unknown_key_message(dotted, data))
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
