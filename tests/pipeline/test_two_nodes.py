"""The demo's data stages on a two-node Ray cluster (`ray start --head` plus `ray start --address`, one CPU
and its own temp dir each): workers on both nodes write generate's and filter's shards and run curate's
bucket reducers, and the tables equal a one-node run's.

    .venv/bin/pytest -q -m slow tests/pipeline/test_two_nodes.py -s     # prints both runs' timings
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.rundir import Manifest

from .test_demo import _tables
from .test_ray_job import _free_ports

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Ray 2.60 turns on token auth for `ray start`: the nodes and the driver must agree.
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "R1V_PROGRESS": "0"}
ENV.pop("RAY_ADDRESS", None)
# Two actors per stage, so each node holds one; small shards and 0.3 s per simulated request, so the
# second actor (its worker process starts on the other node, slowly on a loaded machine) is up before
# the first has done everything. One round: the later rounds add time, not coverage.
DATA = ["assemble=null", "train=null", "evaluate=null", "rl=null", "rounds.count=1", "generate.workers=2",
        "generate.flush_rows=8", "generate.engine.latency_s=0.3",
        "filter.workers=2", "curate.workers=2", "curate.bucket_problems=40"]


def _node(cmd: list[str], temp: Path) -> subprocess.Popen:
    ports = _free_ports(7)
    names = ("node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
    flags = [f"--{n}={p}" for n, p in zip(names, ports, strict=True)]
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--num-cpus=1", f"--temp-dir={temp}",
                             "--disable-usage-stats", *cmd, *flags], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _alive_nodes(address: str) -> int:
    code = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else 0


@pytest.fixture
def two_nodes():
    temps = [Path(tempfile.mkdtemp(prefix=f"r1v2n{i}-", dir="/tmp")) for i in (0, 1)]  # short: unix sockets
    (gcs,) = _free_ports(1)
    address = f"127.0.0.1:{gcs}"
    procs = [_node(["--head", f"--port={gcs}", "--include-dashboard=false"], temps[0])]
    try:
        time.sleep(3)
        procs.append(_node([f"--address={address}"], temps[1]))
        deadline = time.time() + 180
        while _alive_nodes(address) < 2:
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("the two-node Ray cluster did not come up")
            time.sleep(2)
        yield address
    finally:
        for p in reversed(procs):  # `ray start --block` stops what it started on SIGINT
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


def _run(root: Path, extra: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/demo.yaml", f"run.root={root}",
                        *DATA, *extra], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return time.perf_counter() - t0


def test_demo_data_stages_on_two_nodes_match_one_node(two_nodes, tmp_path):
    two_s = _run(tmp_path / "two", [f"ray.address={two_nodes}"])
    one_s = _run(tmp_path / "one", ["ray.num_cpus=2"])  # an embedded one-node cluster, the same CPUs in all
    two, one = tmp_path / "two" / "demo", tmp_path / "one" / "demo"
    assert _tables(two) == _tables(one)
    # Workers on both nodes wrote: generate's and filter's shards, curate's bucket reducers; one node: one.
    by_node = {"generate": "shards_by_node", "filter": "shards_by_node", "curate": "buckets_by_node"}
    spread = {}
    for stage, key in by_node.items():
        for root, nodes in ((two, 2), (one, 1)):
            steps = [p.parent for p in root.glob("*/_manifest.json") if Manifest.load(p.parent).stage == stage]
            assert steps, f"no {stage} step in {root}"
            for step in steps:
                split = Manifest.load(step).metrics.get(key) or {}
                assert len(split) == nodes, (step.name, key, split)
                assert sum(split.values()) > 0
                if root == two:
                    spread[step.name] = split
    steps = sorted(p.parent.name for p in two.glob("*/_manifest.json"))
    timings = {"two_nodes_s": round(two_s, 1), "one_node_s": round(one_s, 1), "by_node": spread, "steps": {
        s: {"two_nodes_s": Manifest.load(two / s).wall_s, "one_node_s": Manifest.load(one / s).wall_s} for s in steps}}
    print("\nTIMINGS " + json.dumps(timings))
    (tmp_path / "timings.json").write_text(json.dumps(timings, indent=2))
