"""State that survives real use: config-relative paths, the run lock, fingerprints that move only when
the output would, multiple-choice ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.errors import EXIT_INPUT
from pipeline.ingest import IngestConfig, fingerprint_extra, problem_id
from pipeline.paths import ROOT_ENV, file_stat
from pipeline.runlock import RunLock, RunLockedError, is_locked
from pipeline.runner import Runner

from .helpers import png_bytes, write_jsonl

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"


# ------------------------------------------------------------------ paths


def _project(tmp_path: Path) -> Path:
    """A project folder with configs/ and a data file beside it, referenced relatively."""
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "p.jsonl", [{"question": f"q{i}?", "answer": str(i)} for i in range(5)])
    (tmp_path / "configs").mkdir()
    cfg = {"run": {"name": "rel", "root": "../runs"},
           "ingest": {"sources": [{"kind": "jsonl", "path": "../data/p.jsonl", "columns": {"images": None}}]}}
    p = tmp_path / "configs" / "rel.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_relative_paths_resolve_against_the_config_folder_from_any_working_dir(tmp_path, monkeypatch):
    p = _project(tmp_path)
    monkeypatch.delenv(ROOT_ENV, raising=False)
    seen = set()
    for cwd in (tmp_path, tmp_path / "configs", tmp_path / "data", Path("/")):
        monkeypatch.chdir(cwd)
        cfg = load_config(os.path.relpath(p, cwd))
        seen.add((cfg.run.root, cfg.ingest.sources[0].path))
        assert main(["validate", os.path.relpath(p, cwd)]) == 0
    assert seen == {(str(tmp_path / "runs"), str(tmp_path / "data" / "p.jsonl"))}


def test_command_line_paths_resolve_against_the_working_dir_and_r1v_root_wins_over_a_relative_root(tmp_path, monkeypatch):
    p = _project(tmp_path)
    monkeypatch.chdir(tmp_path / "data")
    cfg = load_config(p, ["run.root=out", "ingest.sources.0.path=p.jsonl"])
    assert cfg.run.root == str(tmp_path / "data" / "out")
    assert cfg.ingest.sources[0].path == str(tmp_path / "data" / "p.jsonl")
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "shared-root"))
    assert load_config(p).run.root == str(tmp_path / "shared-root")
    assert load_config(p, [f"run.root={tmp_path / 'abs'}"]).run.root == str(tmp_path / "abs")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_validates_from_another_working_dir(name, tmp_path, monkeypatch):
    monkeypatch.delenv(ROOT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    uses_shared = "shared/data" in json.dumps(raw)
    if uses_shared and not SHARED.exists():
        pytest.skip("../shared/data is not here")
    cfg = load_config(REPO / "configs" / name)
    assert cfg.run.root == str(REPO / "runs")
    over = []
    if cfg.align is not None and cfg.align.substitute.llm_path:
        # a production config names checkpoints and pair files of its cluster: validate names them when they
        # are missing, and passes once they are there
        assert main(["validate", str(REPO / "configs" / name)]) == EXIT_INPUT
        (tmp_path / "substitute").mkdir()
        (tmp_path / "pairs.jsonl").write_text("")
        over = [f"align.substitute.llm_path={tmp_path / 'substitute'}", f"align.pairs.sources.0.path={tmp_path / 'pairs.jsonl'}"]
    assert main(["validate", str(REPO / "configs" / name), *over]) == 0


def test_under_ray_job_a_relative_root_or_cache_is_refused_with_what_to_set(tmp_path, monkeypatch):
    p = _project(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "x"}}))
    monkeypatch.delenv(ROOT_ENV, raising=False)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "run.root='../runs'" in str(e.value) and ROOT_ENV in str(e.value) and "runtime-env-json" in str(e.value)
    monkeypatch.setenv(ROOT_ENV, str(tmp_path / "persist"))
    assert load_config(p).run.root == str(tmp_path / "persist")
    with pytest.raises(ConfigError, match=r"generate.cache_dir='cache'"):
        load_config(p, ["generate.cache_dir=cache", "generate.engine.kind=scripted"])
    # a relative input missing from Ray's copy of the working dir is named, with the advice
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"ingest.sources.0.path='nope.jsonl'.*absolute path"):
        load_config(p, ["ingest.sources.0.path=nope.jsonl"])


# ------------------------------------------------------------------ one writer per run


_HOLD = """
import sys, time
from pipeline.runlock import RunLock
lock = RunLock(sys.argv[1], command="r1v run configs/demo.yaml (holder)").acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_second_driver_is_refused_naming_the_holder_and_a_dead_holder_frees_the_run(tmp_path, capsys):
    p = _project(tmp_path)
    run_dir = tmp_path / "runs" / "rel"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError) as e:
            Runner(load_config(p)).run()
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and "(holder)" in msg and str(run_dir) in msg
        assert is_locked(run_dir)["pid"] == holder.pid
        assert main(["run", str(p)]) == 3
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err
        print("REFUSAL:", err.strip(), file=sys.__stderr__)
        assert not (run_dir / "ingest").exists(), "the refused driver must not touch the run"
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing anything: the kernel dropped its lock, the next driver runs
    assert is_locked(run_dir) is None
    res = Runner(load_config(p)).run()
    assert res["ingest"].kept == 5
    with RunLock(run_dir):
        with pytest.raises(RunLockedError):
            RunLock(run_dir).acquire()


# ------------------------------------------------------------------ ingest fingerprint


def test_ingest_fingerprint_stamps_exactly_the_files_rows_reference(tmp_path):
    d = tmp_path / "src"
    (d / "img").mkdir(parents=True)
    for name in ("a.png", "b.png", "unused.png"):
        (d / "img" / name).write_bytes(png_bytes())
    write_jsonl(d / "p.jsonl", [{"question": "q1?", "answer": "1", "images": ["img/a.png"]},
                                {"question": "q2?", "answer": "2", "images": "img/b.png"}])
    cfg = IngestConfig.model_validate({"sources": [{"kind": "jsonl", "path": str(d / "p.jsonl")}]})
    fp0 = fingerprint_extra(cfg)
    # runs, caches, a venv or .git beside the data change nothing
    (d / "runs" / "demo").mkdir(parents=True)
    (d / "runs" / "demo" / "part-00000.parquet").write_bytes(b"x")
    (d / ".git").mkdir()
    (d / ".git" / "index").write_bytes(b"y")
    (d / "img" / "unused.png").write_bytes(png_bytes((0, 0, 0)))
    assert fingerprint_extra(cfg) == fp0
    # a referenced image replaced (same size, new mtime) changes it
    time.sleep(0.01)
    st = (d / "img" / "b.png").stat()
    os.utime(d / "img" / "b.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    fp1 = fingerprint_extra(cfg)
    assert fp1 != fp0
    # the data file edited changes it
    write_jsonl(d / "p.jsonl", [{"question": "q1?", "answer": "1", "images": ["img/a.png"]}])
    assert fingerprint_extra(cfg) not in (fp0, fp1)
    # a text-only source stats only itself
    cfg_text = IngestConfig.model_validate({"sources": [{"kind": "jsonl", "path": str(d / "p.jsonl"),
                                                         "columns": {"images": None}}]})
    t0 = fingerprint_extra(cfg_text)
    (d / "img" / "a.png").write_bytes(png_bytes((1, 2, 3), size=(10, 10)))
    assert fingerprint_extra(cfg_text) == t0


def test_file_stat_has_nanosecond_mtime():
    p = Path(__file__)
    assert file_stat(p)[2] == p.stat().st_mtime_ns
    assert file_stat(p.with_name("missing.x")) == [str(p.with_name("missing.x")), None]


# ------------------------------------------------------------------ fingerprints follow the code and files


def test_a_stage_logic_version_bump_makes_its_step_and_the_following_ones_stale(tmp_path, monkeypatch):
    import pipeline.ingest as ingest_mod

    p = _project(tmp_path)
    Runner(load_config(p)).run()
    assert Runner(load_config(p)).state(Runner(load_config(p)).steps[0])[0] == "done"
    monkeypatch.setattr(ingest_mod, "LOGIC_VERSION", ingest_mod.LOGIC_VERSION + 1)
    r = Runner(load_config(p))
    assert r.state(r.steps[0])[0] == "stale"


def test_manifest_records_library_versions(tmp_path):
    p = _project(tmp_path)
    m = Runner(load_config(p)).run()["ingest"]
    for lib in ("math-verify", "transformers", "deepspeed", "vllm"):
        assert lib in m.versions
    assert m.versions["transformers"] != "not installed"


# ------------------------------------------------------------------ ids


def test_multiple_choice_problems_with_other_options_are_other_problems(tmp_path):
    from pipeline.ingest import SourceConfig, load_sources

    rows = [{"question": "Which is largest?", "answer": "B", "choices": ["1", "2", "3"]},
            {"question": "Which is largest?", "answer": "B", "choices": ["5", "9", "7"]},
            {"question": "Which is largest?", "answer": "B", "choices": ["1", "2", "3"]}]
    src = SourceConfig(kind="jsonl", path=str(write_jsonl(tmp_path / "mc.jsonl", rows)))
    out = list(load_sources([src]))
    assert [k for k, _ in out] == ["problem", "problem", "duplicate"]
    assert out[0][1]["problem_id"] != out[1][1]["problem_id"]
    # problems without options keep their ids
    assert problem_id("q", [], "1") == problem_id("q", [], "1", None)


def test_files_a_stage_output_depends_on_are_in_its_fingerprint(tmp_path):
    """DeepSpeed JSON (train), the student's chat template (assemble), a prompt file beside the config."""
    ds = tmp_path / "configs" / "ds.json"
    ds.parent.mkdir()
    shutil.copy(REPO / "configs" / "deepspeed" / "zero2.json", ds)
    (tmp_path / "configs" / "system.txt").write_text("Think first.")
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["train"]["deepspeed_config"] = "ds.json"
    raw["generate"]["prompt"] = {"system_prompt_file": "system.txt"}
    cfg_path = tmp_path / "configs" / "demo.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))

    def fps():
        r = Runner(load_config(cfg_path, [f"run.root={tmp_path / 'runs'}"]))
        return {s.name: r.fingerprint(s) for s in r.steps}

    base = fps()
    ds.write_text(ds.read_text().replace('"gradient_clipping"', '"gradient_clipping_"'))
    after_ds = fps()
    assert after_ds["train"] != base["train"] and after_ds["assemble"] == base["assemble"]
    assert after_ds["generate"] == base["generate"]
    (tmp_path / "configs" / "system.txt").write_text("Think twice.")
    after_prompt = fps()
    assert after_prompt["generate"] != after_ds["generate"] and after_prompt["ingest"] == after_ds["ingest"]


def test_chat_template_edit_changes_assemble_fingerprint(tmp_path, monkeypatch):
    import trainers.chat as chat_mod
    import trainers.tiny as tiny_mod
    from trainers.assemble import fingerprint_extra as assemble_extra
    from trainers.model import AssembleConfig

    tpl = tmp_path / "templates"
    shutil.copytree(chat_mod.TEMPLATES, tpl)
    monkeypatch.setattr(chat_mod, "TEMPLATES", tpl)
    cfg = AssembleConfig(init="tiny_random", chat_template="chatml_think")
    before = assemble_extra(cfg)
    (tpl / "chatml_think.jinja").write_text((tpl / "chatml_think.jinja").read_text() + "\n")
    assert assemble_extra(cfg) != before
    # the default: the LLM's own template (the tiny LLM's, for tiny_random), by content
    auto = AssembleConfig(init="tiny_random")
    before = assemble_extra(auto)
    monkeypatch.setattr(tiny_mod, "TINY_CHAT_TEMPLATE", tiny_mod.TINY_CHAT_TEMPLATE + " ")
    assert assemble_extra(auto) != before


def _child(ready, stop) -> None:
    ready.set()
    stop.wait(60)


def test_a_forked_child_does_not_keep_the_run_locked(tmp_path):
    """Verifier workers fork from the driver: when the driver dies, a child still alive must not hold
    the run."""
    import multiprocessing as mp

    lock = RunLock(tmp_path / "run").acquire()
    ctx = mp.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_child, args=(ready, stop))
    child.start()
    assert ready.wait(30)  # the child runs (its at-fork handlers have run)
    try:
        os.close(lock._fd)  # the driver's fd goes as at its death (no unlock call); the child lives on
        with RunLock(tmp_path / "run"):
            pass
    finally:
        stop.set()
        child.join(10)
