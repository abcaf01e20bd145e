"""A shortened demo run as a user sees it outside a terminal (CI, `ray job logs`): progress lines with
rate and ETA for the long loops, none of Ray's / transformers' / DeepSpeed's own noise, the absolute
output path at the end; then its report (every section with data, checked in headless Chromium) and
`r1v inspect` on its real tables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli

REPO = Path(__file__).resolve().parents[2]
SHORT = ["ingest.sources.0.synthetic.n=40", "rounds.count=2", "train.max_steps=4", "train.save_every=4",
         "train.iterative.rounds=1", "evaluate.limit=4", "evaluate.max_tokens=16",
         "evaluate.eval_set.limit=4", "evaluate.eval_set.samples=2"]
NOISE = ("Execution plan", "Token authentication", "logging_progress", "Loading weights", "Writing model shards",
         "Started a local Ray instance", "Progress bars disabled", "does not have any available CPUs",
         "Setting accelerator to CPU", "Running Dataset", "Traceback")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("usability")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "R1V_PROGRESS_EVERY": "0"}
    for k in ("RAY_ADDRESS", "R1V_PROGRESS", "R1V_QUIET", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "configs/demo.yaml", f"run.root={root}", *SHORT],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    return root / "demo", out


def test_progress_lines_with_rate_and_eta(demo):
    _, out = demo
    for stage, unit in (("assess", "problems"), ("generate", "samples"), ("filter", "chains"), ("evaluate", "answers")):
        assert re.search(rf"\| {stage}: \d+/\d+ {unit} \(\d+%\) \| [\d.]+ {unit}/s \| ETA \d+", out) or \
            re.search(rf"\| {stage}: (\d+)/\1 {unit} in [\d.]+s \| [\d.]+ {unit}/s", out), stage
        assert re.search(rf"\| {stage}: (\d+)/\1 {unit} in [\d.]+s \| [\d.]+ {unit}/s", out), stage
    assert re.search(r"\| ingest: \d+ rows \| [\d.]+ rows/s", out)


def test_quiet_terminal(demo):
    run_dir, out = demo
    for noise in NOISE:
        assert noise not in out, noise
    assert out.strip().splitlines()[-1].endswith(f"outputs in {run_dir.resolve()}")
    assert "expected for the demo's tiny random student" in out  # its 0.000 accuracy, explained


def test_report_of_the_run_has_every_section_with_data(demo, tmp_path):
    run_dir, _ = demo
    out_dir = tmp_path / "rep"
    assert cli.main(["report", str(run_dir), "--out", str(out_dir)]) == 0
    page = (out_dir / "index.html").read_text()
    assert 'class="missing"' not in page
    for title in ("Steps and counts", "Chain length", "Correctness by difficulty", "Repetition penalty",
                  "Drop reasons", "Yield per round", "Training: loss", "Evaluation: accuracy", "Example chains"):
        assert f"<h2>{title}" in page, title
    training = page.split('<section id="training">')[1].split("</section>")[0]
    assert "<td>train</td>" in training and "<td>train-t1</td>" in training
    assert "evaluate-t1 (model of train-t1)" in page
    assert "tiny random model" in page  # why the demo student's accuracy is 0
    from tests.browser import chromium, load_page

    if chromium() is None:
        pytest.skip("no chromium installed (Debian package `chromium`)")
    got = load_page(out_dir / "index.html", tmp_path / "profile")
    assert got.errors == []
    assert {i["alt"] for i in got.images} == {p.stem for p in out_dir.glob("*.png")}
    assert len(got.images) >= 6 and all(i["complete"] and i["width"] > 100 and i["shown"] > 100 for i in got.images)


def test_inspect_a_real_chain(demo, capsys):
    run_dir, _ = demo
    assert cli.main(["inspect", str(run_dir), "filter", "-c", "chain_id,drop_reason", "-w", "drop_reason = 'wrong'",
                     "-n", "1"]) == 0
    chain_id = re.search(r"│ ([0-9a-f]{16}) ┆ wrong", capsys.readouterr().out).group(1)
    assert cli.main(["inspect", str(run_dir), "filter", "--row", chain_id]) == 0
    out = capsys.readouterr().out
    for key in ("keep", "drop_reason", "verdict", "pred_answer", "gold_answer"):
        assert re.search(rf"^> {key}\s+\S", out, re.M), key
    assert re.search(r"^> drop_reason\s+wrong$", out, re.M)
