"""The openai engine on the official client: continuous concurrency, bounded waits, sampling extensions
only where the endpoint takes them, one clear error for what every request would fail on, and no key
from the environment in any manifest or log."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from teachers.devserver import DevServer, ServerConfig
from teachers.engines import GenRequest, OpenAIEngineConfig, make_engine
from teachers.engines.openai import EngineRejected
from teachers.generate import GenerateConfig, run

from .conftest import chains_by_id, make_ctx


def _engine(url: str, **kw) -> OpenAIEngineConfig:
    return OpenAIEngineConfig(**{"base_url": url, "model": "dev-r1", "api_key_env": None, "timeout_s": 30.0, **kw})


def _reqs(n: int, **sampling) -> list[GenRequest]:
    return [GenRequest(messages=[{"role": "user", "content": f"q{i}"}],
                       sampling={"max_tokens": 100, "seed": i, **sampling}) for i in range(n)]


def test_a_straggler_does_not_idle_the_other_slots(run_dir, problems12):
    """Request 1 takes 2.5 s; 4 slots, batches of 4 requests. With batches in flight together the other
    35 requests are all answered while the straggler runs; one batch at a time would hold 3 slots idle
    until it ends (the straggler would finish 4th)."""
    with DevServer(ServerConfig(slow_requests=(1,), slow_s=2.5, latency_s=0.02)) as srv:
        cfg = GenerateConfig(engine=_engine(srv.url, max_concurrency=4), samples_per_problem=3, workers=0,
                             batch_size=4, concurrent_batches=4, max_tokens=100)
        m = run(cfg, make_ctx(run_dir))
        assert m.kept == 36 and srv.stats.requests == 36
        assert srv.stats.finished[-1] == 1, srv.stats.finished
    # the same with one batch at a time: the straggler's batch-mates wait for it
    with DevServer(ServerConfig(slow_requests=(1,), slow_s=2.5, latency_s=0.02)) as srv:
        seq = cfg.model_copy(update={"concurrent_batches": 1, "cache": False,
                                     "engine": _engine(srv.url, max_concurrency=4)})
        run(seq, make_ctx(run_dir))
        assert srv.stats.finished.index(1) < 8


def test_ray_workers_run_several_batches_at_once(ray_local, run_dir, problems12):
    with DevServer(ServerConfig(slow_requests=(1,), slow_s=3.0, latency_s=0.02)) as srv:
        cfg = GenerateConfig(engine=_engine(srv.url, max_concurrency=4), samples_per_problem=3, workers=1,
                             batch_size=4, concurrent_batches=4, max_tokens=100)
        m = run(cfg, make_ctx(run_dir))
        assert m.kept == 36
        assert srv.stats.finished.index(1) >= 20, srv.stats.finished


def test_a_request_past_its_deadline_is_a_counted_error():
    with DevServer(ServerConfig(slow_requests=(2,), slow_s=3.0)) as srv:
        eng = make_engine(_engine(srv.url, deadline_s=1.0, max_retries=0))
        try:
            t0 = time.perf_counter()
            res = eng.generate(_reqs(3))
            assert time.perf_counter() - t0 < 2.9
        finally:
            eng.close()
    assert [r.error_kind for r in res] == [None, "deadline", None]
    assert res[1].finish_reason == "error" and "deadline_s=1.0" in res[1].error


def test_sampling_extensions_only_where_the_endpoint_takes_them():
    with DevServer() as srv:
        for ext, want in (([], set()), (["repetition_penalty"], {"repetition_penalty"}),
                          (["repetition_penalty", "top_k", "seed"], {"repetition_penalty", "top_k", "seed"})):
            eng = make_engine(_engine(srv.url, sampling_extensions=ext))
            try:
                srv.stats.bodies.clear()
                eng.generate(_reqs(2, repetition_penalty=1.3, top_k=20, temperature=0.6))
            finally:
                eng.close()
            sent = {k for b in srv.stats.bodies for k in ("repetition_penalty", "top_k", "seed") if k in b}
            assert sent == want, ext
            assert all(b["temperature"] == 0.6 and b["max_tokens"] == 100 for b in srv.stats.bodies)


def test_an_endpoint_rejecting_a_field_fails_once_with_what_to_change(run_dir, problems12):
    with DevServer(ServerConfig(reject_fields=("repetition_penalty",))) as srv:
        cfg = GenerateConfig(engine=_engine(srv.url, max_concurrency=4), samples_per_problem=3, workers=0,
                             batch_size=12, repetition_penalty=1.2, max_tokens=100)
        with pytest.raises(EngineRejected) as e:
            run(cfg, make_ctx(run_dir))
        msg = str(e.value)
        assert "repetition_penalty" in msg and "sampling_extensions" in msg and srv.url in msg
        # a handful of requests (the slots in flight), not one failure per chain
        assert srv.stats.requests <= 4
        # told what the endpoint takes, the same run goes through
        ok = cfg.model_copy(update={"engine": _engine(srv.url, max_concurrency=4, sampling_extensions=["seed"])})
        m = run(ok, make_ctx(run_dir))
        assert m.kept == 36


_KEY = "sk-proj-R1VtestKEY0123456789abcdefABCDEF"


def test_no_key_from_the_environment_reaches_a_manifest_config_or_log(tmp_path, caplog, monkeypatch):
    """A key-looking value in the environment, used by generate and by the assess judge, must appear only in
    the Authorization header: not in manifests, the saved config, chains, or any log record (DEBUG included,
    the openai client's own logger too) — and not when the server refuses it either."""
    from pipeline.config import load_config
    from pipeline.runner import Runner

    monkeypatch.setenv("R1V_TEST_KEY", _KEY)
    monkeypatch.setenv("HF_TOKEN", "hf_" + _KEY[8:])
    caplog.set_level(logging.DEBUG)
    with DevServer(ServerConfig(fault_every=5, faults=("rate_limit", "server_error"))) as srv:
        engine = {"kind": "openai", "base_url": srv.url, "api_key_env": "R1V_TEST_KEY", "timeout_s": 30.0}
        cfg = {
            "run": {"name": "keys", "root": str(tmp_path / "runs")},
            "ingest": {"sources": [{"kind": "synthetic", "synthetic": {"n": 6}}]},
            "assess": {"workers": 0, "judge": {"engine": {**engine, "model": "judge"}, "max_retries": 0}},
            "generate": {"engine": {**engine, "model": "dev-r1"}, "samples_per_problem": 2, "workers": 0},
        }
        p = tmp_path / "keys.yaml"
        p.write_text(json.dumps(cfg))
        runner = Runner(load_config(p))
        runner.run()
        assert srv.stats.authorization[f"Bearer {_KEY}"] == srv.stats.requests > 12
    with DevServer(ServerConfig(require_key="sk-the-right-one")) as srv:
        # a refusal quoting the key back (as some servers do): one clear error, the key scrubbed
        eng = make_engine(_engine(srv.url, api_key_env="R1V_TEST_KEY"))
        try:
            with pytest.raises(EngineRejected, match="refuses the credentials") as refused:
                eng.generate(_reqs(3))
        finally:
            eng.close()
        assert _KEY not in str(refused.value) and "R1V_TEST_KEY" in str(refused.value)
        logging.getLogger("r1v").error("engine failed: %s", refused.value)
    leaks = []
    for f in Path(tmp_path / "runs").rglob("*"):
        if f.is_file() and f.suffix in (".json", ".yaml", ".jsonl", ".txt", ".log"):
            text = f.read_text(errors="replace")
            if _KEY in text or _KEY[8:] in text:
                leaks.append(str(f))
    assert not leaks
    for rec in caplog.records:
        text = rec.getMessage()
        assert _KEY not in text and _KEY[8:] not in text, rec.name
    chains = chains_by_id(runner.run_dir / "generate")
    assert not any(_KEY in json.dumps(c, default=str) for c in chains.values())
