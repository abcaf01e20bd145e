"""The generate stage with `engine: vllm` through ray.data.llm on local Ray (tiny R1-style text teacher).

One engine run serves the module: k samples as k rows with distinct seeds, the assess stage's per-row
repetition penalty and max_tokens, `length` read from token counts, an over-long prompt failing in
the engine as an error chain, and a re-run served from the cache without starting an engine.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own venv (make venv-vllm)")

from transformers import AutoTokenizer  # noqa: E402

from pipeline.rundir import read_table  # noqa: E402
from teachers.engines import VLLMEngineConfig  # noqa: E402
from teachers.engines.vllm import chat_messages  # noqa: E402
from teachers.generate import GenerateConfig, run  # noqa: E402
from teachers.render import PromptConfig, render_messages  # noqa: E402
from tests.teachers.conftest import chains_by_id, make_ctx, strip_timing, write_problems  # noqa: E402

from .conftest import ENGINE_KW, text_problems  # noqa: E402

pytestmark = pytest.mark.vllm

K = 3


def _cfg(model, cache_dir, **kw) -> GenerateConfig:
    base = dict(engine=VLLMEngineConfig(model=str(model), text_only=True, **ENGINE_KW), samples_per_problem=K,
                temperature=0.8, max_tokens=24, workers=1, batch_size=8, flush_rows=6, cache_dir=str(cache_dir))
    return GenerateConfig(**{**base, **kw})


def _problems():
    problems = text_problems(5)
    for i, p in enumerate(problems):  # as assess writes them: a per-row penalty and budget for some rows
        p["repetition_penalty"] = 1.0 + 0.3 * i if i % 2 == 0 else None
        p["max_tokens"] = 8 + 2 * i if i < 3 else None
    # far past max_model_len (512): vLLM refuses it at input validation, a per-row error
    bad = {**text_problems(1, seed=7)[0], "problem_id": "too-long"}
    bad["question"] = " ".join(["the triangle has side length 12 and area 30"] * 120)
    return problems, bad


@pytest.fixture(scope="module")
def first_run(ray_gpu, r1_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    run_dir = root / "runs" / "a"
    problems, bad = _problems()
    write_problems(run_dir / "ingest", problems + [bad])
    cfg = _cfg(r1_model, root / "cache")
    m = run(cfg, make_ctx(run_dir))
    return {"root": root, "run_dir": run_dir, "cfg": cfg, "m": m, "problems": problems, "bad": bad}


def test_k_samples_seeds_row_sampling_and_token_counts(first_run, r1_model):
    m, cfg, problems = first_run["m"], first_run["cfg"], first_run["problems"]
    m.check_counts()
    n = (len(problems) + 1) * K
    assert m.rows_in == n and m.metrics["requests"] == n and m.metrics["cache_hits"] == 0
    chains = chains_by_id(first_run["run_dir"] / "generate")
    assert len(chains) == n
    tok = AutoTokenizer.from_pretrained(r1_model)
    by_problem: dict[str, list] = {}
    for c in chains.values():
        by_problem.setdefault(c["problem_id"], []).append(c)
    for p in problems:
        rows = sorted(by_problem[p["problem_id"]], key=lambda c: c["sample_idx"])
        assert [c["sample_idx"] for c in rows] == list(range(K))
        assert len({c["seed"] for c in rows}) == K
        assert len({c["completion"] for c in rows}) > 1, "distinct seeds should sample distinct chains"
        want_pen = p["repetition_penalty"] if p["repetition_penalty"] is not None else cfg.repetition_penalty
        want_max = p["max_tokens"] if p["max_tokens"] is not None else cfg.max_tokens
        # the prompt the engine saw: the R1 template over plain-string content
        msgs = chat_messages(render_messages(p, PromptConfig(), text_only=True))
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        n_prompt = len(tok(text, add_special_tokens=False)["input_ids"])
        for c in rows:
            assert c["sampling"]["repetition_penalty"] == pytest.approx(want_pen)
            assert c["sampling"]["max_tokens"] == want_max and c["sampling"]["seed"] == c["seed"]
            assert c["error"] is None and c["simulated"] is False and c["teacher"] == str(r1_model)
            assert c["prompt_tokens"] == n_prompt
            assert 1 <= c["completion_tokens"] <= want_max
            assert c["finish_reason"] == ("length" if c["completion_tokens"] == want_max else "stop")
            assert c["completion"] and c["latency_s"] >= 0
    finish = m.metrics["finish_reasons"]
    assert finish.get("length", 0) > 0  # random weights rarely stop within 8-24 tokens


def test_inference_error_becomes_error_chains(first_run):
    m, bad = first_run["m"], first_run["bad"]
    chains = chains_by_id(first_run["run_dir"] / "generate")
    failed = [c for c in chains.values() if c["problem_id"] == bad["problem_id"]]
    assert len(failed) == K
    for c in failed:
        assert c["finish_reason"] == "error" and c["error"].startswith("inference_error: ")
        assert "512" in c["error"] or "max_model_len" in c["error"] or "longer" in c["error"], c["error"]
        assert c["completion"] is None and c["completion_tokens"] == 0
    assert m.kept == len(chains) - K
    assert m.quarantined == {"engine_error:inference_error": K}
    assert m.metrics["errors"] == {"inference_error": K}


def test_rerun_is_served_by_the_cache_without_an_engine(first_run):
    """A fresh run directory, the same cache: every successful chain comes back, no engine starts."""
    root, cfg, problems = first_run["root"], first_run["cfg"], first_run["problems"]
    other = root / "runs" / "b"
    write_problems(other / "ingest", problems)
    m = run(cfg, make_ctx(other))
    m.check_counts()
    assert m.metrics["requests"] == 0 and m.metrics["cache_hits"] == len(problems) * K
    again = chains_by_id(other / "generate")
    first = chains_by_id(first_run["run_dir"] / "generate")
    assert {k: strip_timing(v) for k, v in again.items()} == {k: strip_timing(first[k]) for k in again}
    assert read_table(other / "generate").num_rows == len(problems) * K
