"""The stage runner: expands a run config into steps (pipeline.plan), skips finished ones, runs the rest.

A *step* is one stage in one round (`generate`, `generate-r1`, ...). Its fingerprint hashes the stage
name, the resolved stage config, the fingerprints of its input steps and the table schema versions, so
it is known before anything runs: `r1v status` can tell done / stale / missing without reading data.

Re-runs: a step whose manifest carries the current fingerprint is skipped. `--stage S` re-runs S from
its stored inputs, `--from S` re-runs S and every step after it, `--until S` stops after S (alone: the
steps up to S that are not done run), `--force` ignores fingerprints.
A step killed mid-way leaves `_progress.json` with its fingerprint; if the next attempt has the same
fingerprint the stage gets `ctx.resume=True` and may keep the complete shards it wrote (generation
does); otherwise the step directory is cleared first.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.config import dump_yaml, stage_config_for_round
from pipeline.errors import StaleUpstreamError, UnknownStepError, UsageError
from pipeline.plan import Step, expand
from pipeline.rundir import (
    MANIFEST,
    PROGRESS,
    Manifest,
    ShardWriter,
    atomic_write_bytes,
    atomic_write_json,
    fingerprint,
    read_table,
    shard_files,
    stable_hash,
    versions,
)
from pipeline.stages import STAGES

log = logging.getLogger(__name__)


def plan(cfg: Any) -> list[Step]:
    """The run's steps in execution order, each with its inputs (declared in pipeline.plan.PLAN)."""
    return expand(cfg)


@dataclass
class StageContext:
    """What a stage's `run(cfg, ctx)` gets: where its inputs are, where to write, whether to resume."""

    run_dir: Path
    step: str
    stage: str
    round: int
    out_dir: Path
    inputs: dict[str, list[Path]]
    run_config: Any
    fingerprint: str
    resume: bool = False
    previous: Manifest | None = None  # the manifest of this step's last finished run, if any

    def input_dirs(self, role: str) -> list[Path]:
        if role not in self.inputs:
            raise KeyError(f"step {self.step!r} has no input {role!r} (has {sorted(self.inputs)})")
        return self.inputs[role]

    def read_input(self, role: str, table: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """An input step's main table (or its secondary `table`), all input steps concatenated."""
        dirs = [d / table if table else d for d in self.input_dirs(role)]
        parts = [read_table(d, columns) for d in dirs if shard_files(d)]
        if not parts:
            raise FileNotFoundError(f"step {self.step!r}: input {role!r} has no shards in {[str(d) for d in dirs]}")
        return pa.concat_tables(parts, promote_options="default")

    def writer(self, schema: pa.Schema, table: str, sub: str | None = None, rows_per_shard: int = 50_000) -> ShardWriter:
        """A shard writer for the step's main table (sub=None) or a secondary table in `<step>/<sub>/`."""
        d = self.out_dir / sub if sub else self.out_dir
        return ShardWriter(d, schema, table, rows_per_shard=rows_per_shard, resume=self.resume)

    def manifest(self) -> Manifest:
        return Manifest(stage=self.stage, step=self.step, round=self.round)

    def seed(self, *salt: Any) -> int:
        from pipeline.rundir import stable_hash

        return int(stable_hash(self.run_config.run.seed, self.step, *salt, n=8), 16)


_PROMPT_DIRS = [Path(__file__).resolve().parents[1] / pkg / "prompts" for pkg in ("teachers", "filters")]


def _file_contents(tree: Any) -> dict[str, str]:
    """Digests of the files that config keys ending in `_file` name (prompts, rubrics, templates), so
    editing a prompt re-runs the steps that read it. Names resolve like the stages resolve them: as a
    path, else inside the packages' prompts/ folders."""
    out: dict[str, str] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, str) and k.endswith("_file"):
                    for cand in [Path(v), *(d / v for d in _PROMPT_DIRS)]:
                        if cand.is_file():
                            out[v] = stable_hash(cand.read_bytes())
                            break
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tree)
    return out


class Runner:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.root) / cfg.run.name
        self.steps = plan(cfg)
        self.by_name = {s.name: s for s in self.steps}
        self._fp: dict[str, str] = {}

    def stage_config(self, step: Step) -> Any:
        if step.config is not None:  # an entry that derives its stage's settings (pipeline.plan.Entry.config)
            return step.config(self.cfg)
        return stage_config_for_round(self.cfg, step.stage, step.round)

    def upstream(self, step: Step) -> list[str]:
        return [u for ups in step.inputs.values() for u in ups]

    def fingerprint(self, step: Step) -> str:
        if step.name not in self._fp:
            mod = STAGES[step.stage].load()
            scfg = self.stage_config(step)
            # run.seed feeds every stage's derived seeds (ctx.seed), so it is part of every fingerprint
            dumped = scfg.model_dump(mode="json")
            # LOGIC_VERSION: bumped in a stage module whenever a code change changes that stage's output
            data = {"config": dumped, "run_seed": self.cfg.run.seed, "files": _file_contents(dumped),
                    "logic": getattr(mod, "LOGIC_VERSION", 1)}
            extra = getattr(mod, "fingerprint_extra", None)
            if extra is not None:
                data["extra"] = extra(scfg)
            ups = {u: self.fingerprint(self.by_name[u]) for u in self.upstream(step)}
            self._fp[step.name] = fingerprint(step.stage, step.name, data, ups, getattr(mod, "TABLES", ()))
        return self._fp[step.name]

    def state(self, step: Step) -> tuple[str, Manifest | None]:
        m = Manifest.load(self.run_dir / step.name)
        if m is None:
            return ("missing", None)
        return ("done" if m.fingerprint == self.fingerprint(step) else "stale", m)

    def _matches(self, key: str) -> list[int]:
        """Indices of the steps named `key`, or of every step of the stage `key`; UnknownStepError if none."""
        hits = [i for i, s in enumerate(self.steps) if s.name == key or s.stage == key]
        if not hits:
            raise UnknownStepError(key, [s.name for s in self.steps])
        return hits

    def until_index(self, until: str | None) -> int | None:
        """The last step `--until` runs: the step of that name (`curate` is round 0's), else the last
        step of the stage of that name."""
        if until is None:
            return None
        exact = [i for i, s in enumerate(self.steps) if s.name == until]
        return exact[0] if exact else self._matches(until)[-1]

    def select(self, stage: str | None, from_: str | None, until: str | None = None) -> list[Step]:
        """The steps re-run whatever their state: `stage` (every round of it) or `from_` and every step
        after it, up to and including `until`."""
        for key in (stage, from_):
            if key is not None:
                self._matches(key)
        last = self.until_index(until)
        if stage is not None:
            if until is not None:
                raise UsageError("--until goes alone or with --from, not with --stage (which runs one stage)")
            return [s for s in self.steps if s.name == stage or s.stage == stage]
        if from_ is not None:
            first = self._matches(from_)[0]
            if last is not None and last < first:
                raise UsageError(f"--until {until} comes before --from {from_} in the plan (r1v plan CONFIG)")
            return self.steps[first:None if last is None else last + 1]
        return []

    def todo(self, stage: str | None = None, from_: str | None = None, until: str | None = None) -> list[Step]:
        """The steps a run visits (finished ones among them are skipped unless selected or forced)."""
        if stage is not None:
            return self.select(stage, from_, until)
        last = self.until_index(until)
        return self.steps[:None if last is None else last + 1]

    def run(self, stage: str | None = None, from_: str | None = None, force: bool = False,
            command: str | None = None, until: str | None = None) -> dict[str, Manifest]:
        """Run the selected steps, holding the run directory's lock (pipeline.runlock) throughout: a second
        driver on the same run is refused with RunLockedError naming the holder. `until` stops after
        that step (see until_index)."""
        from pipeline.runlock import RunLock

        forced = {s.name for s in self.select(stage, from_, until)}
        todo = self.todo(stage, from_, until)
        with RunLock(self.run_dir, command=command):
            return self._run_locked(todo, forced, force)

    def _run_locked(self, todo: list[Step], forced: set[str], force: bool) -> dict[str, Manifest]:
        from pipeline.ray_utils import init_ray

        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.run_dir / "config.yaml", dump_yaml(self.cfg).encode())
        results: dict[str, Manifest] = {}
        ray_started = False
        for step in todo:
            state, m = self.state(step)
            if state == "done" and not force and step.name not in forced:
                log.info("step %s: done (fingerprint %s), skipped", step.name, m.fingerprint)
                results[step.name] = m
                continue
            for up in self.upstream(step):
                up_state, _ = self.state(self.by_name[up])
                if up_state != "done":
                    raise StaleUpstreamError(
                        f"step {step.name!r} needs {up!r}, which is {up_state}: run it first "
                        f"(r1v run CONFIG --from {up})"
                    )
            if not ray_started:
                init_ray(self.cfg.ray)
                ray_started = True
            results[step.name] = self._run_step(step)
        return results

    def _chain_counts(self, step: Step, m: Manifest) -> None:
        """Record how rows_in follows from the input steps' manifests (`ROWS_FROM` names the role whose
        table the stage counts as rows_in): rows_in = the rows of those tables = their kept rows plus the
        rows they dropped or quarantined but kept in the table for inspection, each stated. A stage whose
        rows_in does not chain is logged and marked `chained: false`."""
        role = getattr(STAGES[step.stage].load(), "ROWS_FROM", None)
        if not role or not step.inputs.get(role):
            return
        per, total, kept = {}, 0, 0
        for u in step.inputs[role]:
            um = Manifest.load(self.run_dir / u)
            if um is None:
                continue
            tables = getattr(STAGES[self.by_name[u].stage].load(), "TABLES", ())
            rows = um.outputs.get(tables[0], um.kept) if tables else um.kept
            extra = rows - um.kept
            carried_q = min(extra, sum(um.quarantined.values()))
            per[u] = {"rows": rows, "kept": um.kept, "carried_quarantined": carried_q,
                      "carried_dropped": extra - carried_q}
            total, kept = total + rows, kept + um.kept
        other = m.metrics.get("rows_in_other", 0)  # rows a stage reads from elsewhere (it says which)
        m.inputs = {"role": role, "steps": per, "rows": total, "upstream_kept": kept,
                    "chained": m.rows_in == total + other}
        if not m.inputs["chained"]:
            log.warning("step %s: rows_in %d but its %r inputs hold %d rows (%s)", step.name, m.rows_in, role, total, per)

    def _run_step(self, step: Step) -> Manifest:
        out = self.run_dir / step.name
        fp = self.fingerprint(step)
        progress = out / PROGRESS
        resume = False
        if progress.exists():
            import json

            # only stages that read back what they wrote (RESUMABLE = True) may keep a killed attempt's shards
            resumable = getattr(STAGES[step.stage].load(), "RESUMABLE", False)
            resume = resumable and json.loads(progress.read_text()).get("fingerprint") == fp
        previous = Manifest.load(out)  # read before the step directory is cleared (assess's frozen bounds)
        if not resume and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        atomic_write_json(progress, {"fingerprint": fp, "started_at": time.time()})
        scfg = self.stage_config(step)
        ctx = StageContext(
            run_dir=self.run_dir,
            step=step.name,
            stage=step.stage,
            round=step.round,
            out_dir=out,
            inputs={role: [self.run_dir / u for u in ups] for role, ups in step.inputs.items()},
            run_config=self.cfg,
            fingerprint=fp,
            resume=resume,
            previous=previous,
        )
        log.info("step %s: running%s (fingerprint %s)", step.name, " (resuming)" if resume else "", fp)
        t0 = time.time()
        m = STAGES[step.stage].load().run(scfg, ctx)
        m.stage, m.step, m.round = step.stage, step.name, step.round
        m.fingerprint = fp
        m.upstream = {u: self.fingerprint(self.by_name[u]) for u in self.upstream(step)}
        m.config = scfg.model_dump(mode="json")
        m.started_at, m.wall_s = t0, round(time.time() - t0, 3)
        m.versions = versions()
        m.check_counts()
        self._chain_counts(step, m)
        atomic_write_bytes(out / "config.yaml", dump_yaml(self.cfg).encode())
        m.write(out)
        progress.unlink(missing_ok=True)
        dropped = f", dropped {m.dropped}" if m.dropped else ""
        quar = f", quarantined {m.quarantined}" if m.quarantined else ""
        log.info("step %s: done in %.1fs: %d in, %d kept%s%s", step.name, m.wall_s, m.rows_in, m.kept, dropped, quar)
        return m
