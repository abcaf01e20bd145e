"""The runner: skip on re-run, --stage / --from / --force, stale detection, kill-and-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.rundir import MANIFEST, Manifest, ShardWriter, read_table

from .helpers import read_rows, run_config, write_config

REPO = Path(__file__).resolve().parents[2]


def _synth(tmp_path, n=40, **ingest):
    return write_config(tmp_path, {"ingest": {"sources": [{"kind": "synthetic", "synthetic": {"n": n}}], **ingest}})


def test_finished_step_is_skipped_and_stage_reruns(tmp_path, ray_local):
    cfg = _synth(tmp_path)
    runner, res = run_config(cfg)
    mpath = runner.run_dir / "ingest" / MANIFEST
    first = mpath.stat().st_mtime_ns
    _, res2 = run_config(cfg)
    assert mpath.stat().st_mtime_ns == first, "a finished step must be skipped"
    assert res2["ingest"].fingerprint == res["ingest"].fingerprint
    _, _ = run_config(cfg, stage="ingest")
    assert mpath.stat().st_mtime_ns != first, "--stage re-runs the step"
    second = mpath.stat().st_mtime_ns
    run_config(cfg, from_="ingest")
    third = mpath.stat().st_mtime_ns
    assert third != second
    run_config(cfg, force=True)
    assert mpath.stat().st_mtime_ns != third


def test_config_change_makes_step_stale_and_reruns(tmp_path, ray_local, capsys):
    cfg = _synth(tmp_path)
    runner, res = run_config(cfg)
    runner2, _ = run_config(cfg, ["ingest.limit=10"]) if False else (None, None)
    from pipeline.config import load_config
    from pipeline.runner import Runner

    changed = Runner(load_config(cfg, ["ingest.limit=10"]))
    assert changed.state(changed.steps[0])[0] == "stale"
    out = changed.run()
    assert out["ingest"].rows_in == 10
    assert len(read_rows(runner.run_dir / "ingest")) == out["ingest"].kept
    assert main(["status", str(runner.run_dir)]) == 0
    assert "done" in capsys.readouterr().out


def test_unknown_stage_is_an_error(tmp_path, ray_local):
    cfg = _synth(tmp_path)
    assert main(["run", str(cfg), "--stage", "nosuch"]) == 2


def test_upstream_missing_is_named(tmp_path, ray_local):
    from pipeline.config import load_config
    from pipeline.runner import Runner, Step

    r = Runner(load_config(_synth(tmp_path)))
    r.steps.append(Step("ingest-copy", "ingest", 0, {"problems": ["ingest"]}))
    r.by_name["ingest-copy"] = r.steps[-1]
    with pytest.raises(RuntimeError, match=r"needs 'ingest', which is missing"):
        r.run(stage="ingest-copy")


def test_shard_writer_is_atomic_and_resumable(tmp_path):
    schema = pa.schema([pa.field("x", pa.int64(), nullable=False)])
    with ShardWriter(tmp_path, schema, "problems", rows_per_shard=3) as w:
        w.write([{"x": i} for i in range(7)])
    assert [p.name for p in sorted(tmp_path.glob("part-*"))] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    md = pq.read_schema(tmp_path / "part-00000.parquet").metadata
    assert md[b"r1v.table"] == b"problems" and md[b"r1v.schema_version"] == b"1"
    (tmp_path / ".tmp-part-00003.parquet").write_bytes(b"partial garbage")
    assert read_table(tmp_path).column("x").to_pylist() == list(range(7))
    w2 = ShardWriter(tmp_path, schema, "problems", rows_per_shard=3, resume=True)
    assert not list(tmp_path.glob(".tmp-*"))
    w2.write([{"x": 7}])
    w2.close()
    assert read_table(tmp_path).column("x").to_pylist() == list(range(8))
    with pytest.raises(ValueError, match="'x'"):
        ShardWriter(tmp_path, schema, "problems").write(pa.table({"y": [1]}))


def test_manifest_counts_must_add_up():
    m = Manifest(stage="s", step="s", rows_in=5, kept=3)
    m.drop("duplicate")
    with pytest.raises(RuntimeError, match="counts do not add up"):
        m.check_counts()
    m.quarantine("bad_json")
    m.check_counts()


def _tables(run_dir: Path) -> dict[str, list]:
    out = {}
    for d in sorted({p.parent for p in run_dir.rglob("part-*.parquet")}):
        rows = read_rows(d)
        out[str(d.relative_to(run_dir))] = sorted(json.dumps(r, sort_keys=True, default=str) for r in rows)
    return out


def test_sigkill_mid_stage_then_rerun_gives_identical_tables(tmp_path, ray_local):
    """Kill `r1v run` with SIGKILL while ingest is writing shards; the re-run must match a clean run."""
    cfg = _synth(tmp_path, n=600, rows_per_shard=50)
    ref, _ = run_config(cfg, ["run.name=reference"])
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step = tmp_path / "runs" / "t" / "ingest"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(step.glob("part-*.parquet"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (step / MANIFEST).exists(), "killed before the end: no manifest"
    assert (step / "_progress.json").exists()
    assert main(["run", str(cfg)]) == 0
    assert _tables(step.parent) == _tables(ref.run_dir)
    rows = read_rows(step)
    assert len(rows) == len({r["problem_id"] for r in rows}) == Manifest.load(step).kept


def test_run_seed_and_saved_config_round_trip(tmp_path):
    from pipeline.config import dump_yaml, load_config
    from pipeline.runner import Runner

    cfg = _synth(tmp_path)
    a, b = Runner(load_config(cfg)), Runner(load_config(cfg, ["run.seed=1"]))
    assert a.fingerprint(a.steps[0]) != b.fingerprint(b.steps[0]), "run.seed feeds derived seeds"
    # an explicit null over a non-null default survives the saved config.yaml
    c = load_config(cfg, ["ingest.sources.0.columns.answer_type=null"])
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_yaml(c))
    again = Runner(load_config(saved))
    assert again.cfg.ingest.sources[0].columns.answer_type is None
    assert again.fingerprint(again.steps[0]) == Runner(c).fingerprint(Runner(c).steps[0])


def test_editing_a_prompt_file_makes_the_step_stale(tmp_path):
    from pipeline.runner import _file_contents

    prompt = tmp_path / "system.txt"
    prompt.write_text("Think step by step.")
    tree = {"prompt": {"system_prompt_file": str(prompt)}, "rubric_file": None, "sources": [{"x_file": str(prompt)}]}
    before = _file_contents(tree)
    assert set(before) == {str(prompt)}
    prompt.write_text("Think step by step, then answer in \\\\boxed{}.")
    assert _file_contents(tree) != before
    # a name inside the packages' prompts/ folders resolves too
    assert _file_contents({"prompt_file": "caption.txt"})


def test_default_prompt_files_are_part_of_the_fingerprint(tmp_path):
    from filters.assess import AssessConfig
    from filters.curate import CurateConfig, system_prompt
    from filters.judge import load_rubric
    from pipeline.runner import _file_contents
    from trainers.evaluate import EvaluateConfig

    curate, evaluate = CurateConfig(), EvaluateConfig()
    assess = AssessConfig(judge={"engine": {"kind": "scripted"}})
    assert set(_file_contents(curate.model_dump())) == {"sft_system.txt"}
    assert set(_file_contents(evaluate.model_dump())) == {"sft_system.txt"}
    assert "judge_rubric.md" in _file_contents(assess.model_dump())
    # the names resolve to the files the stages read
    assert system_prompt(curate) == (REPO / "filters" / "prompts" / "sft_system.txt").read_text().strip()
    assert load_rubric(assess.judge.rubric_file) == (REPO / "filters" / "prompts" / "judge_rubric.md").read_text()
