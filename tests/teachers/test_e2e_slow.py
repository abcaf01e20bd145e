"""End to end through `r1v run`: ingest → caption (multimodal, HTTP) → generate (text-only teacher, HTTP),
then a re-run with an unrelated setting changed re-runs generate from the cache with no request."""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.cli import main
from pipeline.rundir import Manifest, read_table
from teachers.devserver import DevServer, ServerConfig


@pytest.mark.slow
def test_runner_caption_then_text_only_teacher_then_cached_rerun(tmp_path, ray_local):
    with DevServer(ServerConfig(fault_every=7)) as srv:
        engine = {"kind": "openai", "base_url": srv.url, "api_key_env": None,
                  "timeout_s": 10.0, "max_concurrency": 8}
        cfg = {
            "run": {"name": "e2e", "root": str(tmp_path / "runs"), "seed": 0},
            "ingest": {"sources": [{"kind": "synthetic", "name": "s", "synthetic": {"n": 20, "seed": 2}}]},
            "caption": {"engine": {**engine, "model": "dev-vl"}, "workers": 1, "batch_size": 8},
            "generate": {"engine": {**engine, "model": "dev-r1", "text_only": True}, "samples_per_problem": 3,
                         "workers": 2, "batch_size": 8, "flush_rows": 16},
        }
        path = tmp_path / "e2e.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["run", str(path)]) == 0
        run_dir = tmp_path / "runs" / "e2e"
        n_problems = read_table(run_dir / "ingest").num_rows
        cap, gen = Manifest.load(run_dir / "caption"), Manifest.load(run_dir / "generate")
        assert cap.metrics["captioned"] == n_problems and srv.stats.images >= n_problems
        assert gen.kept == gen.rows_in == 3 * n_problems and gen.metrics["retries"] > 0
        prompts = read_table(run_dir / "generate", ["prompt"]).column(0).to_pylist()
        assert all(json.loads(p)[-1]["content"].startswith("Image description:") for p in prompts)
        before = srv.stats.requests

        assert main(["run", str(path), "generate.flush_rows=5", "generate.workers=1"]) == 0
        again = Manifest.load(run_dir / "generate")
        assert again.fingerprint != gen.fingerprint  # the step re-ran ...
        assert again.metrics["requests"] == 0 and again.metrics["cache_hits"] == 3 * n_problems  # ... from cache
        assert srv.stats.requests == before
