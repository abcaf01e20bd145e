"""The `r1v` command line.

    r1v run configs/demo.yaml                       # every step; finished ones are skipped
    r1v run configs/demo.yaml ingest.limit=50       # dotted overrides
    r1v run configs/demo.yaml --stage filter        # re-run one stage from its stored inputs
    r1v run configs/demo.yaml --from generate       # re-run generate and everything after it
    r1v validate configs/demo.yaml                  # exit 1 with the problems listed
    r1v status runs/demo                            # per step: done / stale / missing, rows, drops, time
    r1v inspect runs/demo ingest                    # schema, head, describe (polars)
    r1v report runs/demo                            # HTML report with plots
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.logging import setup_logging

log = logging.getLogger("r1v")


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
    """The validated config plus preflight checks (missing inputs), or None after printing the problems."""
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return None
    problems = _preflight(cfg)
    if problems:
        print(ConfigError(args.config, problems), file=sys.stderr)
        return None
    return cfg


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.runner import Runner

    cfg = _checked_config(args)
    if cfg is None:
        return 1
    steps = Runner(cfg).steps
    print(f"{args.config}: OK ({len(steps)} steps: {', '.join(s.name for s in steps)})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.runner import Runner

    cfg = _checked_config(args)
    if cfg is None:
        return 1
    from pipeline.runlock import RunLockedError

    runner = Runner(cfg)
    try:
        results = runner.run(stage=args.stage, from_=args.from_, force=args.force, command=" ".join(["r1v", *sys.argv[1:]]))
    except ValueError as e:  # an unknown --stage / --from
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunLockedError as e:  # a second driver on the same run
        print(f"error: {e}", file=sys.stderr)
        return 3
    log.info("run %s: %d steps done; outputs in %s", cfg.run.name, len(results), runner.run_dir)
    return 0


def _load_run_config(run_dir: Path):
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise SystemExit(f"error: {run_dir} is not a run directory (no config.yaml)")
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
    import polars as pl

    d = Path(args.run_dir) / args.step
    if args.table:
        d = d / args.table
    files = sorted(d.glob("part-*.parquet"))
    if not files:
        print(f"error: no Parquet shards in {d}", file=sys.stderr)
        return 1
    lf = pl.scan_parquet(str(d / "*.parquet"))
    schema = lf.collect_schema()
    binary = [n for n, t in schema.items() if t == pl.Binary or str(t).startswith("List(Struct")]
    print(f"{d}: {len(files)} shard(s), {lf.select(pl.len()).collect().item()} rows")
    for name, dtype in schema.items():
        print(f"  {name}: {dtype}")
    with pl.Config(tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
        view = lf.drop(binary) if binary else lf
        print(view.head(args.n).collect())
        print(view.collect().describe())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from filters.report import write_report

    path = write_report(Path(args.run_dir))
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="r1v", description="r1v-distill: multimodal reasoning distillation pipeline")
    ap.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="run a pipeline config (finished steps are skipped)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides: section.key=value")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stage", help="re-run only this stage (or step) from its stored inputs")
    g.add_argument("--from", dest="from_", help="re-run this stage (or step) and every step after it")
    p.add_argument("--force", action="store_true", help="ignore fingerprints: re-run every selected step")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("validate", help="load and check a config; exit 1 listing the problems")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("status", help="per step: done / stale / missing, rows, drop reasons, wall time")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("inspect", help="schema, head and describe of one step's table (polars)")
    p.add_argument("run_dir")
    p.add_argument("step")
    p.add_argument("--table", help="a secondary table of the step (e.g. quarantine, retry)")
    p.add_argument("-n", type=int, default=5, help="rows to show")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("report", help="write an HTML report (plots, drop reasons, yield per round)")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_report)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
