"""`ray job submit` of the demo onto a head started with `ray start --head` (its own ports and temp dir)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.rundir import Manifest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    """A real single-node Ray head; stopped (only this one) at the end."""
    # Ray 2.60 turns on token auth for `ray start`; the head and the job client must agree.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    temp = Path(tempfile.mkdtemp(prefix="r1vray-", dir="/tmp"))  # short path: Ray's unix sockets
    gcs, dash, client, agent, agent_grpc, metrics, rt_env, nm, om = _free_ports(9)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--temp-dir={temp}",
        "--num-cpus=2", "--include-dashboard=true", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
        "--disable-usage-stats",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        r = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True)
        if r.returncode == 0:
            break
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(1)
    else:
        raise RuntimeError("Ray head did not come up in 120 s")
    yield address, env
    proc.send_signal(signal.SIGINT)  # `ray start --block` stops the processes it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def _submit(address: str, env: dict, args: list[str], job_env: dict | None = None) -> subprocess.CompletedProcess:
    rt = ["--runtime-env-json", json.dumps({"env_vars": job_env})] if job_env else []
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), *rt, "--",
           sys.executable, "-m", "pipeline.cli", "run", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)


def _check_job(address, env, out_root: Path, extra: list[str]):
    r = _submit(address, env, ["configs/demo.yaml", f"run.root={out_root}", *extra])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    jobs = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                          capture_output=True, text=True).stdout
    assert "SUCCEEDED" in jobs
    # the job's driver connected to this head, not to an embedded cluster of its own
    assert "Connected to Ray cluster" in r.stdout + r.stderr
    return out_root / "demo"


def test_ray_job_submit_runs_ingest_on_the_head(ray_head, tmp_path):
    address, env = ray_head
    run_dir = _check_job(address, env, tmp_path / "runs", ["--stage", "ingest"])
    m = Manifest.load(run_dir / "ingest")
    assert m is not None and m.kept > 0 and m.rows_in == m.kept + sum(m.dropped.values())
    assert len(list((run_dir / "ingest").glob("part-*.parquet"))) >= 1
    json.loads((run_dir / "ingest" / "_manifest.json").read_text())


@pytest.mark.slow
def test_ray_job_submit_runs_the_whole_demo(ray_head, tmp_path):
    address, env = ray_head
    run_dir = _check_job(address, env, tmp_path / "runs", [])
    manifests = [Manifest.load(p.parent) for p in run_dir.glob("*/_manifest.json")]
    assert len(manifests) >= 2
    for m in manifests:
        m.check_counts()


# The data steps of the demo (generate with its cache, filter, curate, three rounds); the trainer's
# sections are switched off on the command line.
_DATA_ONLY = ["assemble=null", "train=null", "evaluate=null", "rl=null"]


def _manifest_stamps(run_dir: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in run_dir.glob("*/_manifest.json")}


def _two_submissions(ray_head, tmp_path, extra: list[str]) -> None:
    """Submit the demo as the README says (the run root from R1V_ROOT in the job's runtime env, no
    run.root override), submit it again, then `r1v status` from outside the job."""
    address, env = ray_head
    root = tmp_path / "shared-root"
    t0 = time.time()
    r1 = _submit(address, env, ["configs/demo.yaml", *extra], job_env={"R1V_ROOT": str(root)})
    t1 = time.time()
    assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
    run_dir = root / "demo"
    first = _manifest_stamps(run_dir)
    gen = [Manifest.load(run_dir / s) for s in first if s.startswith("generate")]
    engine_calls_1 = sum(m.metrics["requests"] for m in gen)
    assert engine_calls_1 > 0
    r2 = _submit(address, env, ["configs/demo.yaml", *extra], job_env={"R1V_ROOT": str(root)})
    t2 = time.time()
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    log2 = r2.stdout + r2.stderr
    # every finished step skipped: no manifest rewritten, so no generate step ran and no engine was called
    assert _manifest_stamps(run_dir) == first
    assert log2.count("skipped") >= len(first), log2[-3000:]
    assert "running (fingerprint" not in log2
    st = subprocess.run([str(BIN / "r1v"), "status", str(run_dir)], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
    assert st.returncode == 0, st.stderr
    assert "stale" not in st.stdout and "missing" not in st.stdout and st.stdout.count("done") >= len(first)
    print(f"\nray job: first submission {t1 - t0:.1f}s, {engine_calls_1} engine calls over {len(gen)} generate "
          f"steps; second {t2 - t1:.1f}s, 0 engine calls, {len(first)} steps skipped", file=sys.__stderr__)
    print(st.stdout, file=sys.__stderr__)


def test_ray_job_submitted_twice_keeps_its_run_and_skips_every_finished_step(ray_head, tmp_path):
    _two_submissions(ray_head, tmp_path, _DATA_ONLY)


@pytest.mark.slow
def test_ray_job_whole_demo_submitted_twice(ray_head, tmp_path):
    _two_submissions(ray_head, tmp_path, [])


def test_ray_job_with_a_relative_root_is_refused_saying_what_to_set(ray_head, tmp_path):
    address, env = ray_head
    r = _submit(address, env, ["configs/demo.yaml", "--stage", "ingest"])
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "run.root='../runs'" in out and "R1V_ROOT" in out and "deleted when the job ends" in out
