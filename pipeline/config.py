"""Typed run configs: one YAML per pipeline run, one section per stage, dotted overrides.

    r1v run configs/demo.yaml ingest.limit=50 generate.samples_per_problem=8

Every section is a pydantic model that forbids unknown keys, so a misspelt key fails at load time with
its full path (`generate.sampels_per_problem: extra inputs are not permitted`). The section models live
next to their stages; `pipeline.stages.STAGES` lists them in one place.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model


class ConfigError(ValueError):
    """A config that cannot be used; `problems` lists each bad key with its value."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


class StageConfig(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class RunSection(StageConfig):
    name: str = Field(description="run name: outputs go to <root>/<name>/")
    root: str = Field(
        "runs",
        description="directory holding all runs and the shared caches: an absolute path, else $R1V_ROOT if set, "
        "else this value relative to the config file's folder (pipeline/paths.py)",
    )
    seed: int = Field(0, description="base seed; every stage derives its own seeds from it")


class RayConfig(StageConfig):
    address: str | None = Field(
        None, description="Ray cluster address; default: RAY_ADDRESS if set, else an embedded local cluster"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded local cluster (default: all)")
    object_store_memory_mb: int | None = Field(None, ge=64, description="object store of the local cluster")


class RoundsConfig(StageConfig):
    count: int = Field(1, ge=1, description="self-distillation rounds of generate -> filter -> curate")
    overrides: list[dict[str, dict[str, Any]]] = Field(
        default_factory=list,
        description="per round r (index r, from 0): {stage: {field: value}} applied to that round's steps",
    )


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c=value` in nested dicts/lists (integer keys index lists)."""
    keys = dotted.split(".")
    node: Any = tree
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError("command line", [f"{dotted}: {k!r} is not an index of a list of {len(node)}"])
            k = int(k)
        elif not isinstance(node, dict):
            raise ConfigError("command line", [f"{dotted}: {keys[i - 1]!r} is a value, not a section"])
        if last:
            node[k] = value
        else:
            child = node[k] if isinstance(node, list) else node.get(k)
            if child is None:
                child = node[k] = {}
            node = child


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError("command line", [f"override {item!r} must look like section.key=value"])
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError("command line", [f"{key}: cannot parse value {raw!r}: {e}"]) from e
        out.append((key.strip(), value))
    return out


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _model_classes(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions, Annotated, list, dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _model_classes(arg)]


def valid_keys(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The keys valid at `loc[:-1]` inside `model` (for "did you mean" on a misspelt key)."""
    if model is None:
        return []
    models = [model]
    for part in loc[:-1]:
        fields = [c.model_fields[str(part)] for c in models if str(part) in c.model_fields]
        if not fields:
            continue  # a list index, a union's tag (`engine.scripted`) or a dict key: same models
        models = [m for f in fields for m in _model_classes(f.annotation)]
        if not models:
            return []
    return sorted({k for c in models for k in c.model_fields})


def format_validation_error(err: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    from pipeline.errors import did_you_mean

    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            hint = did_you_mean(str(e["loc"][-1]), valid_keys(model, e["loc"])) or "; check the spelling"
            problems.append(f"{loc}: unknown key (value {e.get('input')!r}){hint}")
        elif e["type"] == "missing":
            problems.append(f"{loc}: required key is missing")
        else:
            problems.append(f"{loc}: {msg} (got {e.get('input')!r})")
    return problems


_RUN_CONFIG_CLS: type[BaseModel] | None = None


def run_config_class() -> type[BaseModel]:
    """The RunConfig model: fixed sections plus one optional section per registered stage."""
    global _RUN_CONFIG_CLS
    if _RUN_CONFIG_CLS is None:
        from pipeline.stages import STAGES

        fields: dict[str, Any] = {
            "run": (RunSection, ...),
            "ray": (RayConfig, Field(default_factory=RayConfig)),
            "rounds": (RoundsConfig, Field(default_factory=RoundsConfig)),
        }
        for name, spec in STAGES.items():
            if spec.section:
                fields[name] = (spec.config_class() | None, None)
        _RUN_CONFIG_CLS = create_model("RunConfig", __base__=StageConfig, **fields)
    return _RUN_CONFIG_CLS


def validate_config(raw: dict, source: str = "<config>") -> Any:
    cls = run_config_class()
    try:
        cfg = cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, format_validation_error(e, cls)) from None
    problems = []
    for r, ov in enumerate(cfg.rounds.overrides):
        for stage, section in ov.items():
            if stage not in cls.model_fields or stage in ("run", "ray", "rounds"):
                problems.append(f"rounds.overrides.{r}.{stage}: not a stage")
                continue
            base = getattr(cfg, stage)
            if base is None:
                problems.append(f"rounds.overrides.{r}.{stage}: the section {stage!r} is not configured")
                continue
            if stage == "evaluate" and "eval_set" in section:
                problems.append(f"rounds.overrides.{r}.evaluate.eval_set: the held-out set is the same for every "
                                "phase and round (set it in the evaluate section)")
                continue
            try:
                type(base).model_validate(deep_merge(base.model_dump(), section))
            except ValidationError as e:
                problems += [f"rounds.overrides.{r}.{stage}.{p}" for p in format_validation_error(e, type(base))]
    if problems:
        raise ConfigError(source, problems)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Any:
    """Load, override and validate a run config; raises ConfigError naming the file and keys.

    Relative paths in the file resolve against its folder, those on the command line against the working
    directory; the run root follows pipeline.paths (absolute run.root, else $R1V_ROOT, else relative to
    the file). Under `ray job submit` a run root or cache that would land in Ray's temporary copy of the
    working directory is refused here, with what to set instead.
    """
    from pipeline.paths import ROOT_ENV, job_problems, resolve_tree, under_ray_job

    path = Path(path)
    if not path.exists():
        raise ConfigError(str(path), ["file not found"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(str(path), [f"not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), ["top level must be a mapping of sections"])
    base = path.resolve().parent
    resolved = resolve_tree(raw, base)
    run = resolved.get("run")
    if isinstance(run, dict):
        root = (raw.get("run") or {}).get("root", "runs")  # as written: resolve_tree made it absolute
        if not (isinstance(root, str) and Path(root).expanduser().is_absolute()):
            env_root = os.environ.get(ROOT_ENV)
            run["root"] = str(Path(env_root).expanduser().resolve()) if env_root else str((base / str(root)).resolve())
    cwd = Path.cwd()
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
        leaf = key.rsplit(".", 1)[-1]
        _set_dotted(resolved, key, resolve_tree({leaf: value}, cwd)[leaf])
    if under_ray_job():
        problems = job_problems(raw, resolved)
        if problems:
            raise ConfigError(str(path), problems)
    return validate_config(resolved, str(path))


def stage_config_for_round(cfg: Any, stage: str, round_: int) -> Any:
    """The stage's section with `rounds.overrides[round_]` applied (validated at load time)."""
    base = getattr(cfg, stage)
    ovs = cfg.rounds.overrides
    if base is None or round_ >= len(ovs) or stage not in ovs[round_]:
        return base
    return type(base).model_validate(deep_merge(base.model_dump(), ovs[round_][stage]))


def dump_yaml(cfg: BaseModel) -> str:
    # explicit nulls stay: a None that overrides a non-None default must survive a reload
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
