"""The caption stage with a multimodal vllm engine: streamed through the workers and ray.data.llm, the
same table as the in-driver run over the Engine API (greedy), and a re-run served by the cache."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own venv (make venv-vllm)")

from pipeline.rundir import read_table, shard_files  # noqa: E402
from teachers.caption import CaptionConfig  # noqa: E402
from teachers.caption import run as run_caption  # noqa: E402
from teachers.engines import VLLMEngineConfig  # noqa: E402
from tests.teachers.conftest import make_ctx, synthetic_problems, write_problems  # noqa: E402

from .conftest import ENGINE_KW  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]  # three processor runs of the LLaVA student


def _by_id(directory) -> dict[str, dict]:
    rows = read_table(directory).to_pylist()
    out = {r["problem_id"]: r for r in rows}
    assert len(out) == len(rows), "duplicate problem ids"
    return out


def test_vllm_caption_streams_and_matches_the_driver_path(ray_gpu, tiny_student, tmp_path):
    run_dir = tmp_path / "runs" / "cap"
    problems = synthetic_problems(6)
    problems[0] = {**problems[0], "images": problems[0]["images"] * 2}  # two images in one request
    for p in problems[4:]:
        p["images"], p["needs_image"] = None, False
    write_problems(run_dir / "ingest", problems)
    engine = VLLMEngineConfig(model=str(tiny_student), multimodal=True, dtype="float32", replicas=1, **ENGINE_KW)
    base = dict(engine=engine, max_tokens=8, batch_size=4, cache_dir=str(tmp_path / "cache"))
    m = run_caption(CaptionConfig(**base, workers=1, flush_rows=2), make_ctx(run_dir, step="caption", stage="caption"))
    m.check_counts()
    assert m.rows_in == m.kept == 6 and m.metrics["requests"] == 4 and m.metrics["without_images"] == 2
    assert m.metrics["captioned"] + sum(m.metrics["errors"].values()) == 4
    assert sum(m.metrics["shards_by_node"].values()) == len(shard_files(run_dir / "caption")) >= 3
    streamed = _by_id(run_dir / "caption")
    assert sum(1 for r in streamed.values() if r["image_description"]) == m.metrics["captioned"] > 0

    ref = run_caption(CaptionConfig(**{**base, "cache": False}, workers=0),
                      make_ctx(run_dir, step="caption-ref", stage="caption"))
    assert ref.metrics["requests"] == 4
    assert streamed == _by_id(run_dir / "caption-ref")

    again = run_caption(CaptionConfig(**base, workers=1, flush_rows=2),
                        make_ctx(run_dir, step="caption-again", stage="caption"))
    # captions are cached; a failed (empty) one is asked again
    assert again.metrics["cache_hits"] == m.metrics["captioned"]
    assert again.metrics["requests"] == sum(m.metrics["errors"].values())
    assert _by_id(run_dir / "caption-again") == streamed
