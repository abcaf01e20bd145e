"""Scores of an evaluation with k samples per problem: pass@1, pass@k, majority vote (plain Python).

    from trainers.scoring import score_problem, summary
    score = score_problem(problem, graded_samples, verify_cfg)   # one problem's k graded samples
    summary([score, ...])                                        # pass@1, maj@k, pass@k, by subject/difficulty

- pass@1 over k: the share of correct samples, averaged over problems (the unbiased estimator with
  n = k); a sample the engine failed on is a wrong sample, never left out of the denominator.
- majority vote: the extracted answers are grouped by equivalence (filters.verify.check_answer, the
  verifier's own comparison, one answer taken as the other's gold, under its process deadline), after
  a first grouping by surface spelling (filters.equivalence.surface); the largest group wins, a tie goes
  to the group whose first sample came first. The problem counts as solved when the winning group's
  first sample was graded correct. Samples without an answer (no_answer, truncated, engine errors) do
  not vote; a problem with no votes is not solved.
- pass@k: some sample correct.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from filters.verify import VerifyConfig


def _equivalent_groups(answers: list[tuple[int, str]], problem: dict, cfg: VerifyConfig) -> list[list[int]]:
    """Sample indices grouped by equivalent answer, groups in order of their first sample."""
    from filters.equivalence import surface
    from filters.verify import check_shared

    by_surface: dict[str, list[int]] = {}
    reps: dict[str, str] = {}
    for idx, ans in answers:
        key = surface(ans) or ans
        by_surface.setdefault(key, []).append(idx)
        reps.setdefault(key, ans)
    keys = list(by_surface)
    if len(keys) == 1:
        return [by_surface[keys[0]]]
    # every pair of representatives, checked both ways (the verifier takes its first argument as gold)
    pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]]
    items = []
    for a, b in pairs:
        gold = {"answer": reps[a], "answer_type": problem.get("answer_type"), "choices": problem.get("choices")}
        items.append((reps[b], gold))
    verdicts = check_shared(items, cfg)
    parent = {k: k for k in keys}

    def root(k: str) -> str:
        while parent[k] != k:
            k = parent[k]
        return k

    for (a, b), (verdict, *_rest) in zip(pairs, verdicts, strict=True):
        if verdict == "correct":
            ra, rb = root(a), root(b)
            if ra != rb:  # the group is named by its earliest answer
                lo, hi = sorted((ra, rb), key=keys.index)
                parent[hi] = lo
    groups: dict[str, list[int]] = defaultdict(list)
    for k in keys:
        groups[root(k)] += by_surface[k]
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def majority(samples: list[dict], problem: dict, cfg: VerifyConfig | None = None) -> tuple[str | None, int, bool]:
    """(winning answer, its votes, whether it is correct) over graded samples (`pred_answer`, `correct`)."""
    cfg = cfg or VerifyConfig()
    answers = [(i, s["pred_answer"]) for i, s in enumerate(samples) if s.get("pred_answer")
               and s.get("verdict") not in ("engine_error", "truncated")]
    if not answers:
        return None, 0, False
    groups = _equivalent_groups(answers, problem, cfg)
    best = max(groups, key=lambda g: (len(g), -g[0]))
    first = samples[best[0]]
    return first["pred_answer"], len(best), bool(first["correct"])


def score_problem(problem: dict, samples: list[dict], cfg: VerifyConfig | None = None) -> dict:
    """One problem's row of the `scores` table from its graded samples (all k of them, errors included)."""
    k = len(samples)
    n_correct = sum(bool(s["correct"]) for s in samples)
    answer, votes, maj_ok = majority(samples, problem, cfg) if k > 1 else (
        samples[0]["pred_answer"], int(bool(samples[0]["pred_answer"])), bool(samples[0]["correct"]))
    return {
        "problem_id": problem["problem_id"],
        "subject": problem.get("subject"),
        "difficulty": problem.get("difficulty"),
        "answer": problem.get("answer"),
        "samples": k,
        "correct_samples": n_correct,
        "engine_errors": sum(s.get("verdict") == "engine_error" for s in samples),
        "pass1": n_correct / k if k else 0.0,
        "pass_k": n_correct > 0,
        "majority_answer": answer,
        "majority_votes": votes,
        "majority_correct": maj_ok,
    }


def _means(scores: list[dict]) -> dict[str, float]:
    n = len(scores)
    return {
        "n": n,
        "pass1": sum(s["pass1"] for s in scores) / n if n else 0.0,
        "majority": sum(s["majority_correct"] for s in scores) / n if n else 0.0,
        "pass_k": sum(s["pass_k"] for s in scores) / n if n else 0.0,
    }


def grouped(scores: list[dict], key: str) -> dict[str, dict[str, float]]:
    """{group: {n, pass1, majority, pass_k, accuracy (= pass1)}} by `key` (None -> "unknown")."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for s in scores:
        g = s.get(key)
        groups["unknown" if g is None else str(g)].append(s)
    out = {}
    for g, rows in sorted(groups.items()):
        m = _means(rows)
        out[g] = {**m, "accuracy": m["pass1"]}
    return out


def summary(scores: list[dict]) -> dict[str, Any]:
    """pass@1, maj@k and pass@k over problems, and the same per subject and per difficulty."""
    m = _means(scores)
    return {**m, "accuracy": m["pass1"], "samples": max((s["samples"] for s in scores), default=0),
            "engine_error_samples": sum(s["engine_errors"] for s in scores),
            "by_subject": grouped(scores, "subject"), "by_difficulty": grouped(scores, "difficulty")}
