"""Padding of an epoch's batches grouped by the longer answer (before a3606f6) and by the packed
row (train.group_length=row), in the packed layout, collated as the trainer collates them.

    DPO_HH_RLHF_DIR=../shared/data/hh-rlhf python grouping_padding.py

The bundled `cpu` training set (320 pairs, batches of 8), cpu-hh's training split (batches of 8)
and make bench's 48 pairs (batches of 4; its warm-up batch and 4 timed batches too).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dpo_lib.core.batches import batch_indices, example_length, load_examples, tokenize_pairs  # noqa: E402
from dpo_lib.core.config import load_config  # noqa: E402
from dpo_lib.core.data import load_preference_pairs  # noqa: E402
from dpo_lib.core.hub import hh_rlhf_file  # noqa: E402
from dpo_lib.core.layouts import PackedLayout, real_tokens  # noqa: E402
from dpo_lib.core.models import load_tokenizer  # noqa: E402

LAYOUT = PackedLayout()


def epoch(examples, batch, seed, lengths):
    batches = batch_indices(examples, batch, True, seed, lengths)
    counts = [real_tokens(LAYOUT.collate([examples[i] for i in b], 0)) for b in batches]
    return batches, counts


def report(name, examples, batch, seed, first=None):
    print(f"{name}: {len(examples)} pairs, batches of {batch}")
    for key, lengths in (("longer answer", [example_length(e) for e in examples]),
                         ("packed row   ", [LAYOUT.length(e) for e in examples])):
        _, counts = epoch(examples, batch, seed, lengths)
        real, positions = sum(c[0] for c in counts), sum(c[1] for c in counts)
        line = f"  grouped by the {key}: {positions} positions for {real} tokens, padding {1 - real / positions:.1%}"
        if first:
            head = counts[:first]
            line += (f"; first {first} batches (tokens, positions) {head}, the last {first - 1}: "
                     f"{sum(c[1] for c in head[1:])} positions for {sum(c[0] for c in head[1:])} tokens")
        print(line)


cfg = load_config("cpu")
_, bundled, _ = load_examples(cfg, load_tokenizer(cfg), "train", cfg.data.train_limit)
report("cpu (bundled)", bundled, cfg.train.batch_size, cfg.seed * 1000)
hh = load_config("cpu-hh")
_, real, _ = load_examples(hh, load_tokenizer(hh), "train", None)
report("cpu-hh (training split)", real, hh.train.batch_size, hh.seed * 1000)
# make bench's pairs: the first 48 of the file whose both answers fit 512 tokens (trl_compare.py)
pairs, _ = load_preference_pairs(str(hh_rlhf_file(download=False)), split=None)
examples, _ = tokenize_pairs(pairs, load_tokenizer(hh), 10**6, 10**6 - 1)
fitting = [e for e in examples
           if max(len(e["chosen_input_ids"]), len(e["rejected_input_ids"])) <= 512][:48]
report("make bench (48 pairs)", fitting, 4, 0, first=5)
