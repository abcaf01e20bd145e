"""The command line as a user meets it: options and overrides in any order, one-line errors with distinct
exit codes, the nearest valid name suggested, --debug tracebacks, Ctrl-C, help that explains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.errors import EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_STATE, EXIT_USAGE
from pipeline.rundir import MANIFEST, Manifest
from pipeline.schema import PROBLEMS
from tests.filters.stagectx import write_step

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def _err(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.mark.parametrize("argv", [
    ["run", "configs/r1v-38b.yaml", "--stage", "generate", "generate.workers=2"],
    ["run", "configs/r1v-38b.yaml", "generate.workers=2", "--stage", "generate"],
    ["run", "--stage", "generate", "configs/r1v-38b.yaml", "generate.workers=2"],
    ["run", "configs/r1v-38b.yaml", "--stage=generate", "generate.workers=2", "--debug"],
])
def test_options_and_overrides_in_any_order(argv):
    args = cli.parse_args(argv)
    assert args.config == "configs/r1v-38b.yaml" and args.stage == "generate"
    assert args.overrides == ["generate.workers=2"]


def test_overrides_split_around_options_keep_their_order(tmp_path, capsys):
    argv = ["validate", "configs/demo.yaml", "generate.workers=3", "--debug", "generate.workers=2",
            f"run.root={tmp_path}"]
    assert cli.parse_args(argv).overrides == ["generate.workers=3", "generate.workers=2", f"run.root={tmp_path}"]
    assert cli.main(argv) == 0
    assert "configs/demo.yaml: OK" in capsys.readouterr().out


def test_the_config_header_command_reaches_the_runner(tmp_path, capsys):
    # the command printed in configs/r1v-38b.yaml's header, run against the demo: parsed, validated, planned
    rc = cli.main(["run", "configs/demo.yaml", f"run.root={tmp_path}", "--stage", "genrate", "generate.workers=2"])
    [line] = _err(capsys)
    assert rc == EXIT_USAGE
    assert line.startswith("error: no step or stage 'genrate'") and "did you mean `generate`?" in line


@pytest.mark.parametrize("argv, code, expect", [
    (["run", "configs/demo.yaml", "--stgae", "generate"], EXIT_USAGE, "unknown option --stgae (did you mean `--stage`?)"),
    (["rnu", "configs/demo.yaml"], EXIT_USAGE, "unknown command 'rnu' (did you mean `run`?)"),
    (["run"], EXIT_USAGE, "required: config"),
    (["status", "a", "b"], EXIT_USAGE, "unexpected 'b'"),
    (["run", "configs/nope.yaml"], EXIT_INPUT, "configs/nope.yaml"),
    (["validate", "configs/demo.yaml", "generate.temprature=0.5"], EXIT_INPUT, "did you mean `temperature`?"),
    (["validate", "configs/demo.yaml", "genrate.workers=2"], EXIT_INPUT, "did you mean `generate`?"),
    (["validate", "configs/demo.yaml", "generate.engine.p_corect=0.5"], EXIT_INPUT, "did you mean `p_correct`?"),
    (["report", "runs/does-not-exist"], EXIT_INPUT, "run directory runs/does-not-exist not found"),
    (["status", "configs"], EXIT_INPUT, "configs is not a run directory (no config.yaml)"),
])
def test_expected_failures_are_one_line_with_their_exit_code(argv, code, expect, capsys):
    rc = cli.main(argv)
    lines = _err(capsys)
    assert rc == code, lines
    assert any(expect in ln for ln in lines), lines
    assert not any("Traceback" in ln for ln in lines)
    if code == EXIT_USAGE:
        assert len(lines) == 1, lines


def test_debug_prints_the_traceback(capsys):
    assert cli.main(["report", "runs/does-not-exist", "--debug"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("e.g. runs/demo)")


def _stale_run(tmp_path: Path) -> None:
    write_step(tmp_path / "demo", "ingest", PROBLEMS, "problems", [])
    m = Manifest.load(tmp_path / "demo" / "ingest")
    m.fingerprint = "an-older-config"
    m.write(tmp_path / "demo" / "ingest")


def test_stale_upstream_is_one_line_naming_the_command(tmp_path, capsys):
    _stale_run(tmp_path)
    rc = cli.main(["run", "configs/demo.yaml", "--stage", "decontaminate", f"run.root={tmp_path}"])
    [line] = _err(capsys)
    assert rc == EXIT_STATE
    assert line == (f"error: step 'decontaminate' needs 'ingest', which is stale: run it first "
                    f"(r1v run configs/demo.yaml run.root={tmp_path} --from ingest)")


def test_unexpected_error_is_one_line_and_the_traceback_is_kept(monkeypatch, tmp_path, capsys):
    def broken(args):
        args.error_dir = tmp_path
        raise ZeroDivisionError("division by zero in a stage")

    monkeypatch.setattr(cli, "cmd_status", broken)
    assert cli.main(["status", str(tmp_path)]) == EXIT_FAILED
    lines = _err(capsys)
    assert lines[0] == "error: ZeroDivisionError: division by zero in a stage"
    assert f"traceback in {(tmp_path / '_error.txt').resolve()}" in lines[1]
    assert "Traceback (most recent call last)" in (tmp_path / "_error.txt").read_text()
    assert cli.main(["status", str(tmp_path), "--debug"]) == EXIT_FAILED
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("r1v-distill ")
    ap = cli.build_parser()
    sub = ap._subparsers._group_actions[0].choices
    run_help = sub["run"].format_help()
    assert "--from STEP" in run_help and "--stage STEP" in run_help and "FROM_" not in run_help
    assert "exit codes:" in run_help and "130" in run_help
    assert "--out DIR" in sub["report"].format_help()
    assert "section.key=value" in sub["validate"].format_help()
    for name, p in sub.items():  # every positional is described
        for a in p._actions:
            if not a.option_strings:
                assert a.help, f"{name} {a.dest}"


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "R1V_PROGRESS": "0"}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "configs/demo.yaml", f"run.root={tmp_path}"],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    step = tmp_path / "demo" / "generate"
    deadline = time.time() + 300
    while not (step / "_progress.json").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the demo finished or failed before it could be interrupted"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted: finished steps are kept; run the same command again to resume"
    assert (tmp_path / "demo" / "ingest" / MANIFEST).exists() and not (step / MANIFEST).exists()


def test_quiet_by_default_and_verbose_keeps_everything(monkeypatch):
    import logging

    import ray  # noqa: F401 - configures the "ray" logger and its console handler

    from pipeline import logging as plog

    monkeypatch.setenv("R1V_QUIET", "1")
    assert plog.quiet_env()["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    plog.quiet_ray()
    [handler] = [h for h in logging.getLogger("ray").handlers if isinstance(h, logging.StreamHandler)][:1]

    def passes(msg: str, level: int = logging.INFO) -> bool:
        rec = logging.LogRecord("ray._private.worker", level, __file__, 1, msg, None, None)
        return all(f.filter(rec) for f in handler.filters)

    assert not passes("Started a local Ray instance.")
    assert not passes("Token authentication is enabled for this Ray cluster.", logging.WARNING)
    assert passes("Worker crashed: out of memory", logging.WARNING)  # real warnings still show
    monkeypatch.setenv("R1V_QUIET", "0")  # r1v -v
    assert plog.quiet_env() == {}
    args = cli.parse_args(["status", "runs/demo", "-v"])
    assert args.verbose is True and cli.parse_args(["-v", "status", "runs/demo"]).verbose is True


def test_corrupt_image_message_names_the_row_not_a_buffer():
    from pipeline.images import ImageError, image_record

    with pytest.raises(ImageError) as e:
        image_record(b"\x89PNG but not really", "data.jsonl:3 image 0")
    assert str(e.value).startswith("data.jsonl:3 image 0: not a readable image (")
    assert "BytesIO" not in str(e.value) and "0x" not in str(e.value)
