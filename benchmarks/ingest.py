"""Ingest throughput on MATH-V testmini against a bare pyarrow read + write of the same data.

    python benchmarks/ingest.py [--repeat 5]

Baseline: read the JSONL with pyarrow.json, read every image file's bytes, write one Parquet file.
Ours: the ingest stage's work without the runner (sources → problems + quarantine shards): image
decoding checks, answer/choice normalisation, stable ids, dedupe. Both in this process, same data,
best of --repeat runs. Prints rows/s for both and the ratio (target ≥ 0.8).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "mathv-testmini"


def bare(out: Path) -> int:
    t = pj.read_json(DATA / "testmini.jsonl")
    imgs = [(DATA / p).read_bytes() for p in t.column("image_path").to_pylist()]
    t = t.append_column("image_bytes", pa.array(imgs, pa.binary()))
    pq.write_table(t, out / "bare.parquet", compression="zstd")
    return t.num_rows


def ours(out: Path) -> int:
    from pipeline.config import load_config
    from pipeline.ingest import run
    from pipeline.runner import StageContext

    cfg = load_config(REPO / "configs" / "mathv.yaml").ingest
    cfg.sources[0].path = str(DATA / "testmini.jsonl")
    ctx = StageContext(run_dir=out, step="ingest", stage="ingest", round=0, out_dir=out / "ingest", inputs={},
                       run_config=None, fingerprint="bench")
    return run(cfg, ctx).rows_in


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
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not DATA.exists():
        raise SystemExit(f"MATH-V data not found at {DATA}")
    ours(Path(tempfile.mkdtemp()))  # warm imports and the page cache for both
    tb, nb = _best(bare, args.repeat)
    to, no = _best(ours, args.repeat)
    rb, ro = nb / tb, no / to
    print(json.dumps({"bare_rows_per_s": round(rb, 1), "ingest_rows_per_s": round(ro, 1), "ratio": round(ro / rb, 3),
                      "rows": no}, indent=2))


if __name__ == "__main__":
    main()
