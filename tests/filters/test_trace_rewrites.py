"""Every traces-dev trace rewritten into the other formats must get the same verdict and keep decision.

Rewrites (each built from the trace's own reasoning and response):
  think        `<think> … </think> response`         think_implicit  `… </think> response` (template opened it)
  sky          Sky-T1 markers around both parts       sky_no_end      the same without `<|end_of_solution|>`
  plain        every marker stripped                  two_samples     the trace twice, joined by a separator
  cut_tail     the trace cut mid-sentence at about 60% of its text: always truncated
  cut_second   the trace, then a second sample cut mid-sentence: the cut sample truncated, the first as before
Loop traces in the set were cut at the length limit inside their thought span: where a rewrite removes the
span's markers the filter gets the engine's `finish_reason="length"` with them, as real engines report.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from filters.deadline import DeadlinePool
from filters.external import ChainsSourceConfig, load_chains
from filters.extract import split_chain
from filters.filter import FilterConfig, _problem_columns, score_batch
from filters.verify import check_answer

COLUMNS = {"question": "problem", "answer": "gold_answer", "trace": "trace", "id": "id", "teacher": "model"}
SEP = "\n\n=== Sample 2 ===\n\n"


def _cut_mid_sentence(text: str, at: float = 0.6) -> str:
    """The text up to about `at` of its length, ending inside a sentence (after a word, before its end)."""
    i = int(len(text) * at)
    m = re.search(r"[A-Za-z]{3,} [A-Za-z]{3,} [a-z]{2,}", text[i:])
    end = i + (m.end() if m else 0)
    cut = text[:end]
    return cut if cut.rstrip()[-1:].isalpha() else cut.rstrip() + " and then"


def rewrite(trace: str, kind: str) -> tuple[str, bool]:
    """(text, open_at_length): the trace in another format; open_at_length marks a trace that was cut at
    the length limit whose rewrite lost the markers that showed it."""
    s = split_chain(trace)
    open_ = not s.closed
    r, a = s.reasoning, s.response
    if kind == "think":
        return (f"<think>\n{r}" if open_ else f"<think>\n{r}\n</think>\n\n{a}"), False
    if kind == "think_implicit":
        return (r if open_ else f"{r}\n</think>\n\n{a}"), open_
    if kind == "sky":
        body = f"<|begin_of_thought|>\n\n{r}"
        return (body if open_ else f"{body}\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n{a}\n\n<|end_of_solution|>"), False
    if kind == "sky_no_end":
        body = f"<|begin_of_thought|>\n\n{r}"
        return (body if open_ else f"{body}\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n{a}"), False
    if kind == "plain":
        return (r if open_ else f"{r}\n\n{a}"), open_
    if kind == "two_samples":
        return f"{trace}{SEP}{trace}", open_
    if kind == "cut_tail":
        return _cut_mid_sentence(trace), False
    if kind == "cut_second":
        return f"{trace}{SEP}{_cut_mid_sentence(trace)}", False
    raise ValueError(kind)


KINDS = ("think", "think_implicit", "sky", "sky_no_end", "plain", "two_samples", "cut_tail", "cut_second")


def _score(path, tmp_path, name: str, samples: str = "each") -> list[dict]:
    src = ChainsSourceConfig(path=str(path), columns={**COLUMNS, "finish_reason": "finish_reason"}, samples=samples)
    loaded = load_chains(src)
    problems = {p["problem_id"]: p for p in loaded.problems.to_pylist()}
    rows = _problem_columns(loaded.chains, problems).to_pylist()
    cfg = FilterConfig(workers=0)
    with DeadlinePool(check_answer, timeout_s=cfg.verify.timeout_s) as pool:
        return score_batch(rows, cfg, pool)


@pytest.fixture(scope="module")
def scored(traces_path, tmp_path_factory):
    import json

    tmp = tmp_path_factory.mktemp("rewrites")
    source = [json.loads(line) for line in traces_path.read_text().splitlines() if line.strip()]
    out = {"original": _score(traces_path, tmp, "original")}
    for kind in KINDS:
        rows = []
        for s in source:
            text, at_length = rewrite(s["trace"], kind)
            rows.append({**s, "trace": text, "finish_reason": "length" if at_length else None})
        p = tmp / f"{kind}.jsonl"
        p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        out[kind] = _score(p, tmp, kind)
        if kind in ("two_samples", "cut_second"):
            out[f"{kind}_last"] = _score(p, tmp, kind, samples="last_complete")
    return source, out


def confusion(source: list[dict], rows: list[dict]) -> Counter:
    return Counter((r["verdict"], bool(s["source_is_correct"])) for s, r in zip(source, rows, strict=True))


def _by_sample(rows: list[dict], idx: int) -> list[dict]:
    return [r for r in rows if r["sample_idx"] == idx]


@pytest.mark.parametrize("kind", ["think", "think_implicit", "sky", "sky_no_end", "plain"])
def test_same_verdicts_and_keep_decisions_in_every_format(scored, kind):
    source, out = scored
    orig, new = out["original"], out[kind]
    assert len(new) == len(orig) == len(source)
    diff = [(s["id"], o["verdict"], n["verdict"], n["verify_detail"]) for s, o, n in zip(source, orig, new, strict=True)
            if (o["verdict"], o["keep"]) != (n["verdict"], n["keep"])]
    assert diff == [], diff[:5]
    assert confusion(source, new) == confusion(source, orig)
    fmt = {"think": "think", "think_implicit": "think", "sky": "sky", "sky_no_end": "sky", "plain": "plain"}[kind]
    for s, r in zip(source, new, strict=True):
        # a think span cut before its close, written without the opening tag, carries no marker at all
        cut_implicit = kind == "think_implicit" and not s["has_end_marker"]
        assert r["trace_format"] == ("plain" if cut_implicit else fmt), s["id"]


def test_two_samples_each_judged_alike(scored):
    source, out = scored
    orig, rows = out["original"], out["two_samples"]
    for idx in (0, 1):
        half = _by_sample(rows, idx)
        assert [(r["verdict"], r["keep"]) for r in half] == [(o["verdict"], o["keep"]) for o in orig]
    last = out["two_samples_last"]
    assert [(r["verdict"], r["keep"]) for r in last] == [(o["verdict"], o["keep"]) for o in orig]


def test_a_trace_cut_mid_sentence_is_truncated(scored):
    _source, out = scored
    rows = out["cut_tail"]
    assert Counter(r["verdict"] for r in rows) == {"truncated": len(rows)}
    assert not any(r["keep"] for r in rows)


def test_a_cut_tail_sample_is_never_clean(scored):
    _source, out = scored
    orig, rows = out["original"], out["cut_second"]
    first, second = _by_sample(rows, 0), _by_sample(rows, 1)
    assert [(r["verdict"], r["keep"]) for r in first] == [(o["verdict"], o["keep"]) for o in orig]
    assert {r["verdict"] for r in second} == {"truncated"}
    # last_complete takes the first sample wherever the second one is cut (and the first one is whole)
    last = out["cut_second_last"]
    assert [(r["verdict"], r["keep"]) for r in last] == [(o["verdict"], o["keep"]) for o in orig]


def test_every_truncated_trace_is_looping_too(scored):
    """Loop detection holds in every format: the cut-off loop traces are all flagged."""
    source, out = scored
    for kind in ("think", "sky", "plain", "sky_no_end"):
        for s, r in zip(source, out[kind], strict=True):
            assert r["loop_detected"] == (not s["has_end_marker"]), (kind, s["id"])
