"""The generate stage with the openai engine against a real local server that injects faults."""

from __future__ import annotations

import json

import pytest

from teachers.devserver import DevServer, ServerConfig
from teachers.engines import OpenAIEngineConfig
from teachers.generate import GenerateConfig, run

from .conftest import chains_by_id, make_ctx, strip_timing


@pytest.fixture
def fault_server():
    # Every 4th request fails, in turn: 429, 500, an answer slower than the client's timeout, a dropped connection.
    with DevServer(ServerConfig(fault_every=4, slow_s=3.0)) as srv:
        yield srv


def _cfg(url: str, **kw) -> GenerateConfig:
    engine = OpenAIEngineConfig(base_url=url, model="dev-r1", api_key_env="R1V_TEST_KEY", max_concurrency=4,
                                timeout_s=2.0, max_retries=8)
    base = dict(engine=engine, samples_per_problem=3, max_tokens=200, workers=2, batch_size=6, flush_rows=10)
    return GenerateConfig(**{**base, **kw})


def test_every_chain_once_despite_faults_and_retries_counted(ray_local, run_dir, problems12, fault_server,
                                                             monkeypatch):
    monkeypatch.setenv("R1V_TEST_KEY", "sk-secret-123")
    m = run(_cfg(fault_server.url), make_ctx(run_dir))
    m.check_counts()
    chains = chains_by_id(run_dir / "generate")
    assert len(chains) == 36 == m.rows_in == m.kept
    assert all(c["error"] is None and c["finish_reason"] == "stop" for c in chains.values())
    # every attempt but the last of each chain was a counted retry; every injected fault caused one
    faults = fault_server.stats.faults
    assert set(faults) == {"rate_limit", "server_error", "slow", "drop"}
    assert m.metrics["retries"] == fault_server.stats.requests - 36
    assert m.metrics["retries"] >= sum(faults.values()) > 0
    assert m.metrics["requests"] == 36
    # images reached the server as decodable data URIs: one in every answered request
    assert fault_server.stats.images == fault_server.stats.ok >= 36
    # answers were parsed: reasoning/response split, server token counts kept
    c = next(iter(chains.values()))
    assert c["reasoning"].startswith("I see 1 image(s)") and "\\boxed{" in c["response"]
    assert c["completion_tokens"] == 50 and c["prompt_tokens"] > 0
    # the key went in the header and nowhere else
    assert fault_server.stats.authorization["Bearer sk-secret-123"] == fault_server.stats.requests
    assert "sk-secret-123" not in json.dumps(m.model_dump(mode="json"))
    assert not any("sk-secret-123" in json.dumps(v, default=str) for v in chains.values())


def test_exhausted_retries_are_counted_errors_not_lost_rows(run_dir, problems12):
    with DevServer(ServerConfig(fault_every=2, faults=("server_error",))) as srv:
        cfg = _cfg(srv.url, workers=0, samples_per_problem=2)
        cfg.engine.max_retries = 0
        cfg.engine.max_concurrency = 1
        cfg.engine.timeout_s = 30.0  # only the injected 500s may fail, never a slow machine
        m = run(cfg, make_ctx(run_dir))
    m.check_counts()
    chains = chains_by_id(run_dir / "generate")
    errors = [c for c in chains.values() if c["error"]]
    assert len(chains) == 24 and len(errors) == 12
    assert m.quarantined == {"engine_error:server_error": 12} and m.kept == 12
    assert all(c["finish_reason"] == "error" and c["error"].startswith("server_error:") for c in errors)
    assert m.metrics["errors"] == {"server_error": 12}


def test_reasoning_content_and_cache_rerun_makes_no_request(run_dir, problems12):
    with DevServer(ServerConfig(reasoning_content=True)) as srv:
        cfg = _cfg(srv.url, workers=0)
        cfg.engine.timeout_s = 30.0  # request counts below are exact: no timeout retries
        first = run(cfg, make_ctx(run_dir))
        n_first = srv.stats.requests
        before = chains_by_id(run_dir / "generate")
        # unrelated settings change: a new fingerprint, but every sample is a cache hit
        second = run(cfg.model_copy(update={"flush_rows": 7, "batch_size": 5}), make_ctx(run_dir))
        assert srv.stats.requests == n_first == 36
        after = chains_by_id(run_dir / "generate")
        # a different run seed means new samples: the cache must miss
        run(cfg, make_ctx(run_dir, seed=1))
        assert srv.stats.requests == 72
    assert first.metrics["requests"] == 36 and first.metrics["cache_hits"] == 0
    assert second.metrics["requests"] == 0 and second.metrics["cache_hits"] == 36
    assert {k: strip_timing(v) for k, v in before.items()} == {k: strip_timing(v) for k, v in after.items()}
    c = next(iter(before.values()))
    assert c["reasoning"].startswith("I see 1 image(s)") and c["completion"].startswith("<think>")
    assert c["response"].startswith("The answer is")


def test_engine_called_from_inside_a_running_event_loop():
    import asyncio

    from teachers.engines import GenRequest, make_engine

    with DevServer(ServerConfig(fault_every=3, faults=("rate_limit",))) as srv:
        eng = make_engine(OpenAIEngineConfig(base_url=srv.url, model="m", api_key_env=None))
        reqs = [GenRequest(messages=[{"role": "user", "content": f"q{i}"}], sampling={"seed": i}) for i in range(6)]

        async def inside_loop():  # as in an async actor: the engine must not nest asyncio.run
            return eng.generate(reqs)

        res = asyncio.run(inside_loop())
    assert [r.error for r in res] == [None] * 6 and sum(r.retries for r in res) == srv.stats.faults["rate_limit"] > 0
