"""The `assemble` stage: registered, imports light, builds the tiny student offline, re-assembles from a step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import validate_config
from pipeline.rundir import fingerprint
from pipeline.runner import StageContext

REPO = Path(__file__).resolve().parents[2]


def _ctx(tmp_path: Path, step: str, cfg, inputs: dict | None = None) -> StageContext:
    run_cfg = validate_config({"run": {"name": "t", "root": str(tmp_path)}, "assemble": cfg.model_dump()})
    out = tmp_path / "t" / step
    out.mkdir(parents=True)
    return StageContext(
        run_dir=tmp_path / "t", step=step, stage="assemble", round=0, out_dir=out,
        inputs=inputs or {}, run_config=run_cfg, fingerprint="x",
    )


def test_registered_and_imports_without_torch():
    from pipeline.stages import STAGES

    names = list(STAGES)
    assert names.index("assemble") > names.index("curate")
    code = "import sys, trainers.assemble, trainers.data, trainers.model; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_demo_config_section_validates():
    from pipeline.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml")
    if cfg.assemble is None:
        pytest.skip("configs/demo.yaml has no assemble section")
    assert cfg.assemble.init == "tiny_random"


def test_tiny_random_stage_builds_a_loadable_student(tmp_path):
    from trainers.assemble import AssembleConfig, run, student_path
    from trainers.model import load_student

    cfg = AssembleConfig(init="tiny_random", seed=1)
    ctx = _ctx(tmp_path, "assemble", cfg)
    m = run(cfg, ctx)
    m.check_counts()
    out = student_path(ctx.out_dir)
    assert m.metrics["student_dir"] == str(out)
    assert m.metrics["architecture"] == "LlavaForConditionalGeneration"
    assert m.metrics["image_tokens_per_image"] == 16
    assert 0 < m.metrics["params_projector"] < m.metrics["params_llm"]
    parts = m.metrics["params_projector"] + m.metrics["params_vision"] + m.metrics["params_llm"]
    assert parts == m.metrics["params_total"]
    model, processor = load_student(out)
    assert processor.image_token == "<image>"


def test_stage_reassembles_from_a_student_step(tiny_student, tiny_ckpts, tmp_path):
    from trainers.assemble import AssembleConfig, run, student_path
    from trainers.tiny import build_tiny_llm

    # A previous step dir holding an exported model, as a train step leaves it.
    prev = tmp_path / "t" / "train-align"
    (prev / "model").mkdir(parents=True)
    for f in tiny_student.iterdir():
        (prev / "model" / f.name).write_bytes(f.read_bytes())
    reasoner = build_tiny_llm(tmp_path / "reasoner", seed=5)
    cfg = AssembleConfig(llm_path=str(reasoner))
    ctx = _ctx(tmp_path, "assemble-reasoner", cfg, {"student": [prev]})
    m = run(cfg, ctx)
    assert m.metrics["history"] == ["assemble", "reassemble"]
    record = json.loads((student_path(ctx.out_dir) / "r1v_assembly.json").read_text())
    assert record["llm_path"] == str(reasoner)
    # A mismatched LLM fails the step with the reason, before writing a student.
    bad = build_tiny_llm(tmp_path / "wide", seed=5, hidden_size=96)
    cfg2 = AssembleConfig(llm_path=str(bad))
    ctx2 = _ctx(tmp_path, "assemble-bad", cfg2, {"student": [prev]})
    with pytest.raises(ValueError, match="hidden size mismatch"):
        run(cfg2, ctx2)
    assert not student_path(ctx2.out_dir).exists()


def test_fingerprint_changes_with_the_checkpoint(tiny_ckpts, tmp_path):
    from trainers.assemble import AssembleConfig, fingerprint_extra

    llm = tmp_path / "llm"
    llm.mkdir()
    for f in Path(tiny_ckpts["llm"]).iterdir():
        (llm / f.name).write_bytes(f.read_bytes())
    cfg = AssembleConfig(vision_path=str(tiny_ckpts["vision"]), llm_path=str(llm))
    before = fingerprint("assemble", "assemble", {"extra": fingerprint_extra(cfg)}, {}, ())
    (llm / "model.safetensors").write_bytes((llm / "model.safetensors").read_bytes() + b"\0")
    after = fingerprint("assemble", "assemble", {"extra": fingerprint_extra(cfg)}, {}, ())
    assert before != after


def test_missing_checkpoint_is_named(tmp_path):
    from trainers.assemble import find_checkpoint

    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        find_checkpoint(tmp_path)
