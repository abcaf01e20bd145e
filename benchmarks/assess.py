"""Assess throughput on MATH-V testmini (304 real figures) against the bare cost of reading the pixels.

    python benchmarks/assess.py [--repeat 3] [--workers 2]

Baseline: decode every image and downscale it to grey (PIL), the least any pixel-statistics scorer
must do. Ours: the whole assess stage without the runner (read problems, QDAM/VTIA heuristics, min-max,
DRLC, write shards), in-process (workers=0) and fanned out over Ray Data tasks and actors (--workers). Same data,
best of --repeat runs. Prints problems/s for each and the ratios to the baseline.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "mathv-testmini"


def _ingest(out: Path) -> Path:
    from pipeline.config import load_config
    from pipeline.ingest import run
    from pipeline.runner import StageContext

    cfg = load_config(REPO / "configs" / "mathv.yaml").ingest
    cfg.sources[0].path = str(DATA / "testmini.jsonl")
    ctx = StageContext(run_dir=out, step="ingest", stage="ingest", round=0, out_dir=out / "ingest", inputs={},
                       run_config=None, fingerprint="bench")
    run(cfg, ctx)
    return out / "ingest"


def bare(problems_dir: Path, _out: Path) -> int:
    from PIL import Image

    from pipeline.rundir import read_table

    n = 0
    for imgs in read_table(problems_dir, ["images"]).column("images").to_pylist():
        for rec in imgs or []:
            with Image.open(io.BytesIO(rec["bytes"])) as im:
                g = im.convert("L")
            g.thumbnail((512, 512))
        n += 1
    return n


def ours(problems_dir: Path, out: Path, workers: int, compute: str = "tasks") -> int:
    from filters import assess
    from pipeline.runner import StageContext

    ctx = StageContext(run_dir=out, step="assess", stage="assess", round=0, out_dir=out / "assess",
                       inputs={"problems": [problems_dir]}, run_config=SimpleNamespace(run=SimpleNamespace(seed=0)),
                       fingerprint="bench")
    return assess.run(assess.AssessConfig(workers=workers, batch_size=32, compute=compute), ctx).rows_in


def _best(fn, repeat: int) -> tuple[float, int]:
    best, n = float("inf"), 0
    for _ in range(repeat):
        d = Path(tempfile.mkdtemp())
        t0 = time.perf_counter()
        n = fn(d)
        best = min(best, time.perf_counter() - t0)
        shutil.rmtree(d)
    return best, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="Ray Data actors for the fanned-out run (0: skip it)")
    args = ap.parse_args()
    src = Path(tempfile.mkdtemp())
    problems = _ingest(src)
    t_bare, n = _best(lambda d: bare(problems, d), args.repeat)
    t_ours, n2 = _best(lambda d: ours(problems, d, 0), args.repeat)
    assert n == n2, (n, n2)
    print(f"assess | {n} MATH-V problems | bare decode {n / t_bare:,.0f} problems/s | "
          f"assess in-process {n / t_ours:,.0f} problems/s | ratio {t_bare / t_ours:.2f}")
    if args.workers:
        import ray

        ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
        for compute in ("tasks", "actors"):
            ours(problems, Path(tempfile.mkdtemp()), args.workers, compute)  # warm workers' imports once
            t_ray, _ = _best(lambda d, c=compute: ours(problems, d, args.workers, c), args.repeat)
            print(f"assess | Ray Data {args.workers} {compute} {n / t_ray:,.0f} problems/s | ratio vs bare "
                  f"{t_bare / t_ray:.2f} | vs in-process {t_ours / t_ray:.2f}")
    shutil.rmtree(src)


if __name__ == "__main__":
    main()
