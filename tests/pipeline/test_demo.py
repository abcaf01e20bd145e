"""The offline demo end to end: every manifest adds up, a re-run skips everything, and a run killed with
SIGKILL in the middle of a stage ends, after a re-run, with the same tables as an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.rundir import MANIFEST, Manifest

from .helpers import read_rows

REPO = Path(__file__).resolve().parents[2]
# Columns that measure wall-clock time differ between any two runs; everything else must match.
_TIMING = re.compile(r"(latency|_s$|wall|tok_per_s|tokens_per_s|mfu|elapsed|time)")


def _r1v(*args: str, root: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "R1V_PROGRESS": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "configs/demo.yaml", f"run.root={root}", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _finish(p: subprocess.Popen, timeout: float = 1800) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return out


def _tables(run_dir: Path) -> dict[str, list[str]]:
    out = {}
    for d in sorted({p.parent for p in run_dir.rglob("part-*.parquet")}):
        if "train_log" in d.parts:  # per-step timings of training, not data
            continue
        rows = []
        for r in read_rows(d):
            keep = {k: v for k, v in r.items() if not _TIMING.search(k)}
            rows.append(json.dumps(keep, sort_keys=True, default=repr))
        out[str(d.relative_to(run_dir))] = sorted(rows)
    return out


def _all_manifests(run_dir: Path) -> list[Manifest]:
    return [Manifest.load(p.parent) for p in sorted(run_dir.glob("*/" + MANIFEST))]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # three whole demo runs: longer than the default per-test limit on a shared machine
@pytest.mark.parametrize("kill_in", ["generate", "filter"])
def test_demo_sigkill_then_rerun_matches_clean_run(tmp_path, kill_in):
    ref_out = _finish(_r1v(root=tmp_path / "ref"))
    ref = tmp_path / "ref" / "demo"
    manifests = _all_manifests(ref)
    assert {m.step for m in manifests} >= {"ingest", "generate", "filter", "curate"}
    for m in manifests:
        m.check_counts()
    # a second run skips every finished step
    t0 = time.time()
    again = _finish(_r1v(root=tmp_path / "ref"))
    assert "running" not in again, again[-2000:]
    assert time.time() - t0 < 60

    p = _r1v(root=tmp_path / "killed", start_new_session=True)
    step = tmp_path / "killed" / "demo" / kill_in
    deadline = time.time() + 1200
    while time.time() < deadline:
        if (step / "_progress.json").exists() and not (step / MANIFEST).exists():
            if kill_in != "generate" or list(step.glob("part-*.parquet")):
                break
        if p.poll() is not None:
            pytest.fail(f"demo finished before {kill_in} could be interrupted: {p.stdout.read()[-2000:]}")
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (step / MANIFEST).exists()
    _finish(_r1v(root=tmp_path / "killed"))
    assert _tables(tmp_path / "killed" / "demo") == _tables(ref), ref_out[-500:]
