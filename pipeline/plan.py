"""The run's plan, declared in one place: which steps a config expands to and what each one consumes.

    r1v plan configs/demo.yaml          # the graph: steps, inputs, fingerprint, done / stale / missing

`PLAN` is a list of phases, each a list of entries. An entry is one stage (a `pipeline.stages.STAGES`
key, whose config section turns it on) that *consumes* named channels and *provides* channels:

    ingest ─problems→ decontaminate ─problems→ assess ─problems→ caption ─problems→ ...
    generate ─chains→ filter ─chains→ curate ─sft, retry→ ... assemble ─model→ train ─model→ evaluate ─wrong→

A role reads the step that last provided its channel (`Use("model")`), or every step that provided it
so far (`Use("sft", all=True)`: each train round reads every round's curated SFT). A channel nobody
has provided yet leaves the role out (round 0 has no retry list), unless it is `keep_empty` (filter
reading an external chains file) or `required` (then the plan is refused with a PlanError naming the
section to configure). A phase repeats as often as its `rounds` says, its steps named `stage` in
round 0 and `stage-<suffix><r>` after (an entry's `name` replaces the stage there); a phase whose `requires` sections are not all configured is
left out. An entry with a `config` function takes its stage config from it instead of the stage's own
section (a stage used with settings another section derives: the align phase assembles the student on
`align.substitute` and ingests `align.pairs`). Adding a phase is adding one `Phase(...)` to `PLAN`.

Efficient transfer (Skywork R1V), when an `align` section is configured:

    align-data ─pairs→ align ─aligned→ assemble (re-assembly onto the reasoning LLM) ─model→ train ...
    align-assemble ─substitute↗
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import PlanError


@dataclass
class Step:
    name: str
    stage: str
    round: int
    inputs: dict[str, list[str]] = field(default_factory=dict)
    phase: str = ""
    # the stage config from the run config (None: the stage's section with the round's overrides)
    config: Callable[[Any], Any] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Use:
    """One input role of an entry: the step(s) that provided `channel` before it."""

    channel: str
    all: bool = False  # every step that provided the channel so far, in plan order (else the last one)
    keep_empty: bool = False  # the role is present (with no steps) when nothing provided the channel
    when: Callable[[Any], bool] | None = None  # the role exists only when this holds for the run config
    required: Callable[[Any], str | None] | None = None  # the error when nothing provided it (None = fine)


@dataclass(frozen=True)
class Entry:
    stage: str
    consumes: dict[str, Use] = field(default_factory=dict)
    provides: tuple[str, ...] = ()
    name: str | None = None  # the step name in round 0 (default: the stage), for a stage used twice
    # the stage config derived from the run config, instead of the stage's own section (which then need
    # not be configured); it may raise PlanError for settings that do not fit together
    config: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Phase:
    name: str
    entries: tuple[Entry, ...]
    rounds: Callable[[Any], int] = lambda cfg: 1
    suffix: str = ""  # round r > 0 of stage S is step `S-<suffix><r>`
    requires: tuple[str, ...] = ()  # config sections the phase needs besides its entries' own


def _configured(cfg: Any, section: str) -> bool:
    return getattr(cfg, section, None) is not None


def _self_distill_rounds(cfg: Any) -> int:
    return cfg.rounds.count if _configured(cfg, "generate") else 1


def _sft_rounds(cfg: Any) -> int:
    return cfg.train.iterative.rounds + 1


def _needs_chains(cfg: Any) -> str:
    return "curate reads chains: configure a `generate` or a `filter` section"


def _needs_sft(cfg: Any) -> str:
    return "train: no curated SFT steps in this run (configure generate, filter and curate)"


def _needs_model(cfg: Any) -> str | None:
    if cfg.train.init_from:
        return None  # the stage loads train.init_from itself
    return "train: configure an `assemble` section or set train.init_from to a student checkpoint"


def _align_pairs(cfg: Any) -> Any:
    return cfg.align.pairs


def _align_substitute(cfg: Any) -> Any:
    from trainers.align import substitute_assembly

    try:
        return substitute_assembly(cfg.align, cfg.assemble)
    except ValueError as e:
        raise PlanError(str(e)) from None


def _rl_needs_model(cfg: Any) -> str:
    return "rl: no student to start from (configure assemble and train before it, or set rl=null)"


PROBLEMS = Use("problems")

PLAN: tuple[Phase, ...] = (
    Phase("prepare", (
        Entry("ingest", provides=("problems",)),
        Entry("decontaminate", {"problems": PROBLEMS}, ("problems",)),
        Entry("assess", {"problems": PROBLEMS}, ("problems",)),
        Entry("caption", {"problems": PROBLEMS}, ("problems",)),
    )),
    # AL-CoTD self-distillation: round r > 0 generates again for the problems curate left unsolved
    Phase("distill", (
        Entry("generate", {"problems": PROBLEMS, "retry": Use("retry")}, ("chains",)),
        Entry("filter", {"chains": Use("chains", keep_empty=True), "problems": PROBLEMS}, ("chains",)),
        Entry("curate", {"chains": Use("chains", required=_needs_chains), "problems": PROBLEMS,
                         "retry": Use("retry")},  # round r > 0: the problems this round attempted
              ("sft", "retry")),
    ), rounds=_self_distill_rounds, suffix="r"),
    # Skywork R1V efficient transfer: the projector aligned alone on the substitute LLM, then (student)
    # re-assembled onto the reasoning LLM; the substitute student is the `assemble` section's, other LLM
    Phase("align", (
        Entry("pairs", name="align-data", config=_align_pairs, provides=("pairs",)),
        Entry("assemble", name="align-assemble", config=_align_substitute, provides=("substitute",)),
        Entry("align", {"sft": Use("pairs"), "model": Use("substitute")}, ("aligned",)),
        # the aligned student (substitute LLM) scored on the held-out set like every later phase's; its
        # wrong list feeds no round (nothing consumes it)
        Entry("evaluate", {"model": Use("aligned"), "problems": PROBLEMS}, name="evaluate-align"),
    ), requires=("align", "assemble")),
    Phase("student", (Entry("assemble", {"student": Use("aligned")}, ("model",)),), requires=("train",)),
    # Skywork R1V hybrid SFT: the initial SFT, then iterative rounds on tau and the wrongly answered
    Phase("sft", (
        Entry("train", {"sft": Use("sft", all=True, required=_needs_sft),
                        "model": Use("model", required=_needs_model),
                        "wrong": Use("wrong", when=lambda cfg: cfg.train.iterative.include_wrong)},
              ("model",)),
        Entry("evaluate", {"model": Use("model"), "problems": PROBLEMS}, ("wrong",)),
    ), rounds=_sft_rounds, suffix="t", requires=("train",)),
    # GRPO with rule rewards on the last SFT model, then the RL model evaluated like every round's
    Phase("rl", (
        Entry("rl", {"model": Use("model", required=_rl_needs_model), "problems": PROBLEMS}, ("model",)),
        Entry("evaluate", {"model": Use("model"), "problems": PROBLEMS}, ("wrong",), name="evaluate-rl"),
    ), requires=("rl",)),
)


def step_name(stage: str, suffix: str, r: int) -> str:
    return stage if r == 0 else f"{stage}-{suffix}{r}"


def expand(cfg: Any, phases: Sequence[Phase] | None = None) -> list[Step]:
    """The run's steps in execution order (the pipeline's DAG, flattened), each with its inputs."""
    from pipeline.stages import STAGES

    phases = PLAN if phases is None else phases
    provided: dict[str, list[str]] = {}
    steps: list[Step] = []
    for phase in phases:
        if not all(_configured(cfg, s) for s in phase.requires):
            continue
        unknown = [e.stage for e in phase.entries if e.stage not in STAGES]
        if unknown:
            raise PlanError(f"plan phase {phase.name!r} names unregistered stages {unknown} (pipeline/stages.py)")
        entries = [e for e in phase.entries
                   if (e.config(cfg) is not None if e.config is not None else _configured(cfg, e.stage))]
        for r in range(phase.rounds(cfg) if entries else 0):
            for entry in entries:
                name = step_name(entry.name or entry.stage, phase.suffix, r)
                inputs: dict[str, list[str]] = {}
                for role, use in entry.consumes.items():
                    if use.when is not None and not use.when(cfg):
                        continue
                    have = provided.get(use.channel, [])
                    if have:
                        inputs[role] = list(have) if use.all else [have[-1]]
                    elif use.required is not None and (msg := use.required(cfg)):
                        raise PlanError(msg)
                    elif use.keep_empty:
                        inputs[role] = []
                steps.append(Step(name, entry.stage, r, inputs, phase.name, entry.config))
                for ch in entry.provides:
                    provided.setdefault(ch, []).append(name)
    names = [s.name for s in steps]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PlanError(f"the plan names steps twice: {', '.join(dup)} (give the phases distinct suffixes)")
    return steps
