"""Checks that need several processes, started by tests through torchrun (gloo on CPU, NCCL on GPUs):

    torchrun --nproc_per_node 2 tests/distributed_checks.py device OUT_DIR
    torchrun --nproc_per_node 2 tests/distributed_checks.py train OUT_DIR [--sgd] [--nan-rank R
        --nan-call N] key=value ...

``device``: each process loads the tiny model in NF4 and writes ``rank<r>.json`` with the device
its weights are on, its accelerator's device, and (on CPU, with CUDA pretended) the device map that
:func:`dpo_lib.core.models.load_model` asks transformers for. ``train``: a tiny training run
(``key=value`` overrides), with test-only patches: ``--sgd`` (plain SGD, so one step's update is
the gradient itself), ``--nan-rank``/``--nan-call`` (a NaN SFT loss on one process only, at its
N-th micro-batch). A NonFiniteStepError is written to ``rank<r>.error`` before every process
meets at a barrier, so that the test sees what each process raised.
"""
import argparse
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dpo_lib.core import models  # noqa: E402
from dpo_lib.training import train as train_lib  # noqa: E402
from dpo_lib.training import step as step_lib  # noqa: E402
from dpo_lib.core.layouts import SequenceLayout  # noqa: E402
from dpo_lib.core.config import load_config  # noqa: E402


def check_device(out: Path) -> None:
    import transformers
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    cfg = load_config("tiny", overrides={"model.quantization": "nf4",
                                         "model.compute_dtype": "float32"})
    model = models.load_model(cfg)
    devices = sorted({str(p.device) for p in model.parameters()})
    target = accelerator.device                  # cpu (cpu:0 under gloo) or cuda:<local rank>
    record = {"rank": accelerator.process_index, "weights": devices, "accelerator": str(target),
              "on_accelerator_device": all(p.device.type == target.type and
                                           (p.device.index or 0) == (target.index or 0)
                                           for p in model.parameters())}
    if not torch.cuda.is_available():   # what load_model would ask for on a machine with GPUs
        seen = {}

        def capture(*args, **kwargs):
            seen["device_map"] = kwargs.get("device_map")
            return torch.nn.Linear(1, 1)

        with mock.patch.object(torch.cuda, "is_available", lambda: True), \
                mock.patch.object(transformers.AutoModelForCausalLM, "from_pretrained", capture):
            models.load_model(cfg)
        record["device_map_with_cuda"] = seen["device_map"]
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
    accelerator.end_training()


def run_training(out: Path, args) -> None:
    rank = int(os.environ.get("RANK", 0))
    if args.sgd:
        step_lib.make_optimizer = lambda cfg, parameters: torch.optim.SGD(
            parameters, lr=step_lib.learning_rate(cfg))
    if args.nan_rank == rank:
        original, calls = SequenceLayout.nll, [0]

        def poisoned(self, model, batch):
            calls[0] += 1
            nll, counts = original(self, model, batch)
            return (nll * float("nan") if calls[0] == args.nan_call else nll), counts

        SequenceLayout.nll = poisoned
    cfg = load_config("tiny", overrides=args.overrides)
    try:
        train_lib.train(cfg, progress=False)
    except step_lib.NonFiniteStepError as error:
        (out / f"rank{rank}.error").write_text(str(error))
        torch.distributed.barrier()
        raise


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("device", "train"))
    parser.add_argument("out")
    parser.add_argument("--sgd", action="store_true")
    parser.add_argument("--nan-rank", type=int, default=-1)
    parser.add_argument("--nan-call", type=int, default=0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "device":
        check_device(out)
    else:
        run_training(out, args)


if __name__ == "__main__":
    main()
