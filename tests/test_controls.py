"""dpo_lib.lessons.controls: a random drop with the filter's count in every kind of pair."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dpo_lib.core.config import CONFIG_DIR, REPO_ROOT, load_config
from dpo_lib.core.data import load_split
from dpo_lib.lessons import controls

KINDS = ["rude"] * 10 + ["wrong"] * 20 + ["evasive"] * 6
FILTER = [0, 1, 2, 3, 10, 11, 30]             # 4 rude, 2 wrong, 1 evasive


def test_the_draw_has_the_filters_count_in_every_kind():
    drawn = controls.stratified_drop(FILTER, KINDS, seed=0)
    assert Counter(KINDS[i] for i in drawn) == Counter({"rude": 4, "wrong": 2, "evasive": 1})
    assert controls.counts_by_kind(drawn, KINDS) == controls.counts_by_kind(FILTER, KINDS)
    assert drawn == sorted(set(drawn)) and all(0 <= i < len(KINDS) for i in drawn)


def test_the_draw_is_seeded():
    draws = {seed: controls.stratified_drop(FILTER, KINDS, seed) for seed in range(5)}
    assert draws[3] == controls.stratified_drop(FILTER, KINDS, 3)           # reproducible
    assert len({tuple(d) for d in draws.values()}) == 5                     # and seed-dependent


def test_the_draw_is_uniform_within_each_kind():
    """Over 4,000 seeds each rude pair is drawn with probability 4/10, each wrong pair 2/20, each
    evasive pair 1/6: every frequency within 5 standard errors of its expectation."""
    seeds = 4000
    hits = np.zeros(len(KINDS))
    for seed in range(seeds):
        hits[controls.stratified_drop(FILTER, KINDS, seed)] += 1
    expected = np.array([{"rude": 4 / 10, "wrong": 2 / 20, "evasive": 1 / 6}[k] for k in KINDS])
    error = np.sqrt(expected * (1 - expected) / seeds)
    assert np.all(np.abs(hits / seeds - expected) < 5 * error)


def test_the_drop_file_records_what_it_is_valid_for():
    content = controls.stratified_drop_file({"pool": len(KINDS), "dropped": FILTER}, KINDS, 2,
                                            made_from="ches/pair_filter.json")
    assert content["dropped"] == controls.stratified_drop(FILTER, KINDS, 2)
    assert (content["pool"], content["source"], content["seed"]) == (36, "bundled", 2)
    assert content["per_kind"] == {"evasive": 1, "rude": 4, "wrong": 2}
    assert content["pool_per_kind"] == {"evasive": 6, "rude": 10, "wrong": 20}
    with pytest.raises(ValueError, match="pool has 35"):
        controls.stratified_drop_file({"pool": 35, "dropped": FILTER}, KINDS, 2)
    with pytest.raises(ValueError, match="outside the pool"):
        controls.stratified_drop(FILTER + [36], KINDS, 0)


def test_the_sweeps_drop_files_match_its_ches_run():
    """The committed control files that configs/sweeps/loss_variants.yaml names: per kind as many
    dropped as the committed CHES run each one names (``stratified_like``) dropped, and each one
    the seeded draw again."""
    for seed in range(3):
        path = CONFIG_DIR / "sweeps" / "loss_variants" / f"strat-s{seed}.json"
        content = json.loads(path.read_text())
        assert not Path(content["stratified_like"]).is_absolute()
        record = json.loads((REPO_ROOT / content["stratified_like"]).read_text())
        pairs, _ = load_split(load_config("cpu"), "train", record["pool"])
        kinds = controls.pair_kinds(pairs)
        assert controls.counts_by_kind(content["dropped"], kinds) == \
            controls.counts_by_kind(record["dropped"], kinds) == content["per_kind"]
        assert content["dropped"] == controls.stratified_drop(record["dropped"], kinds, seed)
        assert content["pool"] == record["pool"] and content["seed"] == seed
