"""Report sections after curation: training curves, evaluation accuracy, example chains (filters/report.py)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from filters.report_parts import (
    SERIES,
    Section,
    missing,
    plt,
    save,
    scan,
    shortened_html,
    table,
    verdict_colour,
)
from pipeline.rundir import shard_files

if TYPE_CHECKING:
    from filters.report import RunData


# --- training ----------------------------------------------------------------------------------------


def train_logs(d: RunData) -> list[tuple[str, pl.DataFrame]]:
    """(train step, its per-optimizer-step log) for every train step with a log, in pipeline order."""
    out = []
    for m in d.steps("train"):
        log = scan(d.run_dir / m.step, ["step", "loss", "lr", "grad_norm", "tokens", "step_s"])
        if log is not None and log.height and "loss" in log.columns:
            out.append((m.step, log.sort("step")))
    return out


def section_training(d: RunData, out_dir: Path) -> Section:
    sec = Section("training", "Training: loss, learning rate, gradient norm")
    logs = train_logs(d)
    if not logs:
        what = "train steps have no per-step log" if d.has("train") else "no train step in this run"
        return missing(sec, what)
    by_step = {m.step: m for m in d.steps("train")}
    rows = []
    for name, lg in logs:
        m = by_step[name]
        gn = lg["grad_norm"].drop_nans() if "grad_norm" in lg.columns else pl.Series([], dtype=pl.Float64)
        rows.append([name, m.round, m.rows_in, m.kept, lg.height, lg["loss"][0], lg["loss"][-1], lg["loss"].min(),
                     lg["lr"].max() if "lr" in lg.columns else None, gn.mean() if gn.len() else None,
                     gn.max() if gn.len() else None, round(m.wall_s, 1)])
    sec.body = ("<p>One point per optimizer step; the iterative rounds (<code>train-tN</code>) continue from the "
                "previous round's model and are drawn one after the other, a dashed line where each starts.</p>"
                + table(["step", "round", "samples in", "trained on", "optimizer steps", "first loss", "final loss",
                         "min loss", "peak lr", "mean grad norm", "max grad norm", "wall s"], rows))
    p = plt()
    metrics = [c for c in ("loss", "lr", "grad_norm") if all(c in lg.columns for _, lg in logs)]
    fig, axes = p.subplots(len(metrics), 1, figsize=(7.5, 2.2 * len(metrics) + 0.4), sharex=True, squeeze=False)
    colours = SERIES
    offset = 0
    for i, (name, lg) in enumerate(logs):
        xs = [offset + s for s in lg["step"].to_list()]
        for ax, metric in zip(axes[:, 0], metrics, strict=True):
            ax.plot(xs, lg[metric].to_list(), marker="o", markersize=2.5, linewidth=1.3, color=colours[i % len(colours)],
                    label=name)
            if i:
                ax.axvline(offset + 0.5, color="#999", linestyle="--", linewidth=0.8)
        offset = xs[-1] if xs else offset
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        ax.set_ylabel({"grad_norm": "grad norm"}.get(metric, metric))
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=min(4, len(logs)))
    axes[-1, 0].set_xlabel("optimizer step (rounds one after the other)")
    save(fig, out_dir, "training_curves", sec)
    return sec


# --- reinforcement learning ---------------------------------------------------------------------------

RL_COLUMNS = ["step", "reward", "reward_std", "accuracy_mean", "format_mean", "length_mean", "kl", "clip_ratio",
              "completion_len", "tok_s", "groups", "zero_std_groups", "accuracy_timeouts", "gen_s", "reward_s",
              "update_s", "step_s"]


def rl_logs(d: RunData) -> list[tuple[str, pl.DataFrame]]:
    """(rl step, its per-optimizer-step log: table rl_log) for every rl step with one, in pipeline order."""
    out = []
    for m in d.steps("rl"):
        log = scan(d.run_dir / m.step, RL_COLUMNS)
        if log is not None and log.height and "reward" in log.columns:
            out.append((m.step, log.sort("step")))
    return out


def _first_last(lg: pl.DataFrame, col: str, n: int = 5) -> tuple[float | None, float | None]:
    """Means of `col` over the first and the last n steps (smoothed: GRPO rewards are noisy per step)."""
    if col not in lg.columns:
        return None, None
    v = lg[col].drop_nulls().drop_nans()
    if not v.len():
        return None, None
    k = max(1, min(n, v.len() // 2 or 1))
    return float(v.head(k).mean()), float(v.tail(k).mean())


def section_rl(d: RunData, out_dir: Path) -> Section:
    sec = Section("rl", "Reinforcement learning: rewards per component, KL, completion length")
    logs = rl_logs(d)
    if not logs:
        return missing(sec, "the rl step has no per-step log" if d.has("rl") else "no rl step in this run")
    rows = []
    for name, lg in logs:
        cells = [name, lg.height]
        for col in ("reward", "accuracy_mean", "format_mean", "length_mean"):
            a, b = _first_last(lg, col)
            cells.append(None if a is None else f"{a:.3f} → {b:.3f}")
        groups = int(lg["groups"].sum()) if "groups" in lg.columns else None
        zero = int(lg["zero_std_groups"].sum()) if "zero_std_groups" in lg.columns else None
        cells += [f"{zero} / {groups}" if groups else None,
                  int(lg["accuracy_timeouts"].sum()) if "accuracy_timeouts" in lg.columns else None,
                  lg["kl"].drop_nulls().tail(1).item() if "kl" in lg.columns and lg["kl"].drop_nulls().len() else None,
                  lg["completion_len"].mean() if "completion_len" in lg.columns else None,
                  lg["tok_s"].mean() if "tok_s" in lg.columns else None]
        split = [lg[c].sum() if c in lg.columns else None for c in ("gen_s", "reward_s", "update_s")]
        total = sum(x for x in split if x) or None
        cells.append(" / ".join(f"{100 * x / total:.0f}%" for x in split if x is not None) if total else None)
        rows.append(cells)
    sec.body = ("<p>GRPO after the SFT rounds, one point per optimizer step. Rewards are the group means per "
                "component (first → last five steps); groups whose rewards are all equal carry no advantage and "
                "are counted; a verifier check past its deadline scores 0 and is counted as a timeout.</p>"
                + table(["step", "optimizer steps", "reward", "accuracy", "format", "length", "equal-reward groups",
                         "verifier timeouts", "final KL", "mean completion tokens", "tok/s",
                         "time: generation / reward / update"], rows))
    p = plt()
    panels = [("reward", ["reward", "accuracy_mean", "format_mean", "length_mean"]), ("KL", ["kl"]),
              ("completion tokens", ["completion_len"])]
    panels = [(t, [c for c in cols if all(c in lg.columns for _, lg in logs)]) for t, cols in panels]
    panels = [(t, cols) for t, cols in panels if cols]
    fig, axes = p.subplots(len(panels), 1, figsize=(7.5, 2.2 * len(panels) + 0.4), sharex=True, squeeze=False)
    offset = 0
    for i, (_name, lg) in enumerate(logs):
        xs = [offset + x for x in lg["step"].to_list()]
        for ax, (_, cols) in zip(axes[:, 0], panels, strict=True):
            for j, c in enumerate(cols):
                ax.plot(xs, lg[c].to_list(), marker="o", markersize=2.5, linewidth=1.3,
                        color=SERIES[j % len(SERIES)], label=c.removesuffix("_mean") if not i else None)
            if i:
                ax.axvline(offset + 0.5, color="#999", linestyle="--", linewidth=0.8)
        offset = xs[-1] if xs else offset
    for ax, (title, cols) in zip(axes[:, 0], panels, strict=True):
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if len(cols) > 1:
            ax.legend(fontsize=8, ncol=len(cols))
    axes[-1, 0].set_xlabel("optimizer step")
    save(fig, out_dir, "rl_curves", sec)
    return sec


# --- evaluation --------------------------------------------------------------------------------------


def _phase(m) -> str:
    model = m.metrics.get("model_step") or (Path(m.metrics["model_dir"]).parent.name if m.metrics.get("model_dir") else None)
    return f"{m.step} (model of {model})" if model else m.step


def step_phases(run_dir: Path) -> dict[str, str]:
    """{step: phase of the run's plan} (from its config.yaml), {} when that does not load."""
    from pipeline.config import ConfigError, load_config
    from pipeline.runner import plan

    try:
        return {s.name: s.phase for s in plan(load_config(run_dir / "config.yaml"))}
    except (ConfigError, ValueError, OSError, ImportError):
        return {}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def phase_rows(d: RunData) -> list[dict]:
    """One row per evaluate step, in plan order: the student of each phase / round on the same set."""
    phases = step_phases(d.run_dir)
    rows = []
    for m in d.steps("evaluate"):
        if "accuracy" not in m.metrics:
            continue
        x, h, t = m.metrics, m.metrics.get("heldout") or {}, m.metrics.get("train") or {}
        rows.append({
            "phase": phases.get(m.step, "–"), "round": m.round, "step": _phase(m),
            "set": x.get("eval_set") or ("training problems" if x.get("headline") == "train" else "–"),
            "problems": h.get("problems", m.kept) if x.get("eval_set") else (t.get("problems") or m.kept),
            "k": x.get("samples", 1), "pass1": x.get("pass1", x["accuracy"]), "majority": x.get("majority"),
            "pass_k": x.get("pass_k"), "engine_errors": sum((x.get("engine_errors") or {}).values()),
            "contaminated": h.get("contaminated", 0) if x.get("eval_set") else None,
            "train_acc": t.get("accuracy"), "train_n": t.get("problems"), "wrong": t.get("wrong"),
        })
    return rows


PHASE_HEADER = ["phase", "round", "step", "eval set", "problems", "k", "pass@1", "maj@k", "pass@k",
                "engine errors", "contaminated (left out)", "training-sample accuracy", "wrong listed"]


def phase_cells(r: dict) -> list:
    train = "–" if r["train_acc"] is None else f"{r['train_acc']:.3f} (n={r['train_n']})"
    return [r["phase"], r["round"], r["step"], r["set"], r["problems"], r["k"], _pct(r["pass1"]), _pct(r["majority"]),
            _pct(r["pass_k"]), r["engine_errors"], "–" if r["contaminated"] is None else r["contaminated"], train,
            "–" if r["wrong"] is None else r["wrong"]]


def phase_table_text(d: RunData) -> str:
    """The per-phase table as plain text (for the terminal)."""
    rows = [PHASE_HEADER] + [[str(c) for c in phase_cells(r)] for r in phase_rows(d)]
    if len(rows) == 1:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(PHASE_HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def section_evaluation(d: RunData, out_dir: Path) -> Section:
    sec = Section("evaluation", "Evaluation: accuracy per phase, subject and difficulty")
    evals = [m for m in d.steps("evaluate") if "accuracy" in m.metrics]
    if not evals:
        return missing(sec, "no evaluate step in this run")
    sec.body = ("<p>The student of every phase and round on the same held-out set: pass@1 over k sampled answers, "
                "majority vote over them (answers grouped by the verifier's equivalence) and pass@k; engine "
                "errors count as wrong answers. Eval problems a training problem matches are left out. The "
                "training-sample accuracy is the greedy pass over training problems that feeds the next "
                "round's wrong list.</p>"
                + table(PHASE_HEADER, [phase_cells(r) for r in phase_rows(d)]))
    sec.body += table(["step", "problems answered", "verdicts"],
                      [[_phase(m), m.kept, m.metrics.get("verdicts", {})] for m in evals])
    for key, label in (("by_subject", "subject"), ("by_difficulty", "difficulty")):
        cats = sorted({c for m in evals for c in m.metrics.get(key, {})}, key=lambda c: (len(c), c))
        if cats:
            body = [[c] + [_acc(m.metrics.get(key, {}).get(c)) for m in evals] for c in cats]
            sec.body += f"<h3>Accuracy by {label}</h3>" + table([label] + [m.step for m in evals], body)
    accs = [m.metrics["accuracy"] for m in evals]
    if not any(accs):
        tiny = any(m.config.get("init") == "tiny_random" for m in d.steps("assemble"))
        why = (" The student is the demo's tiny random model, which is not expected to answer correctly: this "
               "shows the evaluation runs end to end, not that training failed." if tiny else "")
        sec.body += f"<p class='note'>Every phase scored 0 correct answers, so no accuracy plot.{why}</p>"
        return sec
    diff = sorted({c for m in evals for c in m.metrics.get("by_difficulty", {})}, key=lambda c: (len(c), c))
    p = plt()
    fig, axes = p.subplots(1, 2 if diff else 1, figsize=(10 if diff else 5, 3.4), squeeze=False)
    ax = axes[0, 0]
    ax.bar(range(len(evals)), accs, color=SERIES[0])
    ax.set_xticks(range(len(evals)), [m.step for m in evals], rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("per phase", fontsize=10)
    if diff:
        ax = axes[0, 1]
        w = 0.8 / len(evals)
        for i, m in enumerate(evals):
            vals = [(m.metrics["by_difficulty"].get(c) or {}).get("accuracy", 0.0) for c in diff]
            ax.bar([j + (i - (len(evals) - 1) / 2) * w for j in range(len(diff))], vals, width=w, label=m.step,
                   color=SERIES[i % len(SERIES)])
        ax.set_xticks(range(len(diff)), diff)
        ax.set_xlabel("difficulty")
        ax.set_ylim(0, 1)
        ax.set_title("per difficulty", fontsize=10)
        ax.legend(fontsize=8)
    save(fig, out_dir, "evaluation_accuracy", sec)
    return sec


def _acc(cell: dict | None) -> str:
    return "–" if not cell else f"{cell.get('accuracy', 0.0):.2f} (n={cell.get('n', 0)})"


# --- example chains ----------------------------------------------------------------------------------

_EXAMPLE_COLS = ["chain_id", "problem_id", "round", "verdict", "keep", "drop_reason", "pred_answer", "quality",
                 "completion_tokens", "finish_reason", "length_ratio", "ngram_repetition", "reflection_density",
                 "verify_detail", "pred_source", "trace_format", "completion", "reasoning", "response"]


def example_chains(d: RunData) -> tuple[dict | None, list[dict]]:
    """The best kept chain and one dropped chain per drop reason (earliest round first), from the filter steps."""
    frames = []
    for m in d.steps("filter"):
        files = shard_files(d.run_dir / m.step)
        if files:
            lf = pl.scan_parquet([str(f) for f in files])
            have = lf.collect_schema().names()
            frames.append(lf.select([c for c in _EXAMPLE_COLS if c in have]))
    if not frames:
        return None, []
    lf = pl.concat(frames, how="diagonal_relaxed")
    names = lf.collect_schema().names()
    if "keep" not in names:
        return None, []
    kept = lf.filter(pl.col("keep").fill_null(False))
    if "quality" in names:
        kept = kept.sort(["quality", "round", "chain_id"], descending=[True, False, False], nulls_last=True)
    best = kept.head(1).collect()
    dropped = (lf.filter(~pl.col("keep").fill_null(False)).with_columns(pl.col("drop_reason").fill_null("unknown"))
               .sort(["round", "chain_id"]).group_by("drop_reason", maintain_order=True).first().collect())
    return (best.row(0, named=True) if best.height else None), dropped.sort("drop_reason").to_dicts()


def _problems(d: RunData, ids: list[str]) -> dict[str, dict]:
    for m in d.steps("ingest")[:1]:
        files = shard_files(d.run_dir / m.step)
        if files:
            lf = pl.scan_parquet([str(f) for f in files])
            cols = [c for c in ("problem_id", "question", "answer") if c in lf.collect_schema().names()]
            got = lf.filter(pl.col("problem_id").is_in(ids)).select(cols).collect()
            return {r["problem_id"]: r for r in got.to_dicts()}
    return {}


def _mark_answer(escaped: str, pred: str | None) -> str:
    """The last occurrence of the extracted answer in the (escaped) trace, highlighted."""
    if not pred:
        return escaped
    needle = html.escape(pred)
    i = escaped.rfind(needle)
    if i < 0:
        return escaped
    return f'{escaped[:i]}<mark class="answer">{needle}</mark>{escaped[i + len(needle):]}'


def _card(c: dict, problem: dict) -> str:
    kept = bool(c.get("keep"))
    verdict = c.get("verdict") or "none"
    head = f'<span class="badge" style="background:{verdict_colour(verdict)}">{html.escape(verdict)}</span> '
    head += "<b>kept</b>" if kept else f'dropped: <mark class="reason">{html.escape(str(c.get("drop_reason")))}</mark>'
    pred = c.get("pred_answer")
    answer = (f'extracted answer: <mark class="answer">{html.escape(pred)}</mark>' if pred
              else 'extracted answer: <mark class="reason">none</mark>')
    if pred and c.get("pred_source"):
        answer += f" <span class='small'>(from {html.escape(str(c['pred_source']))})</span>"
    if problem.get("answer") is not None:
        answer += f" · gold: <code>{html.escape(str(problem['answer']))}</code>"
    facts = [f"chain {c.get('chain_id')}", f"round {c.get('round')}"]
    for key, label in (("trace_format", "format"), ("completion_tokens", "tokens"), ("finish_reason", "finish"),
                       ("quality", "quality"),
                       ("length_ratio", "length ratio"), ("ngram_repetition", "n-gram repetition"),
                       ("reflection_density", "reflection density")):
        v = c.get(key)
        if v is not None:
            facts.append(f"{label} {v:.3g}" if isinstance(v, float) else f"{label} {v}")
    detail = f"<div class='small'>verify: {html.escape(str(c['verify_detail']))}</div>" if c.get("verify_detail") else ""
    trace = c.get("completion") or "\n\n".join(x for x in (c.get("reasoning"), c.get("response")) if x) or ""
    question = problem.get("question")
    q = f"<div><b>question</b>: {html.escape(question[:400])}</div>" if question else ""
    return (f"<div class='card {'kept' if kept else 'dropped'}'><div>{head}</div><div>{answer}</div>"
            f"<div class='small'>{html.escape(' · '.join(facts))}</div>{detail}{q}"
            f"<pre>{_mark_answer(shortened_html(trace), pred)}</pre></div>")


def section_examples(d: RunData) -> Section:
    sec = Section("examples", "Example chains: kept and dropped")
    best, dropped = example_chains(d)
    if best is None and not dropped:
        return missing(sec, "no filter step output")
    chains = ([best] if best else []) + dropped
    problems = _problems(d, [c["problem_id"] for c in chains if c.get("problem_id")])
    sec.body = ("<p>The best chain the filter kept (green) beside one dropped chain per drop reason (red), with "
                "the reason and the extracted answer highlighted; long traces keep their start and their end.</p>"
                "<div class='cards'>" + "".join(_card(c, problems.get(c.get("problem_id"), {})) for c in chains)
                + "</div>")
    return sec
