"""One trainer for SFT and the preference losses (DPO, cDPO, IPO), built on accelerate.

The same code runs in a notebook (:func:`train`), from the command line::

    python -m dpo_lib.train CONFIG [key=value ...]      # CONFIG: a profile or a recipe YAML
    torchrun --nproc_per_node 2 -m dpo_lib.train ...    # several processes (DDP; gloo on CPU)
    accelerate launch -m dpo_lib.train ...              # several GPUs

A run writes everything into its ``output_dir``: ``config.yaml`` (what produced it),
``metrics.jsonl`` (one JSON object per optimizer step and per evaluation), ``checkpoint-<step>/``
(the adapter, and through accelerate's ``save_state`` the optimizer, scheduler, fp16 GradScaler
and every process's RNG; the config and the data position) and ``adapter/`` (the final adapter).

Preference runs compute the reference log-probs once, in a no-grad pass, and cache them on disk
under a key of (reference model, data, tokenization); during training only the policy runs.
Summed log-probs and token counts are both cached, so a DPO run (sums) and an IPO run (token
means) from the same SFT model share one reference pass.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data as data_lib
from . import packing
from .config import RUNS_DIR, Config, load_config, require_device
from .losses import (REFERENCE_FREE, default_average, head_logps, preference_loss, preference_metrics,
                     sequence_logps)

IGNORE_INDEX = data_lib.IGNORE_INDEX


class NonFiniteLossError(FloatingPointError):
    """A NaN or inf loss stopped the run; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------
# Set-up pieces
# --------------------------------------------------------------------------------------------

def run_name(cfg: Config) -> str:
    stage = cfg.train.stage
    return f"{cfg.profile}-{stage}" + (f"-{cfg.train.loss_type}" if stage == "preference" else "")


def output_dir(cfg: Config) -> Path:
    return Path(cfg.train.output_dir) if cfg.train.output_dir else RUNS_DIR / run_name(cfg)


def average_logps(cfg: Config) -> bool:
    """Token-mean (True) or summed (False) log-probs for this run's preference loss."""
    setting = cfg.train.get("average_logps")
    return default_average(cfg.train.loss_type) if setting is None else bool(setting)


def mixed_precision(cfg: Config) -> str:
    """``train.mixed_precision`` resolved for this machine: ``auto`` is bf16 on GPUs that support
    it, fp16 on older GPUs, ``no`` on CPU."""
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "no"
        if torch.cuda.is_available():
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def make_accelerator(cfg: Config):
    from accelerate import Accelerator

    require_device(cfg, "training")
    precision = mixed_precision(cfg)
    if precision != "no" and not torch.cuda.is_available():
        raise ValueError(f"mixed_precision={precision} needs a GPU here; use 'no' or 'auto' on CPU")
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def learning_rate(cfg: Config) -> float:
    """The stage's peak learning rate: ``preference_learning_rate`` (when set) for preference
    runs, ``learning_rate`` otherwise."""
    preference = cfg.train.get("preference_learning_rate")
    if cfg.train.stage == "preference" and preference is not None:
        return float(preference)
    return float(cfg.train.learning_rate)


def make_optimizer(cfg: Config, parameters):
    name = cfg.train.optimizer
    kwargs = dict(lr=learning_rate(cfg), weight_decay=cfg.train.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, **kwargs)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        if not torch.cuda.is_available():
            raise ValueError(f"optimizer={name} needs CUDA (bitsandbytes' 8-bit optimizers); "
                             "use optimizer=adamw on CPU")
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
        return cls(parameters, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, adamw_8bit or paged_adamw_8bit")


def load_examples(cfg: Config, tokenizer, split: str, limit: int):
    """Tokenized preference examples of one split, and the row accounting."""
    pairs, report = data_lib.load_split(cfg, split, limit)
    if not pairs:
        raise ValueError(f"no usable pairs in {cfg.data.source} ({split}): {dict(report)}")
    examples, _ = data_lib.tokenize_pairs(pairs, tokenizer, cfg.data.max_length,
                                          cfg.data.max_prompt_length)
    return pairs, examples, report


def micro_batches(examples, cfg: Config, epoch: int) -> list[list[int]]:
    """The epoch's micro-batches of example indices: shuffled by (seed, epoch), length-grouped."""
    return data_lib.batch_indices(examples, cfg.train.batch_size, cfg.train.group_by_length,
                                  seed=cfg.seed * 1000 + epoch)


# --------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------

def output_head(model) -> torch.nn.Linear:
    """The model's output layer, for :func:`dpo_lib.losses.head_logps`: a plain ``nn.Linear``
    (LoRA and bitsandbytes leave the output layer alone), or a clear error."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    config = getattr(inner, "config", None)
    if type(head) is not torch.nn.Linear or getattr(config, "final_logit_softcapping", None) \
            or getattr(config, "logit_scale", None):
        raise ValueError(f"train.chunked_head needs a plain linear output layer without logit "
                         f"scaling; {type(inner).__name__} has {type(head).__name__}: set "
                         f"chunked_head=false")
    return head


def final_norm(model) -> torch.nn.Module | None:
    """The module whose output is the final hidden state (the decoder's last norm), looked up
    through DDP and peft wrappers; None for an architecture that names it otherwise."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    for name in ("norm", "final_layer_norm", "ln_f", "final_layernorm"):
        module = getattr(decoder, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def final_hidden(model, **inputs) -> torch.Tensor:
    """``[B, L, H]`` final hidden states (after the last norm), through the model's own forward
    (so that DDP and peft wrappers see the call) with logits for one position only.

    The states are taken from the final norm's output by a forward hook: asking the model for
    ``output_hidden_states`` instead would keep every layer's ``[B, L, H]`` states alive until the
    call returns, memory that a no-grad pass (the reference and evaluation passes) never needs.
    """
    norm = final_norm(model)
    if norm is None:
        return model(**inputs, logits_to_keep=1, output_hidden_states=True).hidden_states[-1]
    captured = []
    handle = norm.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


def concatenated_logps(model, batch: dict[str, torch.Tensor], chunked_head: bool = False):
    """Chosen and rejected in one forward pass.

    ``batch`` from :func:`dpo_lib.data.collate_preference` (``[B, L]`` tensors). Returns fp32
    ``(chosen_sums [B], rejected_sums [B], chosen_counts [B], rejected_counts [B])``: summed
    response log-probs and the number of response tokens they sum over. ``chunked_head``: apply
    the output layer only at answer positions, in chunks (:func:`dpo_lib.losses.head_logps`)
    instead of taking the model's ``[2B, L, V]`` logits.
    """
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])      # [2B, L]
    attention_mask = torch.cat([batch["chosen_attention_mask"],
                                batch["rejected_attention_mask"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    if chunked_head:
        hidden = final_hidden(model, input_ids=input_ids, attention_mask=attention_mask)
        sums = head_logps(hidden[:, :-1], output_head(model), labels[:, 1:])            # [2B]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits        # [2B, L, V]
        sums = sequence_logps(logits, labels, average=False)                             # [2B]
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1).float()                             # [2B]
    size = batch["chosen_input_ids"].shape[0]
    return sums[:size], sums[size:], counts[:size], counts[size:]


def shared_prompt(cfg: Config) -> bool:
    """Whether pairs go through the shared-prompt packed forward (:mod:`dpo_lib.packing`)."""
    return bool(cfg.train.get("shared_prompt", False))


def chunked_head(cfg: Config) -> bool:
    """Whether log-probs come from hidden states through the output layer in chunks."""
    return bool(cfg.train.get("chunked_head", False))


def collate_pairs(examples, pad_token_id: int, shared: bool = False) -> dict[str, torch.Tensor]:
    """A batch of pairs for :func:`pair_logps`: packed behind one prompt, or chosen and rejected
    padded side by side (:func:`dpo_lib.data.collate_preference`)."""
    if shared:
        return packing.collate_shared_prompt(examples, pad_token_id)
    return data_lib.collate_preference(examples, pad_token_id)


def pair_logps(model, batch: dict[str, torch.Tensor], chunked_head: bool = False):
    """Summed answer log-probs and counts of a batch from :func:`collate_pairs` (either layout)."""
    if "segment_ids" in batch:
        return packing.shared_prompt_logps(model, batch, chunked_head)
    return concatenated_logps(model, batch, chunked_head)


def _to_device(batch, device):
    return {key: value.to(device) for key, value in batch.items()}


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
    from .models import compute_dtype

    digest = hashlib.sha256()
    model = cfg.model
    identity = [model.name, revision, model.quantization, model.get("double_quant"),
                str(compute_dtype(model.get("compute_dtype", "auto"))), mixed_precision(cfg),
                model.get("init_seed", 0) if model.name.startswith(("tiny", "random")) else None,
                cfg.data.max_length, cfg.data.max_prompt_length, library_versions()]
    digest.update(json.dumps(identity).encode())
    if reference_adapter is not None:
        for file in sorted(reference_adapter.glob("adapter_model.*")):
            digest.update(_file_digest(file).encode())
    for example in examples:
        digest.update(np.asarray(example["chosen_input_ids"] + [-1] + example["rejected_input_ids"]
                                 + [-2] + example["chosen_labels"][:1], dtype=np.int64).tobytes())
    return digest.hexdigest()[:24]


@torch.no_grad()
def precompute_reference_logps(model, examples, batch_size: int, accelerator=None,
                               cache_file: Path | None = None, use_adapter: bool = True,
                               progress: bool = True, shared: bool = False,
                               chunked: bool = False) -> dict[str, torch.Tensor]:
    """Reference log-probs of every example, in a no-grad pass, cached in ``cache_file``.

    Returns fp32 tensors of shape ``[N]``: ``chosen_sums``, ``rejected_sums``, ``chosen_counts``,
    ``rejected_counts``. ``use_adapter=False`` disables the LoRA adapters for the pass (the
    reference is then the base model, and no second copy of it is needed). ``shared``: the
    shared-prompt packed forward; ``chunked``: the chunked output layer (both give the same
    values within floating-point tolerance).
    """
    if cache_file is not None and Path(cache_file).is_file():
        return torch.load(cache_file)
    from contextlib import nullcontext
    from .progress import tqdm

    from .models import reference_mode

    device = accelerator.device if accelerator else next(model.parameters()).device
    unwrapped = accelerator.unwrap_model(model) if accelerator else model
    batches = length_sorted_batches(examples, batch_size)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = batches[rank::world]
    results = []
    was_training = unwrapped.training
    unwrapped.eval()
    with reference_mode(unwrapped) if not use_adapter else nullcontext():
        for indices in tqdm(mine, desc="reference pass", disable=not progress or rank != 0):
            batch = collate_pairs([examples[i] for i in indices], _pad_id(unwrapped), shared)
            values = pair_logps(unwrapped, _to_device(batch, device), chunked)
            results.append((indices, torch.stack(values, dim=1).cpu()))
    unwrapped.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    table = torch.zeros(len(examples), 4)
    for indices, values in results:
        table[indices] = values
    reference = dict(zip(("chosen_sums", "rejected_sums", "chosen_counts", "rejected_counts"),
                         table.unbind(1)))
    if cache_file is not None and (accelerator is None or accelerator.is_main_process):
        save_atomically(reference, Path(cache_file))
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


def length_sorted_batches(examples, batch_size: int) -> list[list[int]]:
    """Batches of indices sorted by length: the least padding for a pass whose order is free."""
    order = sorted(range(len(examples)), key=lambda i: data_lib.example_length(examples[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _pad_id(model) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def reference_logps(reference: dict, indices, average: bool):
    """Chosen and rejected reference log-probs ``[B]`` for ``indices``: sums or token means."""
    chosen, rejected = reference["chosen_sums"][indices], reference["rejected_sums"][indices]
    if average:
        chosen = chosen / reference["chosen_counts"][indices].clamp(min=1)
        rejected = rejected / reference["rejected_counts"][indices].clamp(min=1)
    return chosen, rejected


def preference_step_outputs(model, batch, reference, indices, cfg: Config):
    """Losses ``[B]`` and the logged quantities for one micro-batch of pairs."""
    average = average_logps(cfg)
    chosen_sums, rejected_sums, chosen_counts, rejected_counts = pair_logps(model, batch,
                                                                            chunked_head(cfg))
    if average:
        chosen, rejected = chosen_sums / chosen_counts.clamp(min=1), \
            rejected_sums / rejected_counts.clamp(min=1)
    else:
        chosen, rejected = chosen_sums, rejected_sums
    loss_type = cfg.train.loss_type
    ref_chosen = ref_rejected = None
    if loss_type not in REFERENCE_FREE:
        ref_chosen, ref_rejected = (t.to(chosen.device) for t in reference_logps(reference, indices,
                                                                                 average))
    losses, chosen_rewards, rejected_rewards = preference_loss(
        chosen, rejected, ref_chosen, ref_rejected, cfg.train.beta, loss_type,
        cfg.train.label_smoothing, chosen_token_mean_logps=chosen_sums / chosen_counts.clamp(min=1),
        rpo_alpha=cfg.train.get("rpo_alpha", 1.0), simpo_gamma=cfg.train.get("simpo_gamma", 0.5))
    return losses, torch.stack([losses.detach(), chosen_rewards, rejected_rewards,
                                chosen.detach(), rejected.detach()], dim=1)


def sft_step_outputs(model, batch, chunked_head: bool = False):
    """Token-summed NLL ``[B]`` and the token counts ``[B]`` of one SFT micro-batch."""
    if chunked_head:
        hidden = final_hidden(model, input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"])
        sums = head_logps(hidden[:, :-1], output_head(model), batch["labels"][:, 1:])
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums = sequence_logps(logits, batch["labels"], average=False)
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).float()
    return -sums, counts


def _preference_metrics_from_rows(rows: torch.Tensor, cfg: Config, prefix: str = "") -> dict:
    losses, chosen_rewards, rejected_rewards, chosen, rejected = rows.unbind(1)
    metrics = preference_metrics(losses, chosen_rewards, rejected_rewards, chosen, rejected,
                                 average_logps(cfg), prefix=prefix)
    metrics[prefix + "logps/accuracies"] = (chosen > rejected).float().mean().item()
    return metrics


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, examples, cfg: Config, accelerator, reference=None) -> dict[str, float]:
    """Held-out metrics, keys prefixed ``eval/``. SFT: token-mean NLL of the chosen answers and
    log-prob preference accuracy; preference: the loss and reward metrics of the loss in use."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    size = cfg.train.eval_batch_size
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = length_sorted_batches(examples, size)
    results = []
    for indices in batches[rank::world]:
        batch = _to_device(collate_pairs([examples[i] for i in indices], _pad_id(unwrapped),
                                         shared_prompt(cfg)), accelerator.device)
        if reference is None:
            sums = pair_logps(unwrapped, batch, chunked_head(cfg))
            results.append((indices, torch.stack(sums, dim=1).cpu()))
        else:
            _, rows = preference_step_outputs(unwrapped, batch, reference, indices, cfg)
            results.append((indices, rows.cpu()))
    unwrapped.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        results = gather_object(results)
    rows = torch.cat([values for _, values in results])
    if reference is not None:
        return _preference_metrics_from_rows(rows, cfg, prefix="eval/")
    chosen_sums, rejected_sums, chosen_counts, rejected_counts = rows.unbind(1)
    return {"eval/loss": (-chosen_sums.sum() / chosen_counts.sum()).item(),
            "eval/logps/chosen": chosen_sums.mean().item(),
            "eval/logps/rejected": rejected_sums.mean().item(),
            "eval/logps/accuracies": (chosen_sums / chosen_counts >
                                      rejected_sums / rejected_counts).float().mean().item()}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def save_checkpoint(folder: Path, model, optimizer, scheduler, step: int, accelerator,
                    cfg: Config | None = None) -> Path:
    """``checkpoint-<step>/``: accelerate's ``save_state`` (optimizer, the registered scheduler,
    the fp16 GradScaler, every process's own RNG states), the LoRA adapter
    (``adapter_model.safetensors``, what :mod:`dpo_lib.export` and the notebooks read), the run's
    config and ``trainer_state.json`` (the optimizer steps done = the data position). Written into
    a hidden folder, renamed when complete. Every process calls it."""
    import shutil

    target, partial = folder / f"checkpoint-{step}", folder / f".checkpoint-{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))      # the base model's weights are left out (see train)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(partial)
        if cfg is not None:
            cfg.save(partial / "config.yaml")
        (partial / "trainer_state.json").write_text(json.dumps({"step": step}) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
    accelerator.wait_for_everyone()
    return target


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def load_checkpoint(checkpoint: Path, model, accelerator) -> int:
    """Restore what :func:`save_checkpoint` wrote (every process its own RNG); returns the step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(checkpoint / "adapter_model.safetensors")
    set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
    accelerator.load_state(str(checkpoint))
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["step"])


#: Keys a resumed run may change without changing what it computes.
RESUME_MAY_DIFFER = ("train.resume", "train.output_dir", "train.eval_every", "train.save_every",
                     "train.wandb", "train.wandb_project")


def resume_checkpoint(cfg: Config, folder: Path) -> Path | None:
    """The checkpoint a ``train.resume=true`` run continues from, or a clear error.

    No checkpoint in ``folder`` is an error (starting afresh would replace its metrics.jsonl);
    so is a checkpoint whose saved config differs from ``cfg`` in a key that changes the
    computation: anything but :data:`RESUME_MAY_DIFFER` and the other stage's step count. Total
    steps count: they shape the learning-rate schedule (train longer from ``init_adapter`` instead).
    """
    if not cfg.train.get("resume"):
        return None
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise FileNotFoundError(
            f"train.resume=true, but {folder} has no checkpoint-* folder to continue from (a run "
            f"writes one every save_every steps). Set resume=false to start afresh there (that "
            f"replaces its metrics.jsonl), or point output_dir at the run to continue.")
    if not (checkpoint / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{checkpoint} was written by an older dpo_lib (no "
                                f"trainer_state.json); start afresh with resume=false")
    saved = _leaves(load_config(str(checkpoint / "config.yaml")).to_dict())
    now = _leaves(cfg.to_dict())
    other_steps = "train.preference_steps" if cfg.train.stage == "sft" else "train.sft_steps"
    differ = sorted(key for key in saved.keys() | now.keys()
                    if saved.get(key) != now.get(key) and key not in RESUME_MAY_DIFFER
                    and key != other_steps)
    if differ:
        changes = ", ".join(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in differ)
        raise ValueError(f"cannot resume from {checkpoint}: the config differs in keys that change "
                         f"the computation ({changes}). Resume with the checkpoint's values, or "
                         f"start a new run (init_adapter={checkpoint} to start from its adapter).")
    return checkpoint


def _leaves(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------

class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (main process only), and to wandb."""

    def __init__(self, path: Path, accelerator, cfg: Config, resume_step: int | None):
        self.path, self.active = path, accelerator.is_main_process
        self.wandb = None
        if not self.active:
            return
        if resume_step is None:
            path.write_text("")
        else:  # drop what was logged after the checkpoint we resume from
            kept = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step] if path.exists() else []
            path.write_text("".join(line + "\n" for line in kept))
        mode = cfg.train.get("wandb", "disabled")
        if mode not in ("disabled", "offline", "online"):
            raise ValueError(f"wandb={mode!r}: choose disabled, offline or online")
        if mode != "disabled":
            try:
                import wandb
            except ImportError as error:
                raise ModuleNotFoundError("wandb logging is on but wandb is not installed: "
                                          "pip install wandb, or set wandb=disabled") from error
            if mode == "online" and not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
                raise RuntimeError("wandb=online needs a logged-in wandb (WANDB_API_KEY or "
                                   "`wandb login`); use wandb=offline to log locally")
            self.wandb = wandb.init(project=cfg.train.wandb_project, name=path.parent.name,
                                    dir=str(path.parent), mode=mode, config=cfg.to_dict(),
                                    resume="allow", reinit="finish_previous")

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    output_dir: Path
    metrics: list[dict]
    model: object = None
    tokenizer: object = None


def prepare_model(cfg: Config, progress: bool = True):
    """The profile's quantized model with a trainable LoRA adapter, and its tokenizer.

    Preference runs with ``train.init_adapter`` start from that SFT run's adapter (the reference
    is then the SFT model); without one, the adapter starts at zero and the reference is the
    base model with adapters disabled.
    """
    from .models import add_lora, load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg)
    base = load_model(cfg)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    init = cfg.train.get("init_adapter")
    if cfg.train.stage == "preference" and init:
        adapter = Path(init) / "adapter" if (Path(init) / "adapter").is_dir() else Path(init)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"init_adapter: no adapter in {init} (run the SFT stage "
                                    "first: notebook 03 or `python -m dpo_lib.train sft`)")
        return _load_trainable_adapter(base, cfg, adapter), tokenizer, adapter
    return add_lora(base, cfg), tokenizer, None


def _load_trainable_adapter(base, cfg: Config, adapter: Path):
    """``base`` with a saved LoRA adapter, trainable (as :func:`dpo_lib.models.add_lora` prepares)."""
    from peft import PeftModel, prepare_model_for_kbit_training

    from .models import is_quantized, set_gradient_checkpointing

    if is_quantized(base):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    set_gradient_checkpointing(base, bool(cfg.model.get("gradient_checkpointing", False)))
    return PeftModel.from_pretrained(base, adapter, is_trainable=True)


def train(cfg: Config, progress: bool = True, keep_model: bool = False) -> RunResult:
    """Run the stage ``cfg.train.stage`` (``sft`` or ``preference``) and return its metrics."""
    from .progress import tqdm
    from transformers import get_scheduler

    run_started = time.perf_counter()
    stage = cfg.train.stage
    if stage not in ("sft", "preference"):
        raise ValueError(f"train.stage={stage!r}: choose sft or preference")
    accelerator = make_accelerator(cfg)
    folder = output_dir(cfg)
    resume_from = resume_checkpoint(cfg, folder)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        cfg.save(folder / "config.yaml")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    model, tokenizer, reference_adapter = prepare_model(cfg, progress)
    if shared_prompt(cfg):
        packing.attention_implementation(model)     # refuses kernels that ignore a 4-D mask
    _, train_examples, _ = load_examples(cfg, tokenizer, "train", cfg.data.train_limit)
    _, eval_examples, _ = load_examples(cfg, tokenizer, "test", cfg.data.test_limit)
    if stage == "sft":
        train_examples = data_lib.sft_examples(train_examples)
    elif cfg.data.get("pair_filter"):
        train_examples = filter_training_pairs(model, train_examples, cfg, folder, accelerator,
                                               progress)
    total_steps = cfg.train.sft_steps if stage == "sft" else cfg.train.preference_steps

    reference = eval_reference = None
    if stage == "preference" and cfg.train.loss_type in REFERENCE_FREE:
        reference = eval_reference = {}      # simpo: no reference pass ({}: still a preference run)
    elif stage == "preference":
        cache_root = _reference_cache_root()
        timing = {}
        for name, examples in (("train", train_examples), ("eval", eval_examples)):
            key = reference_cache_key(cfg, examples, reference_adapter, model_revision(model))
            cached = (cache_root / f"{key}.pt").is_file()
            reference_started = time.perf_counter()
            values = precompute_reference_logps(
                model, examples, cfg.train.eval_batch_size, accelerator,
                cache_file=cache_root / f"{key}.pt", use_adapter=reference_adapter is not None,
                progress=progress, shared=shared_prompt(cfg), chunked=chunked_head(cfg))
            if name == "train":
                reference = values
            else:
                eval_reference = values
            timing[name] = {"pairs": len(examples), "cached": cached,
                            "seconds": time.perf_counter() - reference_started}
            if accelerator.is_main_process:
                (folder / f"reference_{name}.key").write_text(key + "\n")
        if accelerator.is_main_process:
            (folder / "reference_pass.json").write_text(json.dumps(timing, indent=1) + "\n")
        accelerator.wait_for_everyone()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, trainable)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer,
                              num_warmup_steps=cfg.train.warmup_steps,
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Checkpoints through accelerate's save_state/load_state: the scheduler is registered (not
    # prepared, which would step it once per process), and the frozen base model's weights are
    # left out (the adapter is saved beside them).
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, folder: models.clear())

    start_step = 0
    if resume_from is not None:
        start_step = load_checkpoint(resume_from, model, accelerator)
    log = MetricsLog(folder / "metrics.jsonl", accelerator, cfg,
                     start_step if resume_from is not None else None)

    accumulation, world = cfg.train.gradient_accumulation_steps, accelerator.num_processes
    per_step = accumulation * world          # micro-batches per optimizer step, all processes
    if stage == "sft":
        collate = data_lib.collate_sft
    else:
        def collate(examples, pad):
            return collate_pairs(examples, pad, shared_prompt(cfg))
    pad_id = _pad_id(accelerator.unwrap_model(model))
    epoch_batches: dict[int, list] = {}

    def micro_batch(number: int) -> list[int]:
        per_epoch = len(train_examples) // cfg.train.batch_size
        if per_epoch == 0:
            raise ValueError(f"{len(train_examples)} training examples do not fill one batch of "
                             f"{cfg.train.batch_size}")
        epoch, position = divmod(number, per_epoch)
        if epoch not in epoch_batches:
            epoch_batches.clear()
            epoch_batches[epoch] = micro_batches(train_examples, cfg, epoch)
        return epoch_batches[epoch][position]

    if start_step == 0 and stage == "preference" and cfg.train.eval_every:
        log.write({"step": 0, "examples": 0,
                   **evaluate(model, eval_examples, cfg, accelerator, eval_reference)})
    model.train()
    bar = tqdm(total=total_steps, initial=start_step, desc=run_name(cfg),
               disable=not progress or not accelerator.is_local_main_process)
    metrics: dict = {}
    for step in range(start_step + 1, total_steps + 1):
        started = time.perf_counter()
        rows, tokens, positions = [], 0, 0
        numbers = [(step - 1) * per_step + micro * world + accelerator.process_index
                   for micro in range(accumulation)]
        step_indices = [micro_batch(number) for number in numbers]
        step_batches = [collate([train_examples[i] for i in indices], pad_id)
                        for indices in step_indices]
        if stage == "sft":  # the tokens of the whole optimizer step, all micro-batches and processes
            step_tokens = sft_step_tokens(step_batches, accelerator)
        for micro, (indices, batch) in enumerate(zip(step_indices, step_batches)):
            batch = _to_device(batch, accelerator.device)
            masks = [v for k, v in batch.items() if k.endswith("attention_mask")]
            tokens += sum(int(m.sum()) for m in masks)
            positions += sum(m.numel() for m in masks)
            sync = micro == accumulation - 1
            context = accelerator.no_sync(model) if not sync else _null()
            with context, accelerator.autocast():
                if stage == "sft":
                    nll, counts = sft_step_outputs(model, batch, chunked_head(cfg))
                    rows.append(torch.stack([nll.detach(), counts], dim=1))
                    # the step's token mean: summed NLL over the step's tokens on all processes
                    # (times the processes, as DDP averages gradients over them): the same
                    # gradient for any split of the step into micro-batches and processes
                    loss = nll.sum() / step_tokens * world
                else:
                    losses, step_rows = preference_step_outputs(model, batch, reference,
                                                                indices, cfg)
                    loss = losses.mean() / accumulation
                    rows.append(step_rows)
                stop_if_not_finite(loss, step, micro, indices, folder, accelerator)
                accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16: the GradScaler skipped the step
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        local = torch.cat(rows).to(accelerator.device)
        gathered = accelerator.gather(local).cpu() if world > 1 else local.cpu()
        tokens_all = int(accelerator.gather(torch.tensor([tokens], device=accelerator.device))
                         .sum()) if world > 1 else tokens
        if stage == "sft":
            metrics = {"loss": (gathered[:, 0].sum() / gathered[:, 1].sum()).item()}
        else:
            metrics = _preference_metrics_from_rows(gathered, cfg)
        record = {"step": step, "examples": step * per_step * cfg.train.batch_size, **metrics,
                  "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                  "tokens_per_second": tokens_all / (time.perf_counter() - started),
                  "step_seconds": time.perf_counter() - started,
                  "padding_fraction": 1 - tokens / max(positions, 1)}
        log.write(record)
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{record[k]:.3f}" for k in
                         ("loss", "rewards/accuracies") if k in record})
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == total_steps):
            log.write({"step": step, "examples": record["examples"],
                       **evaluate(model, eval_examples, cfg, accelerator, eval_reference)})
        if cfg.train.save_every and step % cfg.train.save_every == 0:
            save_checkpoint(folder, model, optimizer, scheduler, step, accelerator, cfg)
    bar.close()
    log.close()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(folder / "adapter")
        tokenizer.save_pretrained(folder / "adapter")
        # the whole call: loading, filtering, reference pass, steps, evaluations (metrics.jsonl
        # has the steps alone: step_seconds)
        (folder / "run_time.json").write_text(json.dumps(
            {"wall_seconds": time.perf_counter() - run_started, "steps": total_steps,
             "resumed_from_step": start_step}) + "\n")
    accelerator.wait_for_everyone()
    result = RunResult(folder, read_metrics(folder) if accelerator.is_main_process else [])
    if keep_model:
        result.model, result.tokenizer = accelerator.unwrap_model(model), tokenizer
    # Free the DDP wrapper (its reducer holds the process group) while every process is still
    # here; destroying the group first can leave a process waiting for a peer that has exited.
    del model, optimizer
    accelerator.free_memory()
    accelerator.end_training()
    return result


def filter_training_pairs(model, examples, cfg: Config, folder: Path, accelerator,
                          progress: bool = True) -> list:
    """The training pairs left after ``data.pair_filter`` (``ches`` or ``random``) drops
    ``data.pair_filter_share`` of them, scored with the model training starts from
    (:mod:`dpo_lib.ches`). Writes ``pair_filter.json`` (every pair's scores, the dropped indices)
    into the run folder."""
    from . import ches

    how, share = cfg.data.pair_filter, float(cfg.data.get("pair_filter_share", 0.0))
    scores = None
    if how == "ches":
        sums = ches.answer_hidden_sums(accelerator.unwrap_model(model), examples,
                                       cfg.train.eval_batch_size, _pad_id(model), progress)
        scores = ches.ches_scores(**sums)
    kept = ches.filter_pairs(len(examples), share, how,
                             None if scores is None else scores[ches.FILTER_SCORE], cfg.seed)
    if accelerator.is_main_process:
        record = {"pair_filter": how, "share": share, "pool": len(examples), "kept": len(kept),
                  "dropped": sorted(set(range(len(examples))) - set(kept)),
                  "score": ches.FILTER_SCORE if scores is not None else None,
                  **({name: values.tolist() for name, values in scores.items()} if scores else {})}
        (folder / "pair_filter.json").write_text(json.dumps(record) + "\n")
    return [examples[i] for i in kept]


def sft_step_tokens(batches, accelerator) -> int:
    """Answer tokens (labels other than -100 after the shift) in one optimizer step's SFT
    micro-batches, summed over every process."""
    tokens = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batches)
    if accelerator.num_processes > 1:
        tokens = int(accelerator.reduce(torch.tensor([tokens], device=accelerator.device),
                                        "sum").item())
    return tokens


def stop_if_not_finite(loss: torch.Tensor, step: int, micro: int, indices, folder: Path,
                       accelerator) -> None:
    """Raise :class:`NonFiniteLossError` on every process when the loss is NaN or inf on any.

    With several processes they first agree (one all-reduce of a flag per micro-batch), so that
    none raises while the others wait for it in the gradient all-reduce; all then raise the same
    error, naming each process that saw a non-finite loss.
    """
    bad = not bool(torch.isfinite(loss.detach()).all())
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(bad)], device=accelerator.device)
        if accelerator.reduce(flag, "sum").item() == 0:
            return
        from accelerate.utils import gather_object

        seen = gather_object([(accelerator.process_index, loss.item(), list(indices))])
    elif not bad:
        return
    else:
        seen = [(0, loss.item(), list(indices))]
    where = "; ".join(f"rank {rank}: loss {value}, examples {examples}"
                      for rank, value, examples in seen if not math.isfinite(value))
    kept = latest_checkpoint(folder)
    raise NonFiniteLossError(
        f"non-finite loss at step {step} (micro-batch {micro}; {where}); every process stopped. "
        f"Last good checkpoint: {kept if kept else 'none yet'}. Lower the learning rate, check the "
        f"data, or use fp32/bf16 instead of fp16.")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _reference_cache_root() -> Path:
    from .models import cache_dir

    return cache_dir() / "reference_logps"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dpo_lib.train",
        description="Train SFT or a preference loss from a config file. CONFIG is a profile "
                    "(tiny, cpu, gpu, auto) or a YAML recipe; key=value pairs override single "
                    "keys (dotted, or a unique leaf name: output_dir=runs/x loss_type=ipo).")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, overrides=args.overrides)
    result = train(cfg, progress=not args.no_progress)
    if result.metrics:
        last = [m for m in result.metrics if "loss" in m][-1]
        print(f"done: {result.output_dir} (step {last['step']}, loss {last['loss']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
