"""40 preference steps of the cpu profile's IPO run from the SFT adapter, fused LoRA on or off:
the sum of the steps' seconds and the final loss."""
import json, os, statistics, sys, tempfile, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3])); os.environ["DPO_PROGRESS"] = "0"
from dpo_lib.core.config import load_config
from dpo_lib.training import train as trainer
fused = sys.argv[1] == "fused"
loss = sys.argv[2]
with tempfile.TemporaryDirectory() as out:
    cfg = load_config("cpu", overrides={"train.stage": "preference", "train.loss_type": loss,
        "train.init_adapter": sys.argv[3], "train.output_dir": out,
        "train.eval_every": 0, "train.save_every": 0, "model.fused_lora": fused,
        **({"train.beta": 0.5} if loss == "ipo" else {})})
    t = time.perf_counter(); r = trainer.train(cfg, progress=False); wall = time.perf_counter() - t
    steps = [m for m in r.metrics if "step_seconds" in m]
    ss = [m["step_seconds"] for m in steps]
    print(json.dumps({"fused": fused, "loss": loss, "steps": len(ss), "sum_step_s": round(sum(ss), 1),
                      "median_step_s": round(statistics.median(ss), 3), "wall_s": round(wall, 1),
                      "last_loss": steps[-1]["loss"], "first_loss": steps[0]["loss"]}), flush=True)
