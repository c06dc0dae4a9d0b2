"""Greedy answers of the cpu profile's base model to notebook 03's 48 held-out prompts in batches of
8 and of 48, with the NF4 weights and with them dequantized once (benchmarks/step_levers.py):
seconds, and how many answers equal those of batches of 8 in NF4. Output: generation_batch.txt."""
import os
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
os.environ.setdefault("DPO_PROGRESS", "0")
from dpo_lib.core.config import load_config
from dpo_lib.core.models import load_model, load_tokenizer
from dpo_lib.core import data
from dpo_lib.lessons.generate import generate_answers
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from step_levers import cache_dequantized_base
cfg = load_config("cpu")
tok = load_tokenizer(cfg)
test_pairs, _ = data.load_split(cfg, "test", cfg.data.test_limit)
SCORE = [p["prompt"] for p in test_pairs[:48]]
t=time.perf_counter(); model = load_model(cfg); print("load", time.perf_counter()-t, flush=True)
res = {}
for name, bs in [("nf4-b8", 8), ("nf4-b48", 48)]:
    t=time.perf_counter(); res[name] = generate_answers(model, tok, SCORE, 40, batch_size=bs); print(name, round(time.perf_counter()-t,1), flush=True)
t=time.perf_counter(); n=cache_dequantized_base(model); print("dequant", n, time.perf_counter()-t)
for name, bs in [("deq-b8", 8), ("deq-b48", 48)]:
    t=time.perf_counter(); res[name] = generate_answers(model, tok, SCORE, 40, batch_size=bs); print(name, round(time.perf_counter()-t,1), flush=True)
for k in res: print(k, sum(a==b for a,b in zip(res[k], res["nf4-b8"])), "of 48 equal to nf4-b8")
