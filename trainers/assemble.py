"""The `assemble` stage: build (or re-assemble) the student and save it in `<step>/student/`.

    r1v run configs/demo.yaml --stage assemble      # demo: tiny random SigLIP + Qwen2, offline, seconds

Config: trainers.model.AssembleConfig. Three uses, one stage:
- assemble: vision_path + llm_path (Skywork R1V: the *substitute* instruct LLM) -> fresh projector;
- re-assemble: the projector (and encoder) of an aligned student, from `reassemble_from` or from the
  step given as input role "student" (in the plan: the `align` step, when an `align` section is
  configured: its exported `model/`), onto llm_path (the reasoning LLM); a mismatch in architecture,
  hidden size or vocabulary fails before any weights load;
- init: tiny_random builds tiny checkpoints in `<step>/tiny/` first (offline demos and tests only); the
  plan's `align-assemble` step builds its substitute student so with `align.substitute.seed`.

No table is written (TABLES is empty); the manifest records the layout, parameter counts and the image
tokens per image. `student_path(step_dir)` is where downstream steps find the checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.rundir import Manifest
from trainers.model import ASSEMBLY_FILE, AssembleConfig

log = logging.getLogger(__name__)

__all__ = ["AssembleConfig", "TABLES", "run", "fingerprint_extra", "student_path", "find_checkpoint"]

TABLES: tuple[str, ...] = ()
STUDENT_DIR = "student"
# Where other stages leave an HF checkpoint inside their step dir, in the order they are tried.
CHECKPOINT_SUBDIRS = (STUDENT_DIR, "model", "final")


def student_path(step_dir: str | Path) -> Path:
    """The student checkpoint an `assemble` step writes."""
    return Path(step_dir) / STUDENT_DIR


def find_checkpoint(step_dir: str | Path) -> Path:
    """The HF checkpoint in a step dir (`student/`, `model/`, `final/`, or the dir itself)."""
    d = Path(step_dir)
    for sub in CHECKPOINT_SUBDIRS:
        if (d / sub / "config.json").exists():
            return d / sub
    if (d / "config.json").exists():
        return d
    raise FileNotFoundError(f"no HF checkpoint in {d} (looked for config.json in {', '.join(CHECKPOINT_SUBDIRS)} and .)")


def _path_stats(path: str | None) -> dict[str, Any] | None:
    """Size and mtime of a checkpoint's files: a changed checkpoint changes the fingerprint."""
    if not path:
        return None
    p = Path(path)
    if not p.exists():
        return {"missing": str(p)}
    from pipeline.paths import file_stat

    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    return {f.name: file_stat(f)[1:] for f in files}


def fingerprint_extra(cfg: AssembleConfig) -> dict:
    """Checkpoint stamps, and the chat template the student is saved with, by content: the template file,
    or the LLM's own template (tiny_random: the one trainers.tiny gives its LLM) and the code wrapping it."""
    from trainers.chat import template_fingerprint
    from trainers.tiny import TINY_CHAT_TEMPLATE

    tiny = TINY_CHAT_TEMPLATE if cfg.init == "tiny_random" else None
    return {"vision": _path_stats(cfg.vision_path), "llm": _path_stats(cfg.llm_path),
            "from": _path_stats(cfg.reassemble_from),
            "chat_template": template_fingerprint(cfg.chat_template, cfg.llm_path, tiny)}


def _count(model, key: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if key in n)


def run(cfg: AssembleConfig, ctx) -> Manifest:
    from trainers.model import assemble_student, load_student

    m = ctx.manifest()
    out = student_path(ctx.out_dir)
    if "student" in ctx.inputs:
        if cfg.reassemble_from:
            raise ValueError(f"step {ctx.step!r}: both an input step 'student' and assemble.reassemble_from are set")
        source = find_checkpoint(ctx.input_dirs("student")[0])
        cfg = cfg.model_copy(update={"reassemble_from": str(source)})
    if cfg.reassemble_from and not cfg.llm_path and cfg.init != "tiny_random":
        raise ValueError(f"step {ctx.step!r}: re-assembly needs assemble.llm_path (the new LLM)")
    assemble_student(cfg, out, tiny_dir=ctx.out_dir / "tiny")
    model, processor = load_student(out, dtype="float32" if cfg.dtype == "float32" else cfg.dtype)
    record = json.loads((out / ASSEMBLY_FILE).read_text())
    total = sum(p.numel() for p in model.parameters())
    m.metrics.update(
        {
            "student_dir": str(out),
            "layout": record["layout"],
            "architecture": type(model).__name__,
            "params_total": total,
            "params_projector": _count(model, "multi_modal_projector"),
            "params_vision": _count(model, "vision_tower"),
            "params_llm": total - _count(model, "multi_modal_projector") - _count(model, "vision_tower"),
            "image_tokens_per_image": int(model.config.image_seq_length),
            "history": [h["op"] for h in record.get("history", [])],
        }
    )
    log.info(
        "assemble: %s (%s), %s params (projector %s) -> %s",
        record["layout"], type(model).__name__, f"{total:,}", f"{m.metrics['params_projector']:,}", out,
    )
    del model, processor
    return m
