"""Deployment files from a training run: merged checkpoint, GGUF, quantized GGUFs.

``dpo-export RUN_DIR --quant q8_0,q4_k_m`` runs the three steps:

1. :func:`merge_adapter`: the run's base model loaded afresh in its profile's quantization,
   dequantized (for QLoRA: the NF4 weights the adapter was trained against, not the original
   full-precision ones), the LoRA adapter merged in, saved as a transformers checkpoint with its
   tokenizer and a chat template.
2. :func:`convert_to_gguf`: llama.cpp's own ``convert_hf_to_gguf.py``, at the version of the
   installed llama-cpp-python runtime (:func:`converter_dir` takes it from that version's source
   distribution, which vendors the converter and its ``gguf-py``; :mod:`dpo_lib.deploy.llama_runtime`).
3. :func:`quantize_gguf`: Q8_0, Q4_K_M and the other types of :data:`GGUF_TYPES` through
   ``llama_cpp.llama_model_quantize``.

Files go to ``RUN_DIR/export/`` unless ``--out`` says otherwise: ``merged/`` (the checkpoint),
``model-f16.gguf``, ``model-q8_0.gguf``, ... and ``export.json`` (what was made from what).
:mod:`dpo_lib.deploy.gguf_check` verifies the results; :mod:`dpo_lib.deploy.chat` and :mod:`dpo_lib.deploy.app` talk
to them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..core.cli import command
from ..core.config import REPO_ROOT, Config
from ..core.errors import ConfigError
from .llama_runtime import (ConverterVersionError, ExportError, UnsupportedArchitectureError,
                            captured_llama_log, converter_dir, cpu_threads, fetch_converter,
                            gguf_metadata, runtime_version)
from ..core.models import cache_dir, load_model, load_tokenizer, uses_tiny_tokenizer
from ..core.lora import is_quantized
from ..core.runs import load_run_config, reference_run, run_adapter

#: GGUF file types this module makes: ``f16`` and ``f32`` by the converter, the rest by
#: quantizing the f16 file (the names are llama.cpp's ``LLAMA_FTYPE_MOSTLY_*``).
GGUF_TYPES = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_k_s", "q4_0",
              "q3_k_m", "q2_k")

#: The hh-rlhf dialogue format that every profile trains on ("\\n\\nHuman: ...\\n\\nAssistant:"),
#: as a chat template, so that chatting with an exported model uses the format its preference
#: training saw.
HH_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '\\n\\nHuman: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n\\nAssistant: ' + message['content'] }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}")

#: llama.cpp's pre-tokenizer for the project's own tokenizer (tiny and random-weight models),
#: which its converter's table of known tokenizers cannot list: it splits text as GPT-2 does.
TINY_TOKENIZER_PRE = "gpt-2"

# --------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------

def _assert_standard_4bit_layout(model) -> None:
    """Refuse 4-bit layers that bitsandbytes has repacked for CPU inference: dequantizing those
    gives weights with bf16-rounded scales, not the ones the adapter was trained against."""
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            raise ExportError(f"{name}: bitsandbytes repacked this 4-bit layer on a forward pass; "
                              f"merge into a freshly loaded model (merge_adapter loads its own)")


def on_this_machine(cfg: Config) -> Config:
    """A run's config for loading its base model here: a GPU run (``requires_cuda: true``) loads
    on a CPU-only machine too, since dequantizing its NF4 weights there gives bit-identical values
    (bitsandbytes' CPU and CUDA kernels use the same code book and absmax scales)."""
    if cfg.requires_cuda:
        return cfg.with_overrides({"requires_cuda": False})
    return cfg


def base_weights(cfg: Config, target: str = "quantized"):
    """The full-precision base model to merge an adapter into, on the CPU in float32.

    ``target="quantized"``: the base as the run trained on it, loaded afresh (no forward pass yet,
    so bitsandbytes has not repacked it) and, when 4- or 8-bit, dequantized by transformers;
    ``"original"``: the full-precision weights before quantization (to show the difference).
    """
    if target not in ("quantized", "original"):
        raise ConfigError(f"merge target {target!r}: 'quantized' or 'original'")
    model = load_model(on_this_machine(cfg), quantization=None if target == "quantized" else "fp32")
    if is_quantized(model):
        _assert_standard_4bit_layout(model)
        model = model.dequantize()
    return model.to(device="cpu", dtype=torch.float32).eval()


def merge_adapter(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  target: str = "quantized", chat_template: str = "training",
                  dtype: torch.dtype = torch.float32) -> Path:
    """Merge a run's adapter into its base and save a transformers checkpoint in ``out_dir``.

    ``target``: see :func:`base_weights`. ``chat_template``: ``"training"`` (the hh-rlhf dialogue
    format the run trained on, :data:`HH_CHAT_TEMPLATE`) or ``"model"`` (the base tokenizer's own,
    e.g. SmolLM2's ChatML; the hh format where it has none). Returns ``out_dir``.
    """
    from peft import PeftModel

    if chat_template not in ("training", "model"):
        raise ConfigError(f"chat_template {chat_template!r}: 'training' or 'model'")
    cfg = load_run_config(run_dir)
    adapter = run_adapter(run_dir)
    model = PeftModel.from_pretrained(base_weights(cfg, target), adapter).merge_and_unload()
    out_dir = Path(out_dir)
    model.to(dtype).save_pretrained(out_dir)
    tokenizer = load_tokenizer(cfg)
    if chat_template == "training" or not tokenizer.chat_template:
        tokenizer.chat_template = HH_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    import transformers

    (out_dir / "merge.json").write_text(json.dumps({
        "run_dir": str(Path(run_dir).resolve()), "adapter": str(adapter.resolve()),
        "base_model": cfg.model.name, "quantization": cfg.model.quantization,
        "merge_target": target, "chat_template": chat_template,
        "transformers_version": transformers.__version__}, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------
# Convert and quantize
# --------------------------------------------------------------------------------------------

def _check_transformers_major(hf_dir: Path) -> dict:
    import transformers

    config = json.loads((hf_dir / "config.json").read_text())
    saved = str(config.get("transformers_version", transformers.__version__))
    if saved.split(".")[0] != transformers.__version__.split(".")[0]:
        raise ConverterVersionError(
            f"{hf_dir} was saved by transformers {saved}, the converter would read it with "
            f"{transformers.__version__}: config keys moved between major versions (GPT-NeoX's "
            f"rotary_pct became rope_parameters.partial_rotary_factor in 5) and an older reader "
            f"falls back to defaults without a word. Convert with transformers {saved.split('.')[0]}.x.")
    return config


def expected_gguf_hparams(config: dict) -> dict[str, int]:
    """What the GGUF header must say for a transformers ``config.json`` (checked after converting)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", config.get("rotary_pct",
                                                           config.get("partial_rotary_factor", 1.0)))
    return {"embedding_length": config["hidden_size"], "block_count": config["num_hidden_layers"],
            "attention.head_count": heads, "rope.dimension_count": int(factor * head_dim)}


def check_gguf_hparams(gguf_path: Path, config: dict) -> None:
    """Raise ExportError where the GGUF header disagrees with the checkpoint's config."""
    meta = gguf_metadata(gguf_path)
    arch = meta["general.architecture"]
    wrong = {key: (meta.get(f"{arch}.{key}"), value)
             for key, value in expected_gguf_hparams(config).items()
             if meta.get(f"{arch}.{key}", value) != value}
    if wrong:
        raise ExportError(f"{gguf_path} disagrees with its checkpoint (GGUF, expected): {wrong}")


def convert_to_gguf(hf_dir: str | os.PathLike, out_file: str | os.PathLike,
                    outtype: str = "f16", pre_tokenizer: str | None = None) -> Path:
    """Convert a transformers checkpoint to GGUF with llama.cpp's converter (in a subprocess).

    ``outtype``: ``f16`` (default), ``f32``, ``bf16`` or ``q8_0``. ``pre_tokenizer``: the llama.cpp
    pre-tokenizer for a tokenizer the converter does not recognise (see
    :mod:`dpo_lib.deploy._gguf_converter`). The header is checked against the config afterwards.
    """
    hf_dir, out_file = Path(hf_dir), Path(out_file)
    config = _check_transformers_major(hf_dir)
    converter = converter_dir()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "dpo_lib.deploy._gguf_converter", str(converter),
               pre_tokenizer or "-", str(hf_dir), "--outfile", str(out_file), "--outtype", outtype]
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    if result.returncode != 0:
        log = result.stderr.strip()
        if "is not supported" in log:
            arch = (config.get("architectures") or ["?"])[0]
            raise UnsupportedArchitectureError(
                f"llama.cpp's converter (llama-cpp-python {converter.name}) does not support "
                f"{arch}; see `python {converter}/convert_hf_to_gguf.py --print-supported-models`.")
        raise ExportError(f"the GGUF converter failed on {hf_dir}:\n{log[-2000:]}")
    check_gguf_hparams(out_file, config)
    return out_file


#: Tensors a quantization gave another type than asked for (K-quants need rows of 256).
FALLBACK_LOG = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")


def quantize_gguf(source: str | os.PathLike, dest: str | os.PathLike, qtype: str,
                  log: list | None = None) -> Path:
    """Quantize a GGUF file (f16 or f32) to ``qtype`` (see :data:`GGUF_TYPES`) with llama.cpp.

    llama.cpp's log is kept out of the output (its lines are appended to ``log`` when given);
    raises ExportError with its tail on failure.
    """
    import ctypes

    import llama_cpp

    qtype = qtype.lower()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}", None)
    if qtype not in GGUF_TYPES or ftype is None:
        raise ConfigError(f"unknown GGUF type {qtype!r}; choose from {', '.join(GGUF_TYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = cpu_threads()
    with captured_llama_log() as lines:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(),
                                                ctypes.byref(params))
    if log is not None:
        log.extend(lines)
    if status != 0:
        raise ExportError(f"llama.cpp could not quantize {source} to {qtype} (status {status}):\n"
                          + "\n".join(lines[-20:]))
    return Path(dest)


def fallback_tensors(log: list[str]) -> int:
    """How many tensors llama.cpp quantized to a fallback type, from its quantize log."""
    found = [FALLBACK_LOG.search(line) for line in log]
    return sum(int(m.group(1)) for m in found if m)


def export_run(run_dir: str | os.PathLike, quants=("q8_0", "q4_k_m"),
               out_dir: str | os.PathLike | None = None, target: str = "quantized",
               chat_template: str = "training", keep_merged: bool = True,
               progress: bool = True) -> dict[str, Path]:
    """Merge, convert to f16 GGUF, quantize to each of ``quants``; returns ``{name: path}``.

    Names: ``merged`` (the transformers checkpoint), ``f16`` and each quantization. The timings
    and sizes go to ``out_dir/export.json``.
    """
    quants = [q.strip().lower() for q in (quants.split(",") if isinstance(quants, str) else quants)
              if q.strip()]
    for qtype in quants:
        if qtype not in GGUF_TYPES:
            raise ConfigError(f"unknown GGUF type {qtype!r}; choose from {', '.join(GGUF_TYPES)}")
    cfg = load_run_config(run_dir)
    run_adapter(run_dir)
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    files, seconds, fallbacks = {}, {}, {}

    def step(name, fn, *args, **kwargs):
        if progress:
            print(f"[export] {name} ...", flush=True)
        start = time.perf_counter()
        files[name] = fn(*args, **kwargs)
        seconds[name] = round(time.perf_counter() - start, 2)

    step("merged", merge_adapter, run_dir, out_dir / "merged", target, chat_template)
    step("f16", convert_to_gguf, out_dir / "merged", out_dir / "model-f16.gguf", "f16",
         TINY_TOKENIZER_PRE if uses_tiny_tokenizer(cfg) else None)
    for qtype in quants:
        if qtype != "f16":
            log: list[str] = []
            step(qtype, quantize_gguf, files["f16"], out_dir / f"model-{qtype}.gguf", qtype, log)
            fallbacks[qtype] = fallback_tensors(log)
    if not keep_merged:
        shutil.rmtree(files.pop("merged"))
    (out_dir / "export.json").write_text(json.dumps({
        "run_dir": str(Path(run_dir).resolve()), "llama_cpp_python": runtime_version(),
        "files": {k: str(v) for k, v in files.items()}, "seconds": seconds,
        "fallback_tensors": fallbacks,
        "megabytes": {k: round(v.stat().st_size / 2**20, 2) for k, v in files.items()
                      if v.is_file()}}, indent=2) + "\n")
    if progress:
        for name, path in files.items():
            print(f"[export] {name:8s} {shown_path(path)}  ({seconds[name]} s)")
    return files


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as outputs print it: relative to the repository, or under ``~`` (the caches),
    so that a saved notebook names no folder of the machine that executed it; other paths as
    they are."""
    path = Path(path).expanduser().resolve()
    for root, prefix in ((REPO_ROOT.resolve(), ""), (Path.home().resolve(), "~/")):
        if path.is_relative_to(root):
            return prefix + path.relative_to(root).as_posix()
    return str(path)


# --------------------------------------------------------------------------------------------
# A Hugging Face Space
# --------------------------------------------------------------------------------------------

SPACE_README = """---
title: {title}
emoji: 💬
colorFrom: indigo
colorTo: gray
sdk: gradio
app_file: app.py
pinned: false
license: apache-2.0
---

# {title}

A chat over `{gguf}`, made by dpo-quant (`dpo-export`): the LoRA adapter of a
{loss} run merged into {base} and quantized to GGUF for llama.cpp. It runs on the free CPU
hardware (2 vCPUs). Start it locally with `python app.py`.
"""


def write_space(gguf_path: str | os.PathLike, folder: str | os.PathLike, title: str = "dpo-quant chat",
                base: str = "the base model", loss: str = "preference") -> Path:
    """A folder ready to push to a Hugging Face Space: ``app.py`` (a copy of :mod:`dpo_lib.deploy.app`,
    which needs only gradio and llama-cpp-python), the GGUF file, ``requirements.txt`` and a
    ``README.md`` with the Space's settings. Push the GGUF with git-lfs (Spaces store large files
    in LFS)."""
    import importlib.metadata

    def pin(package: str, fallback: str) -> str:
        try:
            return f"{package}=={importlib.metadata.version(package)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{package}{fallback}"

    folder, gguf_path = Path(folder), Path(gguf_path)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).with_name("app.py"), folder / "app.py")
    if (folder / gguf_path.name).resolve() != gguf_path.resolve():
        shutil.copy(gguf_path, folder / gguf_path.name)
    (folder / "requirements.txt").write_text(
        f"{pin('llama-cpp-python', '>=0.3.16')}\n{pin('gradio', '>=5')}\n")
    (folder / "README.md").write_text(SPACE_README.format(title=title, gguf=gguf_path.name,
                                                          base=base, loss=loss))
    return folder


@command("dpo-export")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="dpo-export",
        description="Merge a run's LoRA adapter, convert to GGUF with llama.cpp's converter, "
                    "quantize, and optionally verify against the transformers model.")
    parser.add_argument("run_dir", nargs="?", help="a training run's output_dir")
    parser.add_argument("--quant", default="q8_0,q4_k_m",
                        help=f"comma-separated GGUF types besides f16 ({', '.join(GGUF_TYPES)})")
    parser.add_argument("--out", help="output folder (default RUN_DIR/export)")
    parser.add_argument("--merge-target", choices=("quantized", "original"), default="quantized",
                        help="merge into the dequantized 4-bit base (default) or the original weights")
    parser.add_argument("--chat-template", choices=("training", "model"), default="training")
    parser.add_argument("--verify", action="store_true",
                        help="compare each GGUF with the merged transformers model on held-out text")
    parser.add_argument("--space", action="store_true",
                        help="also write a Hugging Face Space folder (OUT/space) for the last type")
    parser.add_argument("--fetch-converter", action="store_true",
                        help="only fetch the converter matching the installed llama-cpp-python")
    parser.add_argument("--sdist", help="with --fetch-converter: a local llama_cpp_python sdist")
    args = parser.parse_args(argv)
    if args.fetch_converter:
        version = runtime_version()
        folder = fetch_converter(version, cache_dir() / f"llama.cpp-{version}", args.sdist)
        print(f"converter of llama-cpp-python {version} in {folder}")
        return 0
    if not args.run_dir:
        parser.error("RUN_DIR is required (or --fetch-converter)")
    files = export_run(args.run_dir, args.quant, args.out, args.merge_target, args.chat_template)
    if args.verify:
        from . import gguf_check

        reference, ref_files = reference_run(args.run_dir), None
        if reference is not None:           # the implicit reward needs the reference model
            print(f"[export] the reference run {reference}, the same way, for the reward accuracy")
            ref_files = export_run(reference, args.quant,
                                   Path(files["f16"]).parent / "reference", args.merge_target,
                                   args.chat_template, progress=False)
        table = gguf_check.verify_exports(args.run_dir, files, ref_files)
        print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    if args.space:
        last = [name for name in files if name != "merged"][-1]
        cfg = load_run_config(args.run_dir)
        folder = write_space(files[last], Path(files[last]).parent / "space",
                             base=cfg.model.name, loss=cfg.train.loss_type)
        print(f"Space folder: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
