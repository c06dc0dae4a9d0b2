"""Wall time, user/system CPU seconds and minor page faults of 8 trainer steps (cpu-hh, DPO,
batch 4, max length 512); see page_faults.txt. Run from the repository root with
DPO_HH_RLHF_DIR set."""
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from dpo_lib.core.batches import load_examples
from dpo_lib.core.config import load_config
from dpo_lib.core.models import load_tokenizer
from dpo_lib.training.step import training_step
from dpo_lib.training.train import step_outside_a_run
cfg = load_config("cpu-hh").with_overrides({"train.stage": "preference", "train.batch_size": 4,
    "data.max_length": 512, "data.max_prompt_length": 511, "train.init_adapter": None})
_, ex, _ = load_examples(cfg, load_tokenizer(cfg), "train", 40)
model, _, state = step_outside_a_run(cfg, ex)
for s in range(8):
    r0 = resource.getrusage(resource.RUSAGE_SELF); t = time.perf_counter()
    training_step(model, [list(range(4 * s, 4 * s + 4))], state)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(f"step {s}: {time.perf_counter() - t:.2f} s wall, user {r1.ru_utime - r0.ru_utime:.2f} sys {r1.ru_stime - r0.ru_stime:.2f}, minor faults {r1.ru_minflt - r0.ru_minflt}")
