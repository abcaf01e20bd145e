"""The declared plan and `r1v plan`: every step of the demo with the inputs the stages really read, the
JSON view, done / stale / missing as steps run and configs change, `--until` running exactly a prefix,
unknown names with the nearest suggestion, and a phase added in one place showing up with its inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import cli
from pipeline import plan as plan_mod
from pipeline import runner as runner_mod
from pipeline.config import load_config
from pipeline.errors import EXIT_USAGE, PlanError
from pipeline.plan import PLAN, Entry, Phase, Use, expand
from pipeline.rundir import MANIFEST, Manifest

REPO = Path(__file__).resolve().parents[2]
DEMO = "configs/demo.yaml"
# The demo, smaller: few problems, one CPU's worth of workers (the plan is the same shape).
SMALL = ["ingest.sources.0.synthetic.n=10", "decontaminate.eval_sets.0.source.synthetic.n=8",
         "assess.workers=0", "generate.workers=0", "filter.workers=0"]

DEMO_STEPS = {
    "ingest": {},
    "decontaminate": {"problems": ["ingest"]},
    "assess": {"problems": ["decontaminate"]},
    "caption": {"problems": ["assess"]},
    "generate": {"problems": ["caption"]},
    "filter": {"chains": ["generate"], "problems": ["caption"]},
    "curate": {"chains": ["filter"], "problems": ["caption"]},
    "generate-r1": {"problems": ["caption"], "retry": ["curate"]},
    "filter-r1": {"chains": ["generate-r1"], "problems": ["caption"]},
    "curate-r1": {"chains": ["filter-r1"], "problems": ["caption"], "retry": ["curate"]},
    "generate-r2": {"problems": ["caption"], "retry": ["curate-r1"]},
    "filter-r2": {"chains": ["generate-r2"], "problems": ["caption"]},
    "curate-r2": {"chains": ["filter-r2"], "problems": ["caption"], "retry": ["curate-r1"]},
    "align-data": {},
    "align-assemble": {},
    "align": {"sft": ["align-data"], "model": ["align-assemble"]},
    "evaluate-align": {"model": ["align"], "problems": ["caption"]},
    "assemble": {"student": ["align"]},
    "train": {"sft": ["curate", "curate-r1", "curate-r2"], "model": ["assemble"]},
    "evaluate": {"model": ["train"], "problems": ["caption"]},
    "train-t1": {"sft": ["curate", "curate-r1", "curate-r2"], "model": ["train"], "wrong": ["evaluate"]},
    "evaluate-t1": {"model": ["train-t1"], "problems": ["caption"]},
    "train-t2": {"sft": ["curate", "curate-r1", "curate-r2"], "model": ["train-t1"], "wrong": ["evaluate-t1"]},
    "evaluate-t2": {"model": ["train-t2"], "problems": ["caption"]},
    "rl": {"model": ["train-t2"], "problems": ["caption"]},
    "evaluate-rl": {"model": ["rl"], "problems": ["caption"]},
}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def _plan_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli.main(["plan", "--json", DEMO, *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_demo_plan_lists_every_step_with_its_inputs(tmp_path, capsys):
    got = _plan_json(capsys, f"run.root={tmp_path}")
    assert [s["step"] for s in got["steps"]] == list(DEMO_STEPS)
    assert {s["step"]: s["inputs"] for s in got["steps"]} == DEMO_STEPS
    assert {s["status"] for s in got["steps"]} == {"missing"} and got["counts"]["missing"] == len(DEMO_STEPS)
    assert got["run_dir"] == str(tmp_path / "demo")
    runner = runner_mod.Runner(load_config(DEMO, [f"run.root={tmp_path}"]))
    assert [s["fingerprint"] for s in got["steps"]] == [runner.fingerprint(s) for s in runner.steps]
    phases = {s["step"]: s["phase"] for s in got["steps"]}
    assert [phases[n] for n in ("ingest", "caption", "generate", "curate-r2", "align-data", "align", "assemble", "train",
                                "evaluate-t2")] == [
        "prepare", "prepare", "distill", "distill", "align", "align", "student", "sft", "sft"]
    stages = {s["step"]: s["stage"] for s in got["steps"]}
    assert [stages[n] for n in ("align-data", "align-assemble", "align", "assemble")] == [
        "pairs", "assemble", "align", "assemble"]

    # The table a person reads: every step on its own row, with its inputs and a short fingerprint.
    assert cli.main(["plan", DEMO, f"run.root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    rows = {cells[2].strip(): cells for ln in out.splitlines() if len(cells := ln.split("│")) == 7}
    for s in got["steps"]:
        cells = rows[s["step"]]
        assert cells[4].strip() == s["fingerprint"][:10] and cells[5].strip() == "missing"
    assert "train-t1" in out and "wrong <- evaluate" in out and f"{len(DEMO_STEPS)} steps: 0 done, 0 stale, {len(DEMO_STEPS)} missing" in out


class _ReadLog(dict):
    """ctx.inputs that records which roles the stage actually looks up."""

    reads: dict[str, set[str]] = {}
    step = ""

    def __getitem__(self, role):
        _ReadLog.reads.setdefault(self.step, set()).add(role)
        return super().__getitem__(role)


def test_until_runs_the_prefix_status_follows_and_stages_read_what_the_plan_declares(
        tmp_path, capsys, monkeypatch, ray_local):
    real_ctx = runner_mod.StageContext

    def recording_ctx(**kw):
        inputs = _ReadLog(kw.pop("inputs"))
        inputs.step = kw["step"]
        return real_ctx(inputs=inputs, **kw)

    _ReadLog.reads = {}
    monkeypatch.setattr(runner_mod, "StageContext", recording_ctx)
    root = [f"run.root={tmp_path}", *SMALL]
    assert cli.main(["run", DEMO, "--until", "curate-r1", *root]) == 0
    prefix = list(DEMO_STEPS)[:list(DEMO_STEPS).index("curate-r1") + 1]
    run_dir = tmp_path / "demo"
    assert sorted(p.parent.name for p in run_dir.glob("*/" + MANIFEST)) == sorted(prefix)
    # every input the plan declares is read by its stage (and none other: an undeclared one raises KeyError)
    for step in prefix:
        assert _ReadLog.reads.get(step, set()) == set(DEMO_STEPS[step]), step
        assert set(Manifest.load(run_dir / step).upstream) == {u for ups in DEMO_STEPS[step].values() for u in ups}

    got = _plan_json(capsys, *root)
    status = {s["step"]: s["status"] for s in got["steps"]}
    assert [n for n, st in status.items() if st == "done"] == prefix
    assert all(st == "missing" for n, st in status.items() if n not in prefix)

    # a changed curate setting: curate and everything downstream of it is stale, with the reason
    got = _plan_json(capsys, *root, "curate.n_per_problem=1")
    by = {s["step"]: s for s in got["steps"]}
    assert [n for n in prefix if by[n]["status"] == "stale"] == ["curate", "generate-r1", "filter-r1", "curate-r1"]
    assert by["curate"]["reason"] == "config or code changed"
    assert by["generate-r1"]["reason"] == "input changed: curate"
    assert by["filter"]["status"] == "done"

    # --from with --until re-runs exactly that slice, whatever the steps' state
    mtimes = {n: (run_dir / n / MANIFEST).stat().st_mtime_ns for n in prefix}
    assert cli.main(["run", DEMO, *root, "--from", "curate", "--until", "generate-r1"]) == 0
    rerun = {n for n in prefix if (run_dir / n / MANIFEST).stat().st_mtime_ns != mtimes[n]}
    assert rerun == {"curate", "generate-r1"}
    assert all(s["status"] == "done" for s in _plan_json(capsys, *root)["steps"] if s["step"] in prefix)


@pytest.mark.parametrize("argv, expect", [
    (["run", DEMO, "--until", "curat"], "no step or stage 'curat' in this run's plan (did you mean `curate`?)"),
    (["run", DEMO, "--from", "filter-r9"], "did you mean `filter-r2`?"),
    (["run", DEMO, "--from", "curate", "--until", "filter"], "--until filter comes before --from curate"),
    (["run", DEMO, "--stage", "curate", "--until", "train"], "--until goes alone or with --from"),
])
def test_bad_step_names_are_usage_errors_with_the_nearest(argv, expect, tmp_path, capsys):
    assert cli.main([*argv, f"run.root={tmp_path}"]) == EXIT_USAGE
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert expect in line
    assert not (tmp_path / "demo").exists(), "a refused command touches nothing"


def test_a_phase_added_in_one_place_appears_with_its_inputs(tmp_path, capsys, monkeypatch):
    final = Phase("final", (Entry("evaluate", {"model": Use("model"), "problems": Use("problems")},
                                  name="evaluate-final"),), requires=("train",))
    monkeypatch.setattr(plan_mod, "PLAN", (*PLAN, final))
    got = _plan_json(capsys, f"run.root={tmp_path}")
    last = got["steps"][-1]
    assert (last["step"], last["stage"], last["phase"]) == ("evaluate-final", "evaluate", "final")
    assert last["inputs"] == {"model": ["rl"], "problems": ["caption"]}  # the last model: the RL one
    assert last["status"] == "missing" and len(last["fingerprint"]) == 24
    assert [s["step"] for s in got["steps"][:-1]] == list(DEMO_STEPS)

    # a repeated phase expands from config, and a channel provided in an earlier phase feeds it
    cfg = load_config(DEMO, [f"run.root={tmp_path}"])
    polish = Phase("polish", (Entry("evaluate", {"model": Use("model")}, ("wrong",), name="score"),),
                   rounds=lambda c: c.rounds.count, suffix="p")
    steps = expand(cfg, (*PLAN, polish))
    assert [(s.name, s.inputs) for s in steps[-3:]] == [("score", {"model": ["rl"]}),
                                                        ("score-p1", {"model": ["rl"]}),
                                                        ("score-p2", {"model": ["rl"]})]
    with pytest.raises(PlanError, match="names steps twice: evaluate"):
        expand(cfg, (*PLAN, Phase("again", (Entry("evaluate", {"model": Use("model")}),))))


def test_every_registered_stage_has_a_place_in_the_plan():
    from pipeline.stages import STAGES

    planned = [e.stage for ph in PLAN for e in ph.entries]
    assert sorted(set(planned)) == sorted(STAGES), "a configured section with no plan entry would never run"
    with pytest.raises(PlanError, match="unregistered stages"):
        expand(load_config(DEMO), (Phase("x", (Entry("nosuch"),)),))


def test_plan_refusals_are_typed(tmp_path):
    cfg = load_config(DEMO, [f"run.root={tmp_path}", "assemble=null"])
    with pytest.raises(PlanError, match="train.init_from"):
        expand(cfg)
    cfg = load_config(DEMO, [f"run.root={tmp_path}", "generate=null", "filter=null", "rounds.overrides=[]"])
    with pytest.raises(PlanError, match="curate reads chains"):
        expand(cfg)
    assert cli.main(["plan", DEMO, f"run.root={tmp_path}", "assemble=null"]) == 1
