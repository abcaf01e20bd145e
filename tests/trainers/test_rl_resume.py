"""A pipeline run killed (SIGKILL) inside its `rl` step after a checkpoint and started again continues from
that checkpoint: the step's rl_log has every step once, the rows up to the checkpoint are the killed
attempt's own, and the RL model is exported and evaluated.

Run: .venv/bin/pytest -q -m slow tests/trainers/test_rl_resume.py      (a few minutes on 2 cores)
"""

from __future__ import annotations

import json
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


def _config(root: Path) -> Path:
    cfg = {
        "run": {"name": "cut", "root": str(root), "seed": 0},
        "ray": {"num_cpus": 2},
        "ingest": {"sources": [{"kind": "synthetic", "synthetic": {"n": 16, "seed": 0}}]},
        "assess": {"budget": {"min_tokens": 384, "max_tokens": 1536}, "workers": 0},
        "generate": {"engine": {"kind": "scripted"}, "samples_per_problem": 2, "workers": 1},
        "filter": {"workers": 1},
        "curate": {},
        "assemble": {"init": "tiny_random"},
        "train": {"max_steps": 2, "micro_batch": 2, "lr": 2e-3, "data": {"max_len": 4096}},
        "evaluate": {"limit": 4, "max_tokens": 16},
        "rl": {"limit": 8, "lr": 5e-3, "num_generations": 4, "per_device_batch": 8, "max_completion_tokens": 24,
               "max_steps": 30, "save_every": 5, "gradient_checkpointing": False, "rewards": {"workers": 1}},
    }
    p = root / "cut.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _run(cfg: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, R1V_PROGRESS="0")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], cwd=REPO, env=env,
                            start_new_session=True, **kw)


@pytest.mark.slow
def test_killed_rl_step_resumes_with_its_log_at_the_checkpoint(tmp_path):
    cfg = _config(tmp_path)
    proc = _run(cfg, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step = tmp_path / "cut" / "rl"
    state = step / "checkpoints" / "checkpoint-10" / "trainer_state.json"
    deadline = time.time() + 1500
    while not (state.exists() and (step / "steps.jsonl").exists()
               and len((step / "steps.jsonl").read_text().splitlines()) >= 12):
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert Manifest.load(step) is None  # killed inside the step
    before = [json.loads(x) for x in (step / "steps.jsonl").read_text().splitlines() if x.strip()]

    again = _run(cfg, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = again.communicate(timeout=1500)
    assert again.returncode == 0, out[-3000:]
    assert "step rl: running (resuming)" in out and "rl: resumed from" in out
    rows = read_table(step).sort_by("step").to_pylist()
    assert [r["step"] for r in rows] == list(range(1, 31))
    resumed = int(Path(Manifest.load(step).metrics["resumed_from"]).name.split("-")[1])
    assert resumed >= 10
    for a, b in zip(before[:resumed], rows[:resumed], strict=True):
        assert a["step"] == b["step"] and a["reward"] == b["reward"]
    assert Manifest.load(tmp_path / "cut" / "evaluate-rl").metrics["model_dir"] == str(step / "model")
