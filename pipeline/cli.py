"""The `r1v` command line.

    r1v run configs/demo.yaml                       # every step; finished ones are skipped
    r1v run configs/demo.yaml ingest.limit=50       # dotted overrides
    r1v run configs/demo.yaml --stage filter        # re-run one stage from its stored inputs
    r1v run configs/demo.yaml --from generate       # re-run generate and everything after it
    r1v run configs/demo.yaml --until curate        # the steps up to and including curate
    r1v validate configs/demo.yaml                  # exit 1 with the problems listed
    r1v plan configs/demo.yaml                      # the graph: steps, inputs, fingerprint, done/stale/missing
    r1v status runs/demo                            # per step: done / stale / missing, rows, drops, time
    r1v inspect runs/demo filter --row c-0001       # one step's table (polars): schema, head, one row
    r1v report runs/demo                            # HTML report with plots

Options and `key=value` overrides may come in any order. Expected failures print one line naming the
fix and exit with a code of `pipeline.errors` (1 config/input, 2 usage, 3 upstream not done, 4 stage
failed, 130 interrupted); `--debug` prints the traceback as well.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import traceback
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.errors import (
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    InputError,
    R1vError,
    StaleUpstreamError,
    UsageError,
    did_you_mean,
)
from pipeline.logging import setup_logging

log = logging.getLogger("r1v")


# --- run / validate --------------------------------------------------------------------------------


def _preflight(cfg) -> list[str]:
    from pipeline.stages import STAGES

    problems = []
    for name, spec in STAGES.items():
        section = getattr(cfg, name, None)
        check = getattr(spec.load(), "preflight", None)
        if section is not None and check is not None:
            problems += check(section)
    return problems


def _checked_config(args: argparse.Namespace):
    """The validated config plus preflight checks (missing inputs); raises ConfigError listing problems."""
    cfg = load_config(args.config, args.overrides)
    problems = _preflight(cfg)
    if problems:
        raise ConfigError(args.config, problems)
    return cfg


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.runner import Runner

    cfg = _checked_config(args)
    steps = Runner(cfg).steps
    print(f"{args.config}: OK ({len(steps)} steps: {', '.join(s.name for s in steps)})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.runner import Runner

    cfg = _checked_config(args)
    runner = Runner(cfg)
    args.error_dir = runner.run_dir
    try:
        results = runner.run(stage=args.stage, from_=args.from_, force=args.force, until=args.until,
                             command=" ".join(["r1v", *sys.argv[1:]]))
    except StaleUpstreamError as e:  # name the command the user typed, with its overrides
        again = " ".join(["r1v run", args.config, *args.overrides])
        raise StaleUpstreamError(str(e).replace("r1v run CONFIG", again)) from e
    log.info("run %s: %d steps done; outputs in %s", cfg.run.name, len(results), runner.run_dir.resolve())
    return 0


def _stale_reason(runner, step, m) -> str:
    """Why a finished step no longer matches: which input steps changed, else its own config or code."""
    ups = runner.upstream(step)
    changed = [u for u in ups if m.upstream.get(u) != runner.fingerprint(runner.by_name[u])]
    if changed:
        return "input changed: " + ", ".join(changed)
    if sorted(m.upstream) != sorted(ups):
        return "inputs differ: was " + (", ".join(sorted(m.upstream)) or "none")
    return "config or code changed"


def plan_rows(runner) -> list[dict]:
    """One dict per planned step: name, stage, phase, round, inputs, fingerprint, status (+ why stale)."""
    rows = []
    for step in runner.steps:
        state, m = runner.state(step)
        row = {"step": step.name, "stage": step.stage, "phase": step.phase, "round": step.round,
               "inputs": step.inputs, "fingerprint": runner.fingerprint(step), "status": state}
        if state == "stale":
            row["reason"] = _stale_reason(runner, step, m)
        if m is not None:
            row["kept"] = m.kept
        rows.append(row)
    return rows


_STATUS_STYLE = {"done": "green", "stale": "yellow", "missing": "red"}


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from pipeline.runlock import is_locked
    from pipeline.runner import Runner

    cfg = _checked_config(args)
    runner = Runner(cfg)
    rows = plan_rows(runner)
    counts = {k: sum(r["status"] == k for r in rows) for k in ("done", "stale", "missing")}
    holder = is_locked(runner.run_dir)
    if args.json:
        print(json.dumps({"config": args.config, "run_dir": str(runner.run_dir), "steps": rows, "counts": counts,
                          "running": holder or None}, indent=2))
        return 0
    table = Table(title=f"plan of {args.config} -> {runner.run_dir}", title_justify="left")
    for col in ("phase", "step", "consumes", "fingerprint", "status"):
        table.add_column(col, no_wrap=col != "consumes")
    phase = None
    for r in rows:
        first = r["phase"] != phase
        if first and phase is not None:
            table.add_section()
        phase = r["phase"]
        consumes = "; ".join(f"{role} <- {', '.join(ups) or '(none)'}" for role, ups in r["inputs"].items()) or "-"
        status = f"[{_STATUS_STYLE[r['status']]}]{r['status']}[/]"
        if r.get("reason"):
            status += f" ({r['reason']})"
        table.add_row(phase if first else "", r["step"], consumes, r["fingerprint"][:10], status)
    console = Console() if Console().is_terminal else Console(width=160)
    console.print(table)
    console.print(f"{len(rows)} steps: {counts['done']} done, {counts['stale']} stale, {counts['missing']} missing"
                  + (" - `r1v run` runs the stale and missing ones" if counts["stale"] + counts["missing"] else ""),
                  highlight=False)
    if holder:
        console.print(f"running: pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')})")
    return 0


# --- status / inspect / report ---------------------------------------------------------------------


def _run_dir(path: str) -> Path:
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise InputError(f"run directory {run_dir} not found (runs live in <run.root>/<run.name>, e.g. runs/demo)")
    return run_dir


def _load_run_config(run_dir: Path):
    cfg_path = _run_dir(str(run_dir)) / "config.yaml"
    if not cfg_path.exists():
        nested = sorted(p.parent.name for p in run_dir.glob("*/config.yaml"))
        hint = f"; runs inside it: {', '.join(str(run_dir / n) for n in nested)}" if nested else ""
        raise InputError(f"{run_dir} is not a run directory (no config.yaml){hint}")
    return load_config(cfg_path)


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from pipeline.runner import Runner

    run_dir = Path(args.run_dir)
    cfg = _load_run_config(run_dir)
    cfg.run.root, cfg.run.name = str(run_dir.parent), run_dir.name
    runner = Runner(cfg)
    table = Table(title=f"run {run_dir}")
    warnings: list[tuple[str, str]] = []
    for col in ("step", "state", "rows in", "kept", "dropped", "quarantined", "wall s"):
        table.add_column(col)
    for step in runner.steps:
        state, m = runner.state(step)
        if m is None:
            table.add_row(step.name, state, "", "", "", "", "")
            continue
        fmt = lambda d: ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "-"  # noqa: E731
        table.add_row(step.name, state, str(m.rows_in), str(m.kept), fmt(m.dropped), fmt(m.quarantined), f"{m.wall_s:.1f}")
        warnings += [(step.name, w) for w in m.metrics.get("warnings") or []]
    console = Console(width=160)
    console.print(table)
    for step_name, w in warnings:
        console.print(f"[yellow]warning[/yellow] {step_name}: {w}", highlight=False)
    from pipeline.runlock import is_locked

    holder = is_locked(run_dir)
    if holder:
        console.print(f"running: pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline.tableview import inspect_step

    inspect_step(_run_dir(args.run_dir), args.step, table=args.table, columns=args.columns, where=args.where,
                 limit=args.limit, row=args.row, describe=args.describe, full=args.full)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from filters.report import load_run, write_report
    from filters.report_train import phase_table_text

    run_dir = _run_dir(args.run_dir)
    path = write_report(run_dir, out_dir=Path(args.out) if args.out else None)
    phases = phase_table_text(load_run(run_dir))
    if phases:  # the figure a user looks for first: each phase's student on the held-out set
        print("evaluation per phase:\n" + phases)
    print(path.resolve())
    return 0


# --- parser ----------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (and the nearest valid name for a misspelt command)."""

    def error(self, message: str):  # type: ignore[override]
        if "invalid choice:" in message and self._subparsers is not None:
            bad = message.split("invalid choice:", 1)[1].split("(", 1)[0].strip().strip("'\"")
            choices = [c for a in self._subparsers._group_actions for c in getattr(a, "choices", {}) or {}]
            message = f"unknown command {bad!r}{did_you_mean(bad, choices)}; commands: {', '.join(choices)}"
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _common(p: argparse.ArgumentParser, top: bool) -> None:
    # On subcommands the defaults are SUPPRESS, so `r1v --debug run` and `r1v run --debug` both work.
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    p.add_argument("--debug", action="store_true", default=d(False), help="print tracebacks of errors")
    p.add_argument("-v", "--verbose", action="store_true", default=d(False),
                   help="show Ray's, transformers' and DeepSpeed's own logs and progress bars too")
    p.add_argument("--log-level", default=d(None), metavar="LEVEL", help="DEBUG, INFO, WARNING (default INFO)")


_OVERRIDES_HELP = ("dotted overrides of the config, section.key=value (e.g. generate.workers=2 "
                   "ingest.limit=50); values are YAML; may come before or after the options")

_EPILOG = "exit codes:\n" + "\n".join(f"  {code:<4} {what}" for code, what in EXIT_CODES.items())


def build_parser() -> argparse.ArgumentParser:
    from pipeline import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    ap = _Parser(prog="r1v", description="r1v-distill: multimodal reasoning distillation pipeline",
                 epilog=_EPILOG, formatter_class=fmt)
    ap.add_argument("--version", action="version", version=f"r1v-distill {__version__}")
    _common(ap, top=True)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help, epilog=_EPILOG, formatter_class=fmt)
        _common(p, top=False)
        return p

    p = command("run", "run a pipeline config (finished steps are skipped)",
                "Run every step of a config; steps whose fingerprint matches a finished manifest are skipped, "
                "a killed step resumes.")
    p.add_argument("config", help="the run's YAML config (e.g. configs/demo.yaml)")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help=_OVERRIDES_HELP)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stage", metavar="STEP", help="re-run only this stage (all its rounds) or step from its stored inputs")
    g.add_argument("--from", dest="from_", metavar="STEP", help="re-run this stage (or step) and every step after it")
    p.add_argument("--until", metavar="STEP",
                   help="stop after this step (alone: run what is not done up to it; with --from: re-run from..until)")
    p.add_argument("--force", action="store_true", help="ignore fingerprints: re-run every selected step")
    p.set_defaults(fn=cmd_run)

    p = command("validate", "load and check a config; exit 1 listing the problems",
                "Load a config with its overrides, validate every section and check that inputs exist; "
                "prints the planned steps.")
    p.add_argument("config", help="the run's YAML config")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help=_OVERRIDES_HELP)
    p.set_defaults(fn=cmd_validate)

    p = command("plan", "the run's graph: every step, what it consumes, fingerprint, done / stale / missing",
                "Expand a config (with its overrides) into its steps, as `r1v run` would, and show each step's "
                "inputs, fingerprint and state in the run directory; nothing runs.")
    p.add_argument("config", help="the run's YAML config")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help=_OVERRIDES_HELP)
    p.add_argument("--json", action="store_true", help="print the plan as JSON (for tools)")
    p.set_defaults(fn=cmd_plan)

    p = command("status", "per step: done / stale / missing, rows, drop reasons, wall time")
    p.add_argument("run_dir", help="a run directory (<run.root>/<run.name>, e.g. runs/demo)")
    p.set_defaults(fn=cmd_status)

    p = command("inspect", "one step's table: schema, head, describe, or one row in full (polars)",
                "Show a step's Parquet table: schema, the first rows (columns that fit the terminal), a "
                "describe of the numeric columns; --row shows one row vertically.")
    p.add_argument("run_dir", help="a run directory (e.g. runs/demo)")
    p.add_argument("step", help="a step of the run (ingest, filter, filter-r1, curate, train, ...)")
    p.add_argument("--table", help="a secondary table of the step (e.g. quarantine, retry, failed)")
    p.add_argument("--columns", "-c", help="comma-separated columns to show (default: those that fit)")
    p.add_argument("--where", "-w", metavar="EXPR",
                   help="keep rows matching a polars expression over column names, e.g. "
                        "\"(verdict == 'wrong') & (completion_tokens > 500)\" (SQL also works: \"verdict = 'wrong'\")")
    p.add_argument("--limit", "-n", type=int, default=5, help="rows to show (default 5)")
    p.add_argument("--row", metavar="ID", help="one row, vertically (matched on chain_id, problem_id, sample_id, ...)")
    p.add_argument("--describe", action=argparse.BooleanOptionalAction, default=None,
                   help="describe the numeric columns (default: when there are any and no --row)")
    p.add_argument("--full", action="store_true", help="with --row: do not shorten long text")
    p.set_defaults(fn=cmd_inspect)

    p = command("report", "write an HTML report (every step: counts, plots, training, evaluation, examples)")
    p.add_argument("run_dir", help="a run directory (e.g. runs/demo)")
    p.add_argument("--out", metavar="DIR", help="where to write index.html and the PNGs (default: RUN_DIR/report)")
    p.set_defaults(fn=cmd_report)
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse with options and `key=value` overrides in any order (argparse alone stops at the first
    positional after an option)."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if hasattr(args, "overrides"):
        overrides = [a for a in extra if "=" in a and not a.startswith("-")]
        args.overrides = list(args.overrides) + overrides
        extra = [a for a in extra if a not in overrides]
    if extra:
        bad = extra[0]
        prog = f"r1v {args.cmd}"
        if bad.startswith("-"):
            opts = [o for a in ap._subparsers._group_actions[0].choices[args.cmd]._actions for o in a.option_strings]
            name = bad.split("=", 1)[0]
            raise UsageError(f"{prog}: unknown option {name}{did_you_mean(name, opts)} (see {prog} --help)")
        what = "override (KEY=VALUE)" if hasattr(args, "overrides") else "argument"
        raise UsageError(f"{prog}: unexpected {bad!r}, not an {what} (see {prog} --help)")
    return args


def _summary(e: BaseException) -> str:
    """One line for an unexpected error (a Ray task error carries the remote traceback in its text)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return lines[-1].strip() if len(lines) > 1 and "Traceback" in str(e) else f"{type(e).__name__}: {lines[0]}"


def _save_traceback(tb: str, run_dir: Path | None) -> str:
    where = run_dir if run_dir is not None and run_dir.is_dir() else Path(tempfile.gettempdir())
    path = where / ("_error.txt" if where == run_dir else "r1v-error.txt")
    try:
        path.write_text(tb)
    except OSError as e:
        return f"the traceback could not be saved: {e}"
    return f"traceback in {path.resolve()}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    args = None
    try:
        args = parse_args(argv)
        debug = args.debug
        setup_logging(args.log_level, verbose=True if args.verbose else None)  # else R1V_QUIET (default 1)
        return args.fn(args)
    except (R1vError, ConfigError) as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_INPUT)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted: finished steps are kept; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a stage failed: one line; the traceback in a file, or here with --debug
        tb = traceback.format_exc()
        if debug:
            print(tb, file=sys.stderr, end="")
            print(f"error: {_summary(e)}", file=sys.stderr)
        else:
            saved = _save_traceback(tb, getattr(args, "error_dir", None))
            print(f"error: {_summary(e)}\n({saved}; --debug prints it)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
