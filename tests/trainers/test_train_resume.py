"""A pipeline run killed (SIGKILL) inside its `train` step and started again resumes from the step's last
checkpoint and ends with the same train_log as an uninterrupted run.

Run: .venv/bin/pytest -q -m slow tests/trainers/test_train_resume.py      (~2-3 minutes on 2 cores)
"""

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


def _config(root: Path, name: str) -> Path:
    cfg = {
        "run": {"name": name, "root": str(root), "seed": 0},
        "ray": {"num_cpus": 2},
        "ingest": {"sources": [{"kind": "synthetic", "synthetic": {"n": 16, "seed": 0}}]},
        "generate": {"engine": {"kind": "scripted"}, "samples_per_problem": 2, "workers": 1},
        "filter": {"workers": 1},
        "curate": {},
        "assemble": {"init": "tiny_random"},
        "train": {"max_steps": 30, "save_every": 5, "micro_batch": 2, "lr": 2e-3, "data": {"max_len": 4096}},
    }
    p = root / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _run(cfg: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, R1V_PROGRESS="0")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], cwd=REPO, env=env,
                            start_new_session=True, **kw)


@pytest.mark.slow
def test_killed_train_step_resumes_to_the_same_losses(tmp_path):
    full = _run(_config(tmp_path, "full"))
    assert full.wait(900) == 0

    cfg = _config(tmp_path, "cut")
    proc = _run(cfg)
    latest = tmp_path / "cut" / "train" / "checkpoints" / "latest"
    deadline = time.time() + 900
    while not (latest.exists() and latest.read_text().strip() >= "step-0000010") and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert Manifest.load(tmp_path / "cut" / "train") is None  # killed inside the step

    again = _run(cfg, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out[-3000:]
    assert "resumed from step-" in out
    a = read_table(tmp_path / "full" / "train").sort_by("step").to_pylist()
    b = read_table(tmp_path / "cut" / "train").sort_by("step").to_pylist()
    assert [r["step"] for r in b] == list(range(1, 31))
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["loss"] - rb["loss"]) < 1e-6, (ra["step"], ra["loss"], rb["loss"])
    m = Manifest.load(tmp_path / "cut" / "train")
    assert m.metrics["steps"] == 30 and m.kept == Manifest.load(tmp_path / "full" / "train").kept
