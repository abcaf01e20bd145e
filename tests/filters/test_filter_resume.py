"""Kill `r1v run` while the filter step (or the bucketed curate step) runs, start it again: the tables equal
those of an unbroken run, no row lost or duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.rundir import Manifest, read_table

REPO = Path(__file__).resolve().parents[2]


def _config(root: Path, traces: Path, name: str, curate: dict | None = None) -> Path:
    cols = {"question": "problem", "answer": "gold_answer", "trace": "trace", "id": "id", "teacher": "model"}
    cfg = {
        "run": {"name": name, "root": str(root)},
        "ray": {"num_cpus": 2},
        "ingest": {"sources": [{"kind": "jsonl", "path": str(traces), "name": "traces-dev",
                                "columns": {"question": "problem", "answer": "gold_answer", "images": None,
                                            "choices": None, "answer_type": None}}]},
        "filter": {"workers": 2, "batch_size": 8, "source": {"path": str(traces), "name": "traces-dev", "columns": cols}},
        "curate": {"n_per_problem": 2, **(curate or {})},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _r1v(config: Path) -> subprocess.Popen:
    env = {**os.environ, "R1V_PROGRESS": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _tables(run_dir: Path) -> dict:
    out = {}
    for step in ("filter", "curate", "curate/retry"):
        t = read_table(run_dir / step)
        out[step] = t.drop([c for c in ("verify_s",) if c in t.column_names])
    return out


@pytest.mark.slow
def test_killed_filter_step_resumes_to_the_same_tables(traces_path, tmp_path):
    ref = _r1v(_config(tmp_path, traces_path, "ref"))
    assert ref.wait(timeout=600) == 0

    cfg = _config(tmp_path, traces_path, "killed")
    proc = _r1v(cfg)
    progress = tmp_path / "killed" / "filter" / "_progress.json"
    deadline = time.monotonic() + 300
    while not progress.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert progress.exists(), "the filter step never started"
    time.sleep(2.0)  # inside the step: actors scoring
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert Manifest.load(tmp_path / "killed" / "filter") is None

    again = _r1v(cfg)
    assert again.wait(timeout=600) == 0
    got, want = _tables(tmp_path / "killed"), _tables(tmp_path / "ref")
    for step in want:
        assert got[step].equals(want[step]), step
    m = Manifest.load(tmp_path / "killed" / "filter")
    assert (m.rows_in, m.kept) == (160, 105)


@pytest.mark.slow
def test_killed_bucketed_curate_step_resumes_to_the_same_tables(traces_path, tmp_path):
    # One problem per bucket and one task at a time: the bucket reducers (one per problem) publish one after another, so the
    # kill lands between the first bucket's shard and the manifest.
    buckets = {"workers": 1, "bucket_problems": 1}
    ref = _r1v(_config(tmp_path, traces_path, "ref", buckets))
    assert ref.wait(timeout=600) == 0

    cfg = _config(tmp_path, traces_path, "killed", buckets)
    proc = _r1v(cfg)
    step = tmp_path / "killed" / "curate"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not list(step.glob("part-b*.parquet")):
        time.sleep(0.02)
    assert list(step.glob("part-b*.parquet")), "the curate step published no bucket before the run ended"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert Manifest.load(step) is None, "curate finished before the kill: nothing was interrupted"
    published = len(list(step.glob("part-b*.parquet")))

    again = _r1v(cfg)
    assert again.wait(timeout=600) == 0
    got, want = _tables(tmp_path / "killed"), _tables(tmp_path / "ref")
    for name in want:
        assert got[name].equals(want[name]), name
    sft = got["curate"]
    assert len(set(sft.column("sample_id").to_pylist())) == sft.num_rows  # no sample twice
    m, m_ref = Manifest.load(step), Manifest.load(tmp_path / "ref" / "curate")
    assert (m.rows_in, m.kept, m.dropped, m.quarantined) == (m_ref.rows_in, m_ref.kept, m_ref.dropped,
                                                             m_ref.quarantined)
    assert m.metrics["buckets"] == m_ref.metrics["buckets"] > published
