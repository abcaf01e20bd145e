"""Small builders shared by the pipeline tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import yaml
from PIL import Image

from pipeline.config import load_config
from pipeline.runner import Runner


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
