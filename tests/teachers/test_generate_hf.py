"""The generate stage with the hf engine on a tiny saved model, in a Ray Data actor pool of 2."""

from __future__ import annotations

from transformers import AutoTokenizer

from teachers.engines import HFEngineConfig
from teachers.generate import GenerateConfig, run
from teachers.render import PromptConfig, render_messages

from .conftest import chains_by_id, make_ctx, strip_timing, synthetic_problems, write_problems


def _hf_cfg(model, **kw) -> GenerateConfig:
    base = dict(engine=HFEngineConfig(model=str(model), text_only=True, batch_size=4), samples_per_problem=3,
                temperature=0.8, max_tokens=16, workers=2, cpus_per_worker=1, batch_size=4, flush_rows=8,
                cache=False)
    return GenerateConfig(**{**base, **kw})


def test_hf_actor_pool_k_samples_ids_tokens_and_row_penalty(ray_local, run_dir, tiny_chat_model, one_torch_thread):
    problems = [{**p, "images": None, "needs_image": False} for p in synthetic_problems(6)]
    for i, p in enumerate(problems):  # as assess writes them: a per-row penalty and budget for some rows
        p["repetition_penalty"] = 1.0 + 0.25 * i if i % 2 == 0 else None
        p["max_tokens"] = 10 + i if i < 3 else None
    write_problems(run_dir / "ingest", problems)
    cfg = _hf_cfg(tiny_chat_model)
    m = run(cfg, make_ctx(run_dir))
    m.check_counts()
    assert m.rows_in == m.kept == 18 and m.metrics["requests"] == 18
    chains = chains_by_id(run_dir / "generate")
    assert len(chains) == 18

    by_problem: dict[str, list] = {}
    for c in chains.values():
        by_problem.setdefault(c["problem_id"], []).append(c)
    assert {p["problem_id"] for p in problems} == set(by_problem)
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    for p in problems:
        rows = sorted(by_problem[p["problem_id"]], key=lambda c: c["sample_idx"])
        assert [c["sample_idx"] for c in rows] == [0, 1, 2]
        assert len({c["seed"] for c in rows}) == 3  # distinct seeds: k distinct samples
        want_pen = p["repetition_penalty"] if p["repetition_penalty"] is not None else cfg.repetition_penalty
        want_max = p["max_tokens"] if p["max_tokens"] is not None else cfg.max_tokens
        msgs = render_messages(p, PromptConfig(), text_only=True)
        n_prompt = len(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for c in rows:
            assert c["sampling"]["repetition_penalty"] == want_pen and c["sampling"]["max_tokens"] == want_max
            assert c["sampling"]["seed"] == c["seed"]
            assert c["prompt_tokens"] == n_prompt
            assert c["finish_reason"] in ("stop", "length") and c["error"] is None and c["simulated"] is False
            if c["finish_reason"] == "length":
                assert c["completion_tokens"] == want_max
            else:
                assert 1 <= c["completion_tokens"] <= want_max

    # Again in a fresh directory, in-process this time: the same chain ids, seeds and texts.
    other = run_dir.parent / "again"
    write_problems(other / "ingest", problems)
    run(cfg.model_copy(update={"workers": 0}), make_ctx(other))
    again = chains_by_id(other / "generate")
    assert {k: strip_timing(v) for k, v in again.items()} == {k: strip_timing(v) for k, v in chains.items()}
