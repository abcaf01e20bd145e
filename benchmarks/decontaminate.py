"""Decontamination lookup speed: our n-gram inverted index against the pairwise comparison it replaces.

    python benchmarks/decontaminate.py [--pool 3000] [--repeat 3]

Data: a pool of synthetic questions plus the 304 MATH-V testmini questions (so some are contaminated),
checked against MATH-V as the eval set. Baseline: every problem's n-gram set intersected with every
eval item's (precomputed) set, the obvious O(pool x eval) loop. Ours: filters.decontaminate.EvalIndex
(index built once, only eval items sharing an n-gram are touched). Both find the same matches (checked;
the index also catches exact copies shorter than n words, which have no n-gram),
best of --repeat runs; prints problems/s and the speed-up ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "mathv-testmini"


def baseline(questions: list[str], items: list[tuple], n: int, threshold: float) -> list[int | None]:
    from filters.decontaminate import ngrams, normalize

    eval_sets = [ngrams(normalize(it[2]), n) for it in items]
    out = []
    for q in questions:
        words = normalize(q)
        g = ngrams(words, n)
        best, best_i = 0.0, None
        for i, e in enumerate(eval_sets):
            if not g or not e:
                continue
            ov = len(g & e) / min(len(g), len(e))
            if ov > best:
                best, best_i = ov, i
        out.append(best_i if best >= threshold else None)
    return out


def ours(questions: list[str], items: list[tuple], n: int, threshold: float) -> list[int | None]:
    from filters.decontaminate import EvalIndex

    index = EvalIndex(items, n, min_words=n)  # min_words=n: the baseline has no short-text rule either
    out = []
    for q in questions:
        found = index.matches(q, threshold)
        out.append(found[0][0] if found else None)
    return out


def main() -> None:
    from pipeline.synthetic import make_problem

    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    mathv = [json.loads(line) for line in open(DATA / "testmini.jsonl")]
    items = [("mathv", r["id"], r["problem"]) for r in mathv]
    questions = [make_problem(0, i)["question"] for i in range(args.pool)] + [r["problem"] for r in mathv]
    times = {}
    results = {}
    for name, fn in (("baseline", baseline), ("ours", ours)):
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            results[name] = fn(questions, items, 8, 0.5)
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    from filters.decontaminate import normalize

    hits = [r is not None for r in results["ours"]]
    for q, a, b in zip(questions, results["baseline"], results["ours"], strict=True):
        # Same matches, except that the index also catches exact copies shorter than n words.
        assert (a is None) == (b is None) or (a is None and len(normalize(q)) < 8), q
    n = len(questions)
    print(f"decontaminate | {n} problems x {len(items)} eval items | {sum(hits)} contaminated | "
          f"pairwise {n / times['baseline']:,.0f} problems/s | index {n / times['ours']:,.0f} problems/s | "
          f"ratio {times['baseline'] / times['ours']:.1f}")


if __name__ == "__main__":
    main()
