"""Generate at growing pool sizes: throughput, driver and worker peak memory, object-store spill.

    python benchmarks/scale.py                                   # 1k and 10k problems x 4 samples
    python benchmarks/scale.py --sizes 1000 10000 100000 --baseline ebce0b3
    python benchmarks/scale.py --sizes 1000 --cpus 2 --workers 1 --out /tmp/scale.json

The scripted teacher (engine time nil, latency 0) over synthetic pools with one PNG per problem
(320x240 figures drawn by pipeline.synthetic; 200 distinct figures, each row its own copy of the
bytes, a distinct question and problem_id). Each size runs the generate stage in a fresh driver
process with its own embedded Ray cluster (`--cpus` CPUs, `--workers` 1-CPU engine actors, cache off).

Measured per run: rows/s = chains / the stage's wall time (Ray Data start-up included);
driver_peak_rss_mb = the driver's own peak RSS (getrusage); worker_peak_rss_mb = the largest peak RSS
(VmHWM, polled every 0.2 s) among the Ray worker processes under the driver, worker_peak_proc its Ray
title; that RSS also counts the object-store (shared memory) pages a worker has mapped, so the largest
peaks of the private part (RssAnon, worker_peak_private_mb) and of the shared part (RssShmem,
worker_peak_shm_mb) are given apart; workers_total_private_mb = the peak over time of all worker
processes' private memory together and worker_processes the most of them alive at once (a stage that
starts a process per task shows there, not in the largest one); spilled_mb = what Ray's memory summary reports as spilled at the end;
load_avg_1m = the machine's load when the run ended. `--trace FILE` appends every worker's RSS
(resident, private, shared) every 2 s. `--baseline REV` runs the same sizes with the stage as
it was at git revision REV (extracted with `git archive`), the driver-side path, in the same session.
Rows go to benchmarks/results/scale_<machine>.json (a list; "path" says which code ran).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_pool(n: int, directory: Path, distinct: int = 200) -> Path:
    """n problems with one image each as problems shards (built once per size and reused)."""
    sys.path.insert(0, str(REPO))
    import pyarrow as pa

    from pipeline.rundir import ShardWriter, count_rows, stable_hash
    from tests.teachers.conftest import ASSESSED, synthetic_problems

    if (directory / "_done").exists() and count_rows(directory) == n:
        return directory
    base = [p for p in synthetic_problems(distinct * 2) if p.get("images")][:distinct]
    with ShardWriter(directory, ASSESSED, "problems", rows_per_shard=20_000, row_group_bytes=4 << 20) as w:
        rows = []
        for i in range(n):
            p = dict(base[i % len(base)])
            p["question"] = f"{p['question']} [#{i}]"
            p["problem_id"] = stable_hash(p["question"], p["answer"], i)
            rows.append(p)
            if len(rows) == 2000:
                w.write(pa.Table.from_pylist(rows, schema=ASSESSED))
                rows = []
        if rows:
            w.write(pa.Table.from_pylist(rows, schema=ASSESSED))
    (directory / "_done").touch()
    return directory


def child(args: argparse.Namespace) -> None:
    """The driver: one generate run over --problems; prints a JSON line."""
    import resource
    from types import SimpleNamespace

    sys.path.insert(0, args.code)
    import ray

    from pipeline.runner import StageContext
    from teachers.generate import GenerateConfig, run

    if args.address:  # join a running cluster (the kill-and-resume test's)
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=args.object_store_mb * 1024 * 1024)
    ray.data.DataContext.get_current().enable_progress_bars = False
    run_dir = Path(args.run)
    out = run_dir / "generate"
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(run_dir=run_dir, step="generate", stage="generate", round=0, out_dir=out,
                       inputs={"problems": [Path(args.problems)]},
                       run_config=SimpleNamespace(run=SimpleNamespace(seed=0, root=str(run_dir.parent))),
                       fingerprint="bench", resume=args.resume)
    cfg = GenerateConfig.model_validate({
        "engine": {"kind": "scripted", "latency_s": 0.0}, "samples_per_problem": args.k, "workers": args.workers,
        "batch_size": 64, "flush_rows": args.flush_rows, "cache": False, "max_tokens": 1200,
    })
    t0 = time.perf_counter()
    m = run(cfg, ctx)
    wall = time.perf_counter() - t0
    spilled = 0.0
    try:
        from ray._private.internal_api import memory_summary

        summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        hit = re.search(r"Spilled (\d+) MiB", summary)
        spilled = float(hit.group(1)) if hit else 0.0
    except (ImportError, RuntimeError, ValueError, ConnectionError) as e:
        print(f"memory summary unavailable: {e}", file=sys.stderr)
    print("RESULT " + json.dumps({"chains": m.outputs["chains"], "wall_s": wall, "spilled_mb": spilled,
                                  "resumed": m.metrics["resumed"], "requests": m.metrics["requests"],
                                  "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    ray.shutdown()


def _hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _rss_mb(pid: int) -> tuple[float, float, float]:
    """(resident, of which private anonymous memory, of which shared memory: the object store's pages)."""
    got = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "RssAnon:", "RssShmem:")):
                got[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return got.get("VmRSS", 0.0), got.get("RssAnon", 0.0), got.get("RssShmem", 0.0)


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _is_worker(pid: int) -> bool:
    cmd = _cmd(pid)
    return cmd.startswith("ray::") or "default_worker.py" in cmd


def measure(code: str, problems: Path, run: Path, args: argparse.Namespace) -> dict:
    import psutil

    cmd = [sys.executable, __file__, "--child", "--code", code, "--problems", str(problems), "--run", str(run),
           "--cpus", str(args.cpus), "--workers", str(args.workers), "--k", str(args.k),
           "--object-store-mb", str(args.object_store_mb), "--flush-rows", str(args.flush_rows)]
    env = {**os.environ, "PYTHONPATH": code, "R1V_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=code)
    peaks: dict[int, float] = {}
    anon: dict[int, float] = {}  # peak private (anonymous) resident memory per worker
    shm: dict[int, float] = {}  # peak resident shared memory per worker: object-store pages it has mapped
    names: dict[int, str] = {}  # a worker's last title (ray::<task or actor>)
    timeline: list[tuple[float, dict[int, float]]] = []  # (s since start, current RSS per worker) every ~2 s
    total = {"private_mb": 0.0, "processes": 0}  # peaks over time of all workers together
    stop = threading.Event()
    t0 = time.perf_counter()

    def poll() -> None:
        root = psutil.Process(proc.pid)
        last = -2.0
        while not stop.is_set():
            try:
                kids = root.children(recursive=True)
            except psutil.Error:
                kids = []
            now = time.perf_counter() - t0
            snap = {}
            for k in kids:
                if _is_worker(k.pid):
                    peaks[k.pid] = max(peaks.get(k.pid, 0.0), _hwm_mb(k.pid))
                    title = _cmd(k.pid)
                    if title.startswith("ray::") and not title.startswith("ray::IDLE"):
                        names[k.pid] = title.split()[0]
                    snap[k.pid] = _rss_mb(k.pid)
                    anon[k.pid] = max(anon.get(k.pid, 0.0), snap[k.pid][1])
                    shm[k.pid] = max(shm.get(k.pid, 0.0), snap[k.pid][2])
            total["private_mb"] = max(total["private_mb"], sum(v[1] for v in snap.values()))
            total["processes"] = max(total["processes"], len(snap))
            if now - last >= 2.0:
                timeline.append((round(now, 1), snap))
                last = now
            stop.wait(0.2)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, err = proc.communicate()
    stop.set()
    t.join()
    line = [x for x in out.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"benchmark driver failed (rc {proc.returncode}):\n{err[-3000:]}")
    res = json.loads(line[0][len("RESULT "):])
    top = max(peaks, key=peaks.get, default=None)
    res["worker_peak_rss_mb"] = round(peaks[top], 1) if top is not None else 0.0
    res["worker_peak_proc"] = names.get(top, "ray::worker") if top is not None else None
    res["worker_peak_private_mb"] = round(max(anon.values(), default=0.0), 1)
    res["worker_peak_shm_mb"] = round(max(shm.values(), default=0.0), 1)
    res["workers_total_private_mb"] = round(total["private_mb"], 1)
    res["worker_processes"] = total["processes"]
    if args.trace:  # every worker's RSS over time, to tell growth from a plateau
        with open(args.trace, "a") as fh:
            fh.write(json.dumps({"problems_dir": str(problems), "code": code, "names": names,
                                 "peaks": peaks, "timeline": timeline}) + "\n")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--k", type=int, default=4, help="samples per problem")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--object-store-mb", type=int, default=1024)
    ap.add_argument("--baseline", default=None, help="git revision whose generate stage is the baseline")
    ap.add_argument("--work", default=None, help="folder for pools and runs (default: a temp folder)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--code", default=str(REPO), help=argparse.SUPPRESS)
    ap.add_argument("--problems", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--address", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--flush-rows", type=int, default=1024, help="chains per shard")
    ap.add_argument("--trace", default=None, help="append each run's per-worker RSS timeline here (JSON lines)")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="r1v-scale-"))
    codes = {"streaming": str(REPO)}
    if args.baseline:
        base = work / f"code-{args.baseline}"
        if not base.exists():
            base.mkdir(parents=True)
            tar = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline], check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(base)], input=tar.stdout, check=True)
        codes["baseline"] = str(base)
    rows = []
    for n in args.sizes:
        pool = build_pool(n, work / f"pool-{n}")
        for path, code in codes.items():
            run = work / f"run-{path}-{n}"
            subprocess.run(["rm", "-rf", str(run)], check=True)
            r = measure(code, pool, run, args)
            row = {"problems": n, "rows_s": round(r["chains"] / r["wall_s"], 1),
                   "driver_peak_rss_mb": round(r["driver_peak_rss_mb"], 1),
                   "worker_peak_rss_mb": r["worker_peak_rss_mb"], "spilled_mb": r["spilled_mb"],
                   "worker_peak_private_mb": r["worker_peak_private_mb"],
                   "worker_peak_shm_mb": r["worker_peak_shm_mb"], "worker_peak_proc": r["worker_peak_proc"],
                   "workers_total_private_mb": r["workers_total_private_mb"],
                   "worker_processes": r["worker_processes"],
                   "load_avg_1m": round(os.getloadavg()[0], 1),
                   "path": path, "chains": r["chains"], "wall_s": round(r["wall_s"], 2), "cpus": args.cpus,
                   "workers": args.workers}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"scale_{platform.node() or 'machine'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    for path in codes:
        mine = [r for r in rows if r["path"] == path]
        if len(mine) >= 2:
            lo, hi = mine[0], mine[-1]
            print(f"{path}: driver RSS {hi['problems']}/{lo['problems']} = "
                  f"{hi['driver_peak_rss_mb'] / lo['driver_peak_rss_mb']:.2f}x; rows/s per core "
                  f"{hi['rows_s'] / lo['rows_s']:.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
