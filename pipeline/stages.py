"""The stage registry: every pipeline stage, in pipeline order, in one explicit dict.

A stage module defines `<Stage>Config` (a `pipeline.config.StageConfig`), `run(cfg, ctx) -> Manifest`,
and `TABLES` (the table names it writes, for fingerprints). It may define
`fingerprint_extra(cfg) -> dict` for inputs outside the run directory (e.g. source file stats),
`preflight(cfg) -> list[str]` for problems found without reading data (missing files), and
`RESUMABLE = True` when its `run` reads back the shards of a killed attempt (`ctx.resume`) and
writes only what is missing; other stages start from an empty step directory.
`LOGIC_VERSION = n` (default 1) enters the fingerprint: bump it with any code change that changes the
stage's output (a verifier fix, a new id scheme), so finished steps become stale. `ROWS_FROM = role`
names the input whose table rows_in counts; the runner records how rows_in follows from those input
steps' manifests (Manifest.inputs).
Which steps a config expands to, and what each consumes, is declared in pipeline/plan.py (PLAN).
A stage with `section=False` has no top-level config section: plan entries derive its settings from
another section (`pairs` reads `align.pairs`).
Stage modules import only light modules at the top; torch, transformers and vLLM load inside `run`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class StageSpec:
    module: str
    config: str
    section: bool = True  # the run config has a top-level section of this name

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def config_class(self) -> type:
        return getattr(self.load(), self.config)


STAGES: dict[str, StageSpec] = {
    "ingest": StageSpec("pipeline.ingest", "IngestConfig"),
    "decontaminate": StageSpec("filters.decontaminate", "DecontaminateConfig"),
    "assess": StageSpec("filters.assess", "AssessConfig"),
    "caption": StageSpec("teachers.caption", "CaptionConfig"),
    "generate": StageSpec("teachers.generate", "GenerateConfig"),
    "filter": StageSpec("filters.filter", "FilterConfig"),
    "curate": StageSpec("filters.curate", "CurateConfig"),
    "pairs": StageSpec("pipeline.pairs", "PairsConfig", section=False),
    "align": StageSpec("trainers.align", "AlignConfig"),
    "assemble": StageSpec("trainers.assemble", "AssembleConfig"),
    "train": StageSpec("trainers.train", "TrainConfig"),
    "evaluate": StageSpec("trainers.evaluate", "EvaluateConfig"),
    "rl": StageSpec("trainers.rl", "RLConfig"),
}
