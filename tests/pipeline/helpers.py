"""Small builders shared by the pipeline tests."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from PIL import Image

from pipeline.config import load_config
from pipeline.rundir import MANIFEST
from pipeline.runner import Runner

REPO = Path(__file__).resolve().parents[2]


def png_bytes(color=(200, 30, 30), size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_config(tmp_path: Path, sections: dict, name: str = "t") -> Path:
    cfg = {"run": {"name": name, "root": str(tmp_path / "runs")}, **sections}
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def run_config(path: Path, overrides: list[str] | None = None, **kw):
    runner = Runner(load_config(path, overrides))
    return runner, runner.run(**kw)


def read_rows(directory: Path) -> list[dict]:
    rows = []
    for f in sorted(Path(directory).glob("part-*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def kill_run_after(cfg_path: Path, step: Path, shards: int, timeout: float = 180, log: Path | None = None) -> None:
    """`r1v run cfg_path` in a child process, SIGKILLed once `step` holds `shards` shards; the step
    must not have finished (no manifest)."""
    out = log.open("w") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(cfg_path)], cwd=REPO,
                                env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, stdout=out,
                                stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
        deadline = time.time() + timeout
        while time.time() < deadline and len(list(step.glob("part-*.parquet"))) < shards and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if log:
            out.close()
    tail = log.read_text()[-2000:] if log else ""
    assert not (step / MANIFEST).exists(), "the run finished before it was killed: make it slower " + tail
