"""SIGKILL a 100k-problem scripted generate mid-way (workers publishing their own shards); the resumed run
writes every one of the 400k chains exactly once and keeps what was written before the kill.

    R1V_KILL_PROBLEMS=20000 .venv/bin/pytest -q -m slow tests/teachers/test_kill_scale.py   # a smaller pool
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from benchmarks.scale import build_pool
from pipeline.rundir import MANIFEST, read_table, shard_files, stable_hash

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
N = int(os.environ.get("R1V_KILL_PROBLEMS", "100000"))
K = 4


def _driver(pool: Path, run: Path, address: str, resume: bool) -> list[str]:
    return [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--child", "--problems", str(pool),
            "--run", str(run), "--address", address, "--k", str(K), "--workers", "1", "--flush-rows", "1024",
            *(["--resume"] if resume else [])]


@pytest.mark.timeout(3600)
def test_sigkill_large_scripted_generate_exactly_once(tmp_path, ray_local):
    pool = build_pool(N, tmp_path / "pool")
    run = tmp_path / "runs" / "big"
    step = run / "generate"
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(REPO), "R1V_PROGRESS": "0"}
    proc = subprocess.Popen(_driver(pool, run, address, False), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = N * K // 1024 // 3  # about a third of the shards
    deadline = time.time() + 1800
    while time.time() < deadline and len(shard_files(step)) < target and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (step / MANIFEST).exists() and proc.returncode == -signal.SIGKILL, "finished before the kill"
    before = {f.name: pq.read_table(f).column("chain_id").to_pylist() for f in shard_files(step)}
    n_before = sum(len(v) for v in before.values())
    assert 0 < n_before < N * K

    out = subprocess.run(_driver(pool, run, address, True), cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads([x for x in out.stdout.splitlines() if x.startswith("RESULT ")][0][len("RESULT "):])
    # the stragglers of the killed driver may have published a few more shards before the fence
    assert res["resumed"] >= n_before
    assert res["requests"] == N * K - res["resumed"]

    ids = read_table(step, ["chain_id"]).column("chain_id")
    assert len(ids) == N * K == res["chains"]
    assert pc.count_distinct(ids).as_py() == N * K  # none twice
    pids = read_table(pool, ["problem_id"]).column("problem_id").to_pylist()
    expected = {stable_hash(p, "scripted-teacher", 0, s) for p in pids for s in range(K)}
    assert set(ids.to_pylist()) == expected  # none lost, none foreign
    for name, chain_ids in before.items():  # what was written before the kill stays, unchanged
        assert pq.read_table(step / name).column("chain_id").to_pylist() == chain_ids
    assert not list(step.glob(".attempt-*")) and not list(step.glob(".dead-*"))
