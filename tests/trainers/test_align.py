"""Efficient transfer as configured steps (the demo's `align` phase, on a shortened demo): alignment on the
substitute LLM changes only the projector, re-assembly from the aligned step keeps projector and encoder
bit-identical on the reasoning LLM, a second run skips everything, `r1v plan` lists the align steps, and a
reasoning LLM of another hidden size is refused with the re-assembly error, before any training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import cli
from pipeline.config import load_config
from pipeline.errors import PlanError
from pipeline.plan import expand
from pipeline.rundir import MANIFEST, Manifest

REPO = Path(__file__).resolve().parents[2]
DEMO = "configs/demo.yaml"
SMALL = ["ingest.sources.0.synthetic.n=10", "decontaminate.eval_sets.0.source.synthetic.n=8", "assess.workers=0",
         "generate.workers=0", "filter.workers=0", "rounds.count=1", "align.pairs.sources.0.synthetic.n=16",
         "align.max_steps=3", "align.save_every=0"]
ALIGN_STEPS = ["align-data", "align-assemble", "align", "assemble"]


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    """The demo up to `assemble`, shortened: its align phase runs in full."""
    import os

    root = tmp_path_factory.mktemp("align")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        args = [DEMO, f"run.root={root}", *SMALL]
        assert cli.main(["run", DEMO, "--until", "assemble", *args[1:]]) == 0
    finally:
        os.chdir(cwd)
    return root, args


def test_align_trains_only_the_projector(run):
    root, _ = run
    d = root / "demo"
    before, after = _weights(d / "align-assemble" / "student"), _weights(d / "align" / "model")
    assert sorted(before) == sorted(after)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed and all(k.startswith("multi_modal_projector.") for k in changed), changed
    assert {k for k in before if k.startswith("multi_modal_projector.")} == set(changed)
    m = Manifest.load(d / "align")
    assert m.metrics["freeze"] == "projector" and m.metrics["steps"] == 3
    assert m.rows_in == Manifest.load(d / "align-data").kept == m.kept
    # the substitute is another LLM of the same shape: the reasoning LLM's weights differ
    sub = json.loads((d / "align-assemble" / "student" / "r1v_assembly.json").read_text())
    assert sub["assemble_config"]["seed"] == 1 and sub["llm_path"].startswith(str(d / "align-assemble"))


def test_reassembly_from_the_aligned_step_keeps_projector_and_encoder(run):
    root, _ = run
    d = root / "demo"
    aligned, student = _weights(d / "align" / "model"), _weights(d / "assemble" / "student")
    assert sorted(aligned) == sorted(student)
    kept = [k for k in aligned if k.startswith(("multi_modal_projector.", "vision_tower."))]
    assert any("projector" in k for k in kept) and any("vision_tower" in k for k in kept)
    for k in kept:
        assert torch.equal(aligned[k], student[k]), k
    # ... and the LLM is the reasoning one (assemble's own tiny LLM, seed 0), not the substitute
    llm = load_file(str(d / "assemble" / "tiny" / "llm" / "model.safetensors"))
    lm = {k: v for k, v in student.items() if k not in kept}
    assert len(lm) == len(llm)
    for k, v in llm.items():
        name = f"language_model.{k}"
        assert torch.equal(lm[name], v), k
        assert not torch.equal(aligned[name], v) or v.dim() == 1, k  # the substitute's weights are gone
    record = json.loads((d / "assemble" / "student" / "r1v_assembly.json").read_text())
    assert [h["op"] for h in record["history"]] == ["assemble", "align", "reassemble"]
    assert record["history"][-1]["from"] == str(d / "align" / "model")
    assert Manifest.load(d / "assemble").upstream == {"align": Manifest.load(d / "align").fingerprint}


def test_a_second_run_skips_every_step_and_the_plan_lists_the_align_steps(run, capsys, monkeypatch):
    root, args = run
    d = root / "demo"
    mtimes = {p.parent.name: p.stat().st_mtime_ns for p in d.glob("*/" + MANIFEST)}
    assert set(ALIGN_STEPS) <= set(mtimes)
    monkeypatch.chdir(REPO)
    assert cli.main(["run", DEMO, "--until", "assemble", *args[1:]]) == 0
    assert {p.parent.name: p.stat().st_mtime_ns for p in d.glob("*/" + MANIFEST)} == mtimes
    capsys.readouterr()
    assert cli.main(["plan", "--json", *args]) == 0
    steps = {s["step"]: s for s in json.loads(capsys.readouterr().out)["steps"]}
    for name in ALIGN_STEPS:
        assert steps[name]["status"] == "done" and steps[name]["fingerprint"] == Manifest.load(d / name).fingerprint
    assert [(steps[n]["stage"], steps[n]["phase"]) for n in ALIGN_STEPS] == [
        ("pairs", "align"), ("assemble", "align"), ("align", "align"), ("assemble", "student")]
    assert steps["align"]["inputs"] == {"sft": ["align-data"], "model": ["align-assemble"]}
    assert steps["assemble"]["inputs"] == {"student": ["align"]}
    assert cli.main(["plan", *args]) == 0
    out = capsys.readouterr().out
    assert "align-data" in out and "sft <- align-data; model <- align-assemble" in out and "student <- align" in out


def test_without_an_align_section_assemble_has_no_inputs(tmp_path):
    steps = expand(load_config(REPO / DEMO, [f"run.root={tmp_path}", "align=null"]))
    assert not any(s.phase == "align" for s in steps)
    assert next(s for s in steps if s.name == "assemble").inputs == {}
    # without an assemble section (a data-only run) there is no student to align: the phase is left out
    steps = expand(load_config(REPO / DEMO, [f"run.root={tmp_path}", "assemble=null", "train=null", "evaluate=null", "rl=null"]))
    assert steps[-1].name == "curate-r2" and not any(s.phase == "align" for s in steps)


@pytest.mark.parametrize("override, message", [
    (["align.substitute.seed=0"], "that builds the reasoning LLM itself"),
    (["align.substitute.seed=null"], "align.substitute.seed: required"),
    (["assemble.reassemble_from=/some/student"], "leave assemble.reassemble_from unset"),
])
def test_align_settings_that_do_not_fit_are_refused_by_the_plan(tmp_path, override, message):
    with pytest.raises(PlanError, match=message):
        expand(load_config(REPO / DEMO, [f"run.root={tmp_path}", *override]))


def test_validate_names_a_missing_pairs_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    missing = tmp_path / "captions.jsonl"
    assert cli.main(["validate", DEMO, f"run.root={tmp_path}", "align.pairs.sources.0.kind=jsonl",
                     "align.pairs.sources.0.synthetic=null", f"align.pairs.sources.0.path={missing}"]) == 1
    assert f"align.pairs.sources.0.path: file not found: {missing}" in capsys.readouterr().err


def test_a_reasoning_llm_of_another_hidden_size_is_refused(run, tmp_path):
    """Real checkpoints: the substitute has hidden size 64, the reasoning LLM 96. Alignment stops before
    training; after an alignment onto a fitting LLM, re-assembly onto the other one fails the same way."""
    from pipeline.runner import Runner
    from trainers.model import ReassemblyError
    from trainers.tiny import build_tiny_llm, build_tiny_siglip

    root, args = run
    shutil.copytree(root / "demo", tmp_path / "demo")
    vision = build_tiny_siglip(tmp_path / "ckpt" / "vision", seed=0)
    substitute = build_tiny_llm(tmp_path / "ckpt" / "substitute", seed=1)
    reasoner = build_tiny_llm(tmp_path / "ckpt" / "reasoner", seed=2)
    wide = build_tiny_llm(tmp_path / "ckpt" / "wide", seed=2, hidden_size=96)
    pretrained = [f"run.root={tmp_path}", *args[2:], "assemble.init=pretrained", f"assemble.vision_path={vision}",
                  "align.substitute.seed=null", f"align.substitute.llm_path={substitute}"]

    cfg = load_config(REPO / DEMO, [*pretrained, f"assemble.llm_path={wide}"])
    with pytest.raises(ReassemblyError, match="hidden size mismatch: the projector outputs 64-d embeddings, "
                                              "the new LLM expects 96-d") as err:
        Runner(cfg).run(from_="align-data", until="align")
    assert str(wide) in str(err.value)
    assert not (tmp_path / "demo" / "align" / "model").exists() and not (tmp_path / "demo" / "align" / MANIFEST).exists()

    Runner(load_config(REPO / DEMO, [*pretrained, f"assemble.llm_path={reasoner}"])).run(until="assemble")
    runner = Runner(load_config(REPO / DEMO, [*pretrained, f"assemble.llm_path={wide}"]))
    assert {s.name: runner.state(s)[0] for s in runner.steps if s.phase == "align"} == {
        "align-data": "done", "align-assemble": "done", "align": "done", "evaluate-align": "done"}
    # (the reasoning LLM is assemble's alone)
    with pytest.raises(ReassemblyError, match="hidden size mismatch") as err:
        runner.run(from_="assemble", until="assemble")
    assert str(wide) in str(err.value)
