"""The schema of a run's config: every key, its type, its default, its allowed values and
what it does, as dataclasses (:class:`Settings`), and the checks a config passes when it loads.

A profile or recipe YAML states only what differs from these defaults (or from its ``base:``);
:func:`validate` refuses unknown keys, wrong types and values outside a key's set (``Literal``)
with a one-line :class:`~dpo_lib.core.errors.ConfigError` naming what is allowed;
:func:`check_values` refuses values a run cannot use (ranges, keys that need another).
``describe_keys()`` lists every key with its type, default and meaning.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal, Mapping, Optional, get_args, get_origin, get_type_hints

from .errors import ConfigError, UnknownKeyError

# A profile or recipe YAML states only what differs from these defaults (or from its ``base:``).
# The defaults are the tiny profile's: a config that runs anywhere in seconds.

def _key(default, meaning: str):
    return field(default=default, metadata={"meaning": meaning})


@dataclass
class ModelSettings:
    name: str = _key("tiny-gpt-neox", "tiny-gpt-neox, smollm2-135m-instruct, random:<arch> "
                     "(dpo_lib.core.models.ARCHITECTURES), a Hub id or a local folder")
    init_seed: int = _key(0, "the random weights of tiny-gpt-neox and random:<arch> models "
                          "(their own generator: the run's seed does not change them)")
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
    fused_lora: bool = _key(True, "training forwards add LoRA's products into the base layer's "
                            "output in one pass (dpo_lib.core.lora.fuse_lora_products; the same "
                            "numbers to float rounding); false: peft's forward")
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
    eval_split: Literal["test", "dev"] = _key("test", "the split the in-run evaluation reads: test, "
                                              "or dev (the slice choices are made on)")
    max_length: int = _key(128, "tokens of prompt + answer; longer pairs are truncated")
    max_prompt_length: int = _key(96, "tokens the prompt keeps (its end) when a pair is too long")
    pair_filter: Optional[Literal["ches", "random", "file"]] = _key(
        None, "preference stage: null | ches | random | file: drop training pairs first")
    pair_filter_share: float = _key(0.0, "ches and random: the share dropped; ches drops the "
                                    "highest CHES scores (dpo_lib.training.ches), random a "
                                    "seeded draw")
    pair_filter_file: Optional[str] = _key(
        None, "pair_filter=file: a JSON file naming the pool's indices to drop (a list, or an "
        "object with 'dropped', e.g. another run's pair_filter.json); a relative path is read "
        "from the working directory (in a sweep file: from the sweep file's folder)")


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
    group_length: Literal["row", "longer_side"] = _key(
        "row", "the length grouped batches sort on: row, the positions a pair (SFT: a sequence) "
        "takes in a row of the run's layout (packed: prompt + both answers); longer_side, the "
        "longer answer, as every run before 2026-12-05 grouped (the committed example runs)")
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
    """Every key of a run's config. ``describe_keys()`` lists them with meanings."""

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
            raise UnknownKeyError(unknown_key_message(dotted, default_settings()))
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


def flat_keys(data: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, Mapping):
            keys.extend(flat_keys(value, full + "."))
    return keys


def unknown_key_message(dotted: str, data: Mapping) -> str:
    known = flat_keys(data)
    close = difflib.get_close_matches(dotted, known, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"unknown config key {dotted!r}.{hint} Known keys: {', '.join(known)}"


def check_values(cfg) -> None:
    """Refuse values a key's type allows but the run cannot use (a range, or a key that needs
    another), when the config loads: long before a model loads or a reference pass runs."""
    model, data, train = cfg.model, cfg.data, cfg.train
    rules = [
        (train.beta > 0, f"train.beta must be positive; got {train.beta}"),
        (0 <= train.label_smoothing < 0.5,
         f"train.label_smoothing must be in [0, 0.5); got {train.label_smoothing}"),
        (train.label_smoothing == 0 or train.loss_type == "cdpo",
         f"train.label_smoothing={train.label_smoothing} is only used by loss_type=cdpo "
         f"(this config has {train.loss_type})"),
        (train.rpo_alpha >= 0, f"train.rpo_alpha must be >= 0; got {train.rpo_alpha}"),
        (0 <= data.pair_filter_share < 1,
         f"data.pair_filter_share must be in [0, 1); got {data.pair_filter_share}"),
        ((data.pair_filter == "file") == (data.pair_filter_file is not None),
         f"data.pair_filter_file ({data.pair_filter_file}) goes with data.pair_filter=file "
         f"(this config has {data.pair_filter}): set both or neither"),
        (data.pair_filter != "file" or data.pair_filter_share == 0,
         f"data.pair_filter=file drops the indices its file names: leave "
         f"data.pair_filter_share at 0 (got {data.pair_filter_share})"),
        (data.test_fraction is None or 0 < data.test_fraction < 1,
         f"data.test_fraction must be in (0, 1); got {data.test_fraction}"),
        (data.dev_fraction is None or (data.test_fraction is not None and 0 < data.dev_fraction
                                       and data.test_fraction + data.dev_fraction < 1),
         f"data.dev_fraction={data.dev_fraction} needs a test_fraction, and both together "
         f"below 1 (test_fraction={data.test_fraction})"),
        (0 < data.max_prompt_length < data.max_length,
         f"need 0 < data.max_prompt_length ({data.max_prompt_length}) < data.max_length "
         f"({data.max_length}): the answers need room after the prompt"),
        (min(train.batch_size, train.eval_batch_size, train.gradient_accumulation_steps) >= 1,
         "train.batch_size, eval_batch_size and gradient_accumulation_steps must be >= 1"),
        (model.lora_r >= 1, f"model.lora_r must be >= 1; got {model.lora_r}"),
        (0 <= model.lora_dropout < 1, f"model.lora_dropout must be in [0, 1); got "
                                      f"{model.lora_dropout}"),
        (not (train.resume and train.overwrite),
         "train.resume and train.overwrite cannot both be true: continue the run in output_dir, "
         "or delete it and start afresh"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
