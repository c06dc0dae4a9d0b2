"""Controls for a pair filter: drop as many pairs of each kind as the filter did, at random.

The CHES filter (:mod:`dpo_lib.training.ches`) drops the pairs it scores highest, and on the
bundled set those are not spread evenly over the kinds of pair: of a pool of 400 it dropped 40 of
109 *rude* pairs but 26 of 186 *wrong* and 14 of 105 *evasive* ones (the kind of a pair is what
its rejected answer does wrong, by the bundled checker). A uniform random drop of 80 (the
``random`` filter) controls for "fewer, other pairs", not for "fewer rude pairs". The control that
does: within each kind ``k``, drop ``c_k`` pairs uniformly at random, ``c_k`` the number of pairs
of kind ``k`` the filter dropped::

    kinds [N] (one label per pool index), filter's dropped D
    c_k = #{i in D : kinds[i] = k}
    control drop = union over k of a uniform c_k-subset of {i : kinds[i] = k}  (seeded)

The trainer knows no kinds (the training wing may not read the lessons): the draw is written into a
JSON file that a run names with ``data.pair_filter=file`` and ``data.pair_filter_file``::

    python -m dpo_lib.lessons.controls data/example-runs/cpu-variants/ches-s0/pair_filter.json \\
        --seeds 0 1 2 --out configs/sweeps/loss_variants --profile cpu
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np


def pair_kinds(pairs) -> list[str]:
    """The kind of each bundled pair: its rejected answer's label by the bundled checker
    (:func:`dpo_lib.lessons.bundled.judge_response`: rude, wrong, evasive)."""
    from .bundled import judge_response

    return [judge_response(pair["prompt"], pair["rejected"]).label for pair in pairs]


def counts_by_kind(indices, kinds) -> dict[str, int]:
    """How many of ``indices`` fall in each kind (kinds with none are left out)."""
    return dict(sorted(Counter(kinds[i] for i in indices).items()))


def stratified_drop(dropped, kinds, seed: int) -> list[int]:
    """A seeded draw of as many pool indices per kind as ``dropped`` has, uniform within each kind.

    ``dropped``: the filter's dropped indices; ``kinds``: one label per pool index. Returns the
    drawn indices, sorted. Kinds are drawn in sorted order from one ``numpy`` generator seeded by
    ``seed``: the same arguments give the same draw.
    """
    kinds = list(kinds)
    if any(not 0 <= i < len(kinds) for i in dropped):
        raise ValueError(f"dropped names indices outside the pool of {len(kinds)}")
    rng = np.random.default_rng(seed)
    drawn = []
    for kind, count in counts_by_kind(dropped, kinds).items():
        members = np.array([i for i, k in enumerate(kinds) if k == kind])
        drawn += rng.choice(members, size=count, replace=False).tolist()
    return sorted(int(i) for i in drawn)


def stratified_drop_file(filter_record: dict, kinds, seed: int, source: str = "bundled",
                         made_from: str | None = None) -> dict:
    """The JSON-ready content of a ``data.pair_filter_file``: the draw of :func:`stratified_drop`
    matched to ``filter_record`` (a run's ``pair_filter.json``: its ``pool`` and ``dropped``),
    with the pool size and data source it is valid for and the counts per kind."""
    if filter_record["pool"] != len(kinds):
        raise ValueError(f"the filter's pool has {filter_record['pool']} pairs, kinds "
                         f"{len(kinds)}")
    drawn = stratified_drop(filter_record["dropped"], kinds, seed)
    return {"dropped": drawn, "pool": len(kinds), "source": source, "seed": seed,
            "stratified_like": made_from, "per_kind": counts_by_kind(drawn, kinds),
            "pool_per_kind": dict(sorted(Counter(kinds).items()))}


def main(argv=None) -> int:
    from ..core.config import load_config
    from ..core.data import load_split

    parser = argparse.ArgumentParser(prog="python -m dpo_lib.lessons.controls",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("record", type=Path, help="the filter run's pair_filter.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for strat-s<seed>.json")
    parser.add_argument("--profile", default=None, help="whose data the pool is read from")
    args = parser.parse_args(argv)
    cfg = load_config(args.profile)
    record = json.loads(args.record.read_text())
    pairs, _ = load_split(cfg, "train", record["pool"])
    kinds = pair_kinds(pairs)
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        content = stratified_drop_file(record, kinds, seed, str(cfg.data.source),
                                       made_from=str(args.record))
        path = args.out / f"strat-s{seed}.json"
        path.write_text(json.dumps(content) + "\n")
        print(f"{path}: {len(content['dropped'])} of {content['pool']} dropped, "
              f"{content['per_kind']} (the filter: {counts_by_kind(record['dropped'], kinds)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
