"""One preference pair from the file to its loss, through the trainer's own functions, call by call.

    python benchmarks/pair_path.py [-v]          # tests/test_layout.py runs it

Every dpo_lib function called on the pair's way is attributed to its module: reading the file,
tokenizing, the batch order, the cached reference's rows, collation and the forward pass, the
answer log-probs, the loss. Left out: the frames that only route the pair from one stage to the
next (the trainer's loop and step, ``load_examples``), reads of settings (``config``), progress
bars, the adapted layers' own forward inside the model (``lora``'s fused LoRA, as peft's forward
is), and the gradient's way back (calls inside an autograd ``backward``). The reference values
come from the table the reference pass made before training (the same layout, without a graph).
Prints the sequence of modules, the files entered, and the re-entries into a module the pair had
already left; ``-v`` also prints every function.
"""
import os
import sys
import tempfile

os.environ["DPO_PROGRESS"] = "0"
os.environ.setdefault("DPO_CACHE", tempfile.mkdtemp())

from dpo_lib.core.batches import load_examples  # noqa: E402
from dpo_lib.core.config import load_config  # noqa: E402
from dpo_lib.core.layouts import pair_layout  # noqa: E402
from dpo_lib.training import step as S  # noqa: E402
from dpo_lib.training import train as T  # noqa: E402
from dpo_lib.training.reference import reference_pass  # noqa: E402

ROUTING = {"train", "step"}          # modules whose frames hand the pair on
SETTINGS = {"config", "schema", "progress"}
# The adapted layers' own forward (dpo_lib.core.lora.fuse_lora_products) runs inside the model, as
# peft's forward does: part of the forward pass that layouts runs, not a stage of the pair's way.
INSIDE_THE_MODEL = {("lora", "_fused_forward"), ("lora", "_fusable"), ("lora", "forward"),
                    ("lora", "_base_weight"), ("lora", "_is_linear4bit")}


def trace(fn):
    """Run ``fn`` with a profiler; return the dpo_lib calls on the pair's forward way as
    ``(module, function)``."""
    calls, inside_backward = [], []

    def profile(frame, event, arg):
        if frame.f_code.co_name == "backward":
            if event == "call":
                inside_backward.append(frame)
            elif event == "return" and inside_backward:
                inside_backward.pop()
            return
        if event != "call" or inside_backward:
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("dpo_lib"):
            return
        name = module.split(".")[-1]
        if name in ROUTING | SETTINGS or frame.f_code.co_name == "load_examples" \
                or (name, frame.f_code.co_name) in INSIDE_THE_MODEL:
            return
        calls.append((name, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return result, calls


def main() -> None:
    cfg = load_config("tiny", overrides={"train.stage": "preference", "data.train_limit": 8,
                                         "train.batch_size": 8, "train.eval_batch_size": 8,
                                         "train.output_dir": tempfile.mkdtemp()})
    accelerator = S.make_accelerator(cfg)
    model, tokenizer, _ = T.prepare_model(cfg)
    model, optimizer, scheduler = S.prepare_training(cfg, model, accelerator)
    (_, examples, _), reading = trace(lambda: load_examples(cfg, tokenizer, "train", 8))
    reference = reference_pass(model, examples, pair_layout(cfg), 8, progress=False)
    state = S.TrainState(cfg, accelerator, optimizer, scheduler, pair_layout(cfg), examples, 0,
                         reference)
    plan = T.BatchPlan(examples, cfg, accelerator)
    _, stepping = trace(lambda: S.training_step(model, plan.micro_batches(1), state))
    calls = reading + stepping
    sequence = [module for i, (module, _) in enumerate(calls)
                if i == 0 or calls[i - 1][0] != module]
    entered, reentries = [], 0
    for module in sequence:
        reentries += module in entered
        if module not in entered:
            entered.append(module)
    if "-v" in sys.argv:
        print(" ".join(f"{m}.{f}" for m, f in calls))
    print(" -> ".join(sequence))
    print(f"files entered: {len(entered)} ({', '.join(entered)}); re-entries into a module "
          f"already left: {reentries}")


if __name__ == "__main__":
    main()
