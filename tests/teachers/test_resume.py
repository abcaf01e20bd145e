"""SIGKILL `r1v run` in mid-generation; the re-run generates only what is missing, every chain once."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.cli import main
from pipeline.rundir import Manifest
from teachers.generate import GenerateConfig, run
from tests.pipeline.helpers import kill_run_after

from .conftest import chains_by_id, make_ctx, strip_timing


def _config(tmp_path: Path, gcs_address: str) -> Path:
    cfg = {
        "run": {"name": "kill", "root": str(tmp_path / "runs"), "seed": 3},
        # the child driver joins this test session's cluster instead of starting a second one
        "ray": {"address": gcs_address},
        "ingest": {"sources": [{"kind": "synthetic", "name": "synthetic", "synthetic": {"n": 30, "seed": 1}}]},
        "generate": {
            "engine": {"kind": "scripted", "latency_s": 0.04},
            "samples_per_problem": 4,
            "max_tokens": 1200,
            "workers": 1,
            "batch_size": 4,
            "flush_rows": 8,
            "cache": False,  # without the cache only resume can avoid regenerating
        },
    }
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sigkill_mid_generation_then_resume(tmp_path, ray_local):
    cfg_path = _config(tmp_path, ray_local.get_runtime_context().gcs_address)
    step = tmp_path / "runs" / "kill" / "generate"
    kill_run_after(cfg_path, step, shards=3)
    written_before = len(chains_by_id(step))
    assert 0 < written_before < 120

    assert main(["run", str(cfg_path)]) == 0
    m = Manifest.load(step)
    chains = chains_by_id(step)  # asserts no duplicate chain ids
    assert len(chains) == 120 == m.rows_in == m.kept
    assert m.metrics["resumed"] >= written_before
    assert m.metrics["requests"] == 120 - m.metrics["resumed"]

    # The same rows as an uninterrupted in-process run (latency aside).
    ref_cfg = GenerateConfig.model_validate({**yaml.safe_load(cfg_path.read_text())["generate"], "workers": 0})
    ref_cfg.engine.latency_s = 0.0
    ref_dir = tmp_path / "runs" / "ref"
    ref_dir.mkdir()
    ctx = make_ctx(ref_dir, inputs={"problems": [tmp_path / "runs" / "kill" / "ingest"]}, seed=3)
    run(ref_cfg, ctx)
    ref = chains_by_id(ref_dir / "generate")
    assert {k: strip_timing(v) for k, v in chains.items()} == {k: strip_timing(v) for k, v in ref.items()}
