"""Seconds to dequantize every 4-bit layer of the cpu profile's SmolLM2 once (what the fused step
does twice a step); see dequantize_all.txt. Run from the repository root with PYTHONPATH=.
"""
import time

from dpo_lib.core.config import load_config
from dpo_lib.core.models import load_model
import bitsandbytes.functional as bnb_functional

from dpo_lib.core.lora import _is_linear4bit, add_lora
cfg = load_config("cpu")
model = add_lora(load_model(cfg), cfg)
layers = [m for m in model.modules() if _is_linear4bit(m)]
print(len(layers), "layers", sum(l.weight.quant_state.shape.numel() for l in layers)/1e6, "M weights")
for rep in range(5):
    t = time.perf_counter()
    for layer in layers:
        bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    print(f"dequantize all: {time.perf_counter()-t:.3f} s")
