"""The caption stage streaming on Ray: workers read the problems, caption and publish the shards; the same
table as the in-driver path, resumable after SIGKILL."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.cli import main
from pipeline.rundir import Manifest, read_table, shard_files
from teachers.caption import CaptionConfig
from teachers.caption import run as run_caption
from tests.pipeline.helpers import kill_run_after

from .conftest import make_ctx, synthetic_problems, write_problems


def _by_id(directory: Path) -> dict[str, dict]:
    rows = read_table(directory).to_pylist()
    out = {r["problem_id"]: r for r in rows}
    assert len(out) == len(rows), "duplicate problem ids"
    return out


def test_streaming_caption_writes_the_driver_paths_table(run_dir, ray_local):
    rows = synthetic_problems(14)
    for p in rows[:3]:  # no image: passes with a null description
        p["images"], p["needs_image"] = None, False
    rows[3]["image_description"] = "kept as it was"  # already described, not overwritten
    write_problems(run_dir / "ingest", rows)
    base = {"engine": {"kind": "scripted", "model": "scripted-captioner"}, "cache": False}
    ref = run_caption(CaptionConfig(**base, workers=0), make_ctx(run_dir, step="caption-ref", stage="caption"))
    m = run_caption(CaptionConfig(**base, workers=1, flush_rows=4),
                    make_ctx(run_dir, step="caption", stage="caption"))
    m.check_counts()
    assert _by_id(run_dir / "caption") == _by_id(run_dir / "caption-ref")
    assert read_table(run_dir / "caption").schema.equals(read_table(run_dir / "caption-ref").schema)
    assert len(shard_files(run_dir / "caption")) >= 3  # the workers wrote shards of at most flush_rows
    assert sum(m.metrics["shards_by_node"].values()) == len(shard_files(run_dir / "caption"))
    for k in ("captioned", "requests", "cache_hits", "without_images", "completion_tokens", "errors"):
        assert m.metrics[k] == ref.metrics[k], k
    assert m.metrics["captioned"] == m.metrics["requests"] == 10 and m.metrics["without_images"] == 3
    assert m.rows_in == m.kept == ref.kept == 14

    # the same cache as a re-run: every caption comes back without an engine call
    cached = CaptionConfig(**{**base, "cache": True}, workers=1, flush_rows=4,
                           cache_dir=str(run_dir.parent / "cache"))
    run_caption(cached, make_ctx(run_dir, step="caption-c1", stage="caption"))
    again = run_caption(cached, make_ctx(run_dir, step="caption-c2", stage="caption"))
    assert again.metrics["requests"] == 0 and again.metrics["cache_hits"] == 10
    assert _by_id(run_dir / "caption-c2") == _by_id(run_dir / "caption-ref")


def _config(tmp_path: Path, gcs_address: str) -> Path:
    cfg = {
        "run": {"name": "kill", "root": str(tmp_path / "runs"), "seed": 3},
        "ray": {"address": gcs_address},
        "ingest": {"sources": [{"kind": "synthetic", "name": "synthetic", "synthetic": {"n": 40, "seed": 1}}]},
        "caption": {
            "engine": {"kind": "scripted", "model": "scripted-captioner", "latency_s": 0.1},
            "workers": 1, "batch_size": 2, "flush_rows": 4,
            "cache": False,  # without the cache only resume can avoid captioning again
        },
    }
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sigkill_mid_caption_then_resume(tmp_path, ray_local):
    cfg_path = _config(tmp_path, ray_local.get_runtime_context().gcs_address)
    step = tmp_path / "runs" / "kill" / "caption"
    kill_run_after(cfg_path, step, shards=2)
    before = _by_id(step)
    assert 0 < len(before) < 40

    assert main(["run", str(cfg_path)]) == 0
    m = Manifest.load(step)
    m.check_counts()
    after = _by_id(step)
    assert len(after) == 40 == m.rows_in == m.kept
    assert m.metrics["resumed"] >= len(before)
    assert m.metrics["requests"] == 40 - m.metrics["resumed"]  # every synthetic problem has an image
    for pid, row in before.items():
        assert after[pid] == row

    # the table of one uninterrupted in-driver run
    ref_cfg = CaptionConfig.model_validate({**yaml.safe_load(cfg_path.read_text())["caption"], "workers": 0})
    ref_cfg.engine.latency_s = 0.0
    ref_dir = tmp_path / "runs" / "ref"
    ref_dir.mkdir()
    run_caption(ref_cfg, make_ctx(ref_dir, step="caption", stage="caption", seed=3,
                                  inputs={"problems": [tmp_path / "runs" / "kill" / "ingest"]}))
    assert after == _by_id(ref_dir / "caption")
