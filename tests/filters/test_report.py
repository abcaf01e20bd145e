"""report: works with whatever steps a run has; sections say what is missing; numbers match manifests."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from filters import curate
from filters.curate import CurateConfig
from filters.report import drop_totals, load_run, round_yield, write_report
from filters.report_parts import SERIES, VERDICT_COLOURS
from pipeline.rundir import Manifest
from pipeline.schema import CHAINS, PROBLEMS, extend
from pipeline.synthetic import make_problem
from tests.filters.stagectx import run_stage, write_step

FILTERED = extend(CHAINS, pa.field("pred_answer", pa.string()), pa.field("verdict", pa.string()), pa.field("quality", pa.float64()),
                  pa.field("keep", pa.bool_()), pa.field("drop_reason", pa.string()))


def _problems(n: int) -> list[dict]:
    out = []
    for i in range(n):
        p = make_problem(0, i)
        out.append({"problem_id": f"p{i}", "question": p["question"], "images": p["images"], "answer": p["answer"],
                    "answer_type": p["answer_type"], "difficulty": p["difficulty"]})
    return out


def _chain(i: int, pid: str, verdict: str, tokens: int, penalty: float) -> dict:
    keep = verdict == "correct"
    return {"chain_id": f"c{i}", "problem_id": pid, "round": 0, "teacher": "t", "sample_idx": i % 3,
            "reasoning": f"step {i} " * (tokens // 2), "response": "\\boxed{1}", "completion_tokens": tokens,
            "sampling": {"temperature": 0.6, "top_p": 1.0, "max_tokens": 512, "repetition_penalty": penalty, "seed": i},
            "pred_answer": "1" if keep else f"{i}0", "verdict": verdict, "quality": 4.0 if keep else 0.0, "keep": keep,
            "drop_reason": None if keep else verdict}


def test_report_on_partial_run_says_what_is_missing(tmp_path):
    run = tmp_path / "run"
    write_step(run, "ingest", PROBLEMS, "problems", _problems(3))
    page = write_report(run).read_text()
    assert "<h2>Steps and counts</h2>" in page and "<td>ingest</td>" in page
    # lengths, correctness, penalty, rounds, training, rl, evaluation, examples
    assert page.count('class="missing"') == 8
    assert "no filter step output" in page and "no generate / filter / curate step" in page
    assert not list((run / "report").glob("*.png"))  # no drop happened, nothing to plot


def test_report_numbers_follow_the_run(tmp_path):
    run = tmp_path / "run"
    write_step(run, "assess", PROBLEMS, "problems", _problems(4))
    chains = [_chain(i, f"p{i % 4}", "correct" if i % 3 else "wrong", 100 + 40 * i, 1.0 + 0.02 * i)
              for i in range(12)]
    write_step(run, "filter", FILTERED, "chains", chains)
    m = run_stage(curate, CurateConfig(n_per_problem=1), run, "curate", {"chains": ["filter"], "problems": ["assess"]})
    d = load_run(run)
    assert d.chains.height == 12 and d.sft.height == m.kept
    [y] = round_yield(d)
    assert y == {"round": 0, "chains": 12, "kept_by_filter": 12, "sft_samples": m.kept,
                 "problems_attempted": 4, "problems_solved": m.metrics["problems_solved"],
                 "problems_to_retry": m.metrics["problems_to_retry"]}
    page = write_report(run).read_text()
    assert page.count('class="missing"') == 3  # no train, no rl, no evaluate step
    for png in ("chain_lengths", "correctness_by_difficulty", "penalty_vs_length", "drop_reasons", "yield_per_round"):
        assert (run / "report" / f"{png}.png").exists()
    # 12 chains, penalties 1.00 .. 1.22, tokens rising with them: a perfect positive correlation.
    assert "12 chains; penalty range 1.000–1.220; Pearson r(penalty, tokens) = 1.000" in page


def test_report_missing_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        write_report(tmp_path / "nope")


# --- beyond curation: training, evaluation, examples; drops counted once; the page in a browser -------

def _full_run(tmp_path, with_assess: bool = True):
    """assess -> filter -> curate (real curate stage), two train steps with per-step logs, two evaluations."""
    from trainers.train import TRAIN_LOG

    run = tmp_path / "run"
    write_step(run, "ingest", PROBLEMS, "problems", _problems(4))
    write_step(run, "assess" if with_assess else "decontaminate", PROBLEMS, "problems", _problems(4))
    chains = [_chain(i, f"p{i % 4}", ("correct", "wrong", "truncated")[i % 3], 100 + 40 * i, 1.0 + 0.02 * i)
              for i in range(12)]
    chains[5]["drop_reason"] = "looping"
    write_step(run, "filter", FILTERED, "chains", chains)
    fm = Manifest.load(run / "filter")
    fm.kept = sum(c["keep"] for c in chains)
    fm.dropped = dict(Counter(c["drop_reason"] for c in chains if not c["keep"]))
    fm.metrics["warnings"] = ["4 of 12 chains have no final answer"]
    fm.write(run / "filter")
    up = "assess" if with_assess else "decontaminate"
    run_stage(curate, CurateConfig(n_per_problem=1), run, "curate", {"chains": ["filter"], "problems": [up]})
    for t, name in enumerate(("train", "train-t1")):
        rows = [{"step": s, "epoch": 0, "loss": 5.0 - 0.1 * s - t, "lr": 1e-3 * (1 - s / 10), "grad_norm": 1.0 + 0.01 * s,
                 "tokens": 100, "tok_s": 1.0, "mfu": 0.0, "step_s": 0.1} for s in range(1, 9)]
        write_step(run, name, TRAIN_LOG, "train_log", rows, stage="train", round_=t)
    from trainers.rl import RL_LOG

    rl_rows = [{"step": s, "reward": 0.1 * s, "reward_std": 0.2, "accuracy_mean": 0.0, "format_mean": 0.05 * s,
                "length_mean": -0.01, "kl": 0.001 * s, "completion_len": 20.0, "tok_s": 50.0, "groups": 4,
                "zero_std_groups": 1 if s % 2 else 0, "accuracy_timeouts": 1 if s == 3 else 0, "gen_s": 0.6,
                "reward_s": 0.1, "update_s": 0.3} for s in range(1, 11)]
    write_step(run, "rl", RL_LOG, "rl_log", rl_rows, stage="rl", round_=0)
    for t, (name, model) in enumerate((("evaluate", "train"), ("evaluate-t1", "train-t1"))):
        m = Manifest(stage="evaluate", step=name, round=t, rows_in=8, kept=8, metrics={
            "accuracy": 0.25 + 0.25 * t, "verdicts": {"correct": 2 + 2 * t, "wrong": 6 - 2 * t},
            "by_subject": {"counting": {"accuracy": 0.5, "n": 4}, "geometry": {"accuracy": 0.25 * t, "n": 4}},
            "by_difficulty": {"1": {"accuracy": 0.5, "n": 4}, "2": {"accuracy": 0.25 * t, "n": 4}},
            "model_dir": str(run / model / "model")})
        (run / name).mkdir(parents=True)
        m.write(run / name)
    return run


def _section(page: str, key: str) -> str:
    return page.split(f'<section id="{key}">')[1].split("</section>")[0]


def test_report_training_evaluation_examples(tmp_path):
    run = _full_run(tmp_path)
    page = write_report(run).read_text()
    assert page.count('class="missing"') == 0
    tr = _section(page, "training")
    assert "<td>train</td>" in tr and "<td>train-t1</td>" in tr and "<td>8</td>" in tr  # 8 optimizer steps each
    assert "<td>4.9</td><td>4.2</td>" in tr  # train: first and final loss
    ev = _section(page, "evaluation")
    assert "evaluate (model of train)" in ev and "evaluate-t1 (model of train-t1)" in ev
    assert "Accuracy by subject" in ev and "0.50 (n=4)" in ev and "Accuracy by difficulty" in ev
    rl = _section(page, "rl")
    # 10 steps; format mean over the first five 0.15 -> last five 0.40; 5 of 40 groups all-equal; 1 timeout
    assert "<td>rl</td><td>10</td>" in rl and "0.150 → 0.400" in rl and "5 / 40" in rl
    assert "verifier timeouts" in rl and "60% / 10% / 30%" in rl
    ex = _section(page, "examples")
    assert ex.count("class='card kept'") == 1
    # one dropped card per reason: wrong, truncated, looping
    assert ex.count("class='card dropped'") == 3
    for reason in ("wrong", "truncated", "looping"):
        assert f'dropped: <mark class="reason">{reason}</mark>' in ex
    assert ex.count('extracted answer: <mark class="answer">') == 4
    assert "\\boxed{<mark class=\"answer\">1</mark>}" in ex  # the kept chain's answer, marked in its trace
    assert ex.count("· gold: <code>") == 4
    for png in ("training_curves", "rl_curves", "evaluation_accuracy"):
        assert (run / "report" / f"{png}.png").exists()
    # sections in pipeline order
    keys = [k.split('"')[0] for k in page.split('<section id="')[1:]]
    assert keys == ["steps", "lengths", "correctness", "penalty", "drops", "rounds", "training", "rl", "evaluation", "examples"]


def test_drops_counted_once_and_adds_up_explained(tmp_path):
    run = _full_run(tmp_path)
    d = load_run(run)
    [cm] = d.steps("curate")
    assert cm.dropped["filtered_out"] == 8  # the 8 chains the filter dropped
    totals = drop_totals(d)
    assert "curate:filtered_out" not in totals
    assert sum(v for k, v in totals.items() if k.startswith("filter:")) == 8
    page = write_report(run).read_text()
    drops = _section(page, "drops")
    assert "counted once, under filter" in drops
    assert "adds up</b>: the step's rows in equal kept + dropped + quarantined" in _section(page, "steps")
    assert "filtered_out: 8 (dropped by filter)" in _section(page, "steps")
    assert "<li><b>filter</b>: 4 of 12 chains have no final answer</li>" in _section(page, "steps")


def test_no_penalty_plot_without_assess(tmp_path):
    run = _full_run(tmp_path, with_assess=False)
    page = write_report(run).read_text()
    assert "no assess step" in _section(page, "penalty")
    assert not (run / "report" / "penalty_vs_length.png").exists()


def test_all_zero_evaluation_draws_nothing_and_says_why(tmp_path):
    run = _full_run(tmp_path)
    for name in ("evaluate", "evaluate-t1"):
        m = Manifest.load(run / name)
        m.metrics["accuracy"] = 0.0
        m.write(run / name)
    page = write_report(run).read_text()
    assert "Every phase scored 0 correct answers, so no accuracy plot." in _section(page, "evaluation")
    assert not (run / "report" / "evaluation_accuracy.png").exists()


def test_verdict_colours_read():
    assert VERDICT_COLOURS["correct"] == "#1a9850" and VERDICT_COLOURS["wrong"] == "#d73027"  # green, red
    assert not {c.lower() for c in SERIES} & {"#1a9850", "#d73027", "#2ca02c", "#d62728"}


@pytest.fixture
def browser_profile(tmp_path):
    from tests.browser import chromium

    if chromium() is None:
        pytest.skip("no chromium installed (Debian package `chromium`)")
    return tmp_path / "profile"


def test_report_page_in_a_real_browser(tmp_path, browser_profile):
    from tests.browser import load_page

    # the check itself catches a broken image and a console error
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img alt="x" src="missing.png"><script>console.error("boom")</script></body></html>')
    broken = load_page(bad, tmp_path / "p0")
    assert [i["width"] for i in broken.images] == [0] and any("boom" in e for e in broken.errors)

    run = _full_run(tmp_path)
    path = write_report(run)
    got = load_page(path, browser_profile)
    assert got.title == "r1v report: run"
    assert got.errors == []
    names = [i["alt"] for i in got.images]
    assert names == [p.stem for p in sorted((run / "report").glob("*.png"), key=lambda p: names.index(p.stem))]
    assert len(names) >= 7
    for img in got.images:
        assert img["complete"] and img["width"] > 100 and img["height"] > 100 and img["shown"] > 100, img
    for title in ("Steps and counts", "Training: loss", "Evaluation: accuracy", "Example chains"):
        assert title in got.text


def test_report_tabulates_each_phase_on_the_held_out_set(tmp_path, capsys):
    """Every evaluate step (any phase: an added phase's evaluate is one more row) is a row of the per-phase
    table, with pass@1, maj@k, engine errors and the contamination left out; `r1v report` prints it too."""
    from pathlib import Path

    from pipeline import cli

    run = _full_run(tmp_path)
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    (run / "config.yaml").write_text(demo.read_text())  # the plan the phases come from
    for t, (name, model) in enumerate((("evaluate", "train"), ("evaluate-t1", "train-t1"))):
        m = Manifest.load(run / name)
        m.metrics.update({"eval_set": "synthetic-eval", "headline": "heldout", "samples": 4, "pass1": 0.25 + 0.25 * t,
                          "majority": 0.375 + 0.25 * t, "pass_k": 0.75, "engine_errors": {"engine_exception": 1 - t},
                          "model_step": model,
                          "heldout": {"problems": 8, "contaminated": 2, "pass1": 0.25 + 0.25 * t},
                          "train": {"problems": 4, "accuracy": 0.5, "wrong": 2}})
        m.write(run / name)
    page = write_report(run).read_text()
    ev = _section(page, "evaluation")
    assert "<th>pass@1</th><th>maj@k</th><th>pass@k</th>" in ev
    assert ("<td>sft</td><td>0</td><td>evaluate (model of train)</td><td>synthetic-eval</td><td>8</td><td>4</td>"
            "<td>0.250</td><td>0.375</td><td>0.750</td><td>1</td><td>2</td><td>0.500 (n=4)</td><td>2</td>") in ev
    assert "<td>sft</td><td>1</td><td>evaluate-t1 (model of train-t1)</td>" in ev and "<td>0.625</td>" in ev
    assert cli.main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "evaluation per phase:" and "pass@1" in lines[1] and "maj@k" in lines[1]
    assert lines[2].split()[:3] == ["sft", "0", "evaluate"] and "0.250" in lines[2] and "0.375" in lines[2]
    assert lines[3].split()[:3] == ["sft", "1", "evaluate-t1"] and "0.500" in lines[3]
