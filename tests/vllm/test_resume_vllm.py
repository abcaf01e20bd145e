"""SIGKILL `r1v run` while the vllm engine generates over ray.data.llm; the re-run generates only what is
missing and every chain is written exactly once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own venv (make venv-vllm)")

import yaml  # noqa: E402

from pipeline.cli import main  # noqa: E402
from pipeline.rundir import Manifest  # noqa: E402
from tests.pipeline.helpers import kill_run_after  # noqa: E402
from tests.teachers.conftest import chains_by_id  # noqa: E402

from .conftest import ENGINE_KW, text_problems  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

N, K = 16, 4


def _config(tmp_path: Path, gcs_address: str, model: Path) -> Path:
    # its own folder: ingest fingerprints every file beside a source (images live there), and the run
    # directory under tmp_path changes while the run writes
    src = tmp_path / "data" / "problems.jsonl"
    src.parent.mkdir()
    with src.open("w") as f:
        for i, p in enumerate(text_problems(N)):
            f.write(json.dumps({"id": f"p{i}", "question": p["question"], "answer": p["answer"],
                                "answer_type": p["answer_type"]}) + "\n")
    cfg = {
        "run": {"name": "kill", "root": str(tmp_path / "runs"), "seed": 3},
        "ray": {"address": gcs_address},  # the child driver joins this session's cluster (its logical GPU)
        "ingest": {"sources": [{"kind": "jsonl", "path": str(src)}]},
        "generate": {
            "engine": {"kind": "vllm", "model": str(model), "text_only": True, **ENGINE_KW},
            "samples_per_problem": K, "max_tokens": 256, "temperature": 0.8,
            "workers": 1, "batch_size": 8, "flush_rows": 8,
            "cache": False,  # without the cache only resume can avoid regenerating
        },
    }
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sigkill_mid_vllm_generation_then_resume(tmp_path, ray_gpu, r1_model):
    cfg_path = _config(tmp_path, ray_gpu.get_runtime_context().gcs_address, r1_model)
    log = tmp_path / "child.log"
    step = tmp_path / "runs" / "kill" / "generate"
    kill_run_after(cfg_path, step, shards=2, timeout=900, log=log)
    before = chains_by_id(step)
    assert 0 < len(before) < N * K, log.read_text()[-2000:]

    assert main(["run", str(cfg_path)]) == 0
    m = Manifest.load(step)
    chains = chains_by_id(step)  # asserts no duplicate chain ids
    assert len(chains) == N * K == m.rows_in == m.kept
    assert m.metrics["resumed"] >= len(before)
    assert m.metrics["requests"] == N * K - m.metrics["resumed"]
    for cid, row in before.items():  # what was written before the kill stays as it was
        assert chains[cid] == row
