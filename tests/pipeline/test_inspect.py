"""`r1v inspect` on wide tables: --columns, --where, --limit, --row (vertical, long text cut in the
middle, the chain's verdict / extracted and gold answer / drop reason first), describe only where it
means something, valid steps and columns named when one is misspelt."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from pipeline import cli
from pipeline.errors import EXIT_INPUT, EXIT_USAGE
from pipeline.rundir import Manifest
from pipeline.schema import CHAINS, PROBLEMS, extend
from tests.filters.stagectx import write_step

FILTERED = extend(CHAINS, pa.field("pred_answer", pa.string()), pa.field("verdict", pa.string()),
                  pa.field("quality", pa.float64()), pa.field("keep", pa.bool_()), pa.field("drop_reason", pa.string()),
                  *[pa.field(f"score_{i}", pa.float64()) for i in range(12)])
TEXT_ONLY = pa.schema([pa.field("problem_id", pa.string()), pa.field("note", pa.string())])


def _chain(i: int) -> dict:
    keep = i % 3 == 0
    trace = "START " + " ".join(f"step{k}" for k in range(400 + i)) + " \\boxed{7} END"
    row = {"chain_id": f"c{i:03d}", "problem_id": f"p{i % 4}", "round": 0, "teacher": "t", "sample_idx": i,
           "reasoning": trace, "response": "\\boxed{7}", "completion": trace, "completion_tokens": 100 + 10 * i,
           "pred_answer": "7" if keep else str(i), "verdict": "correct" if keep else "wrong",
           "quality": 4.0 if keep else 0.0, "keep": keep, "drop_reason": None if keep else "wrong"}
    row.update({f"score_{k}": 0.01 * k * i for k in range(12)})
    return row


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "demo"
    probs = [{"problem_id": f"p{i}", "question": f"q{i}", "images": [], "answer": "7", "answer_type": "integer"}
             for i in range(4)]
    write_step(run, "ingest", PROBLEMS, "problems", probs)
    write_step(run, "ingest", TEXT_ONLY, "quarantine", [{"problem_id": "x", "note": "bad row"}], sub="quarantine")
    write_step(run, "filter", FILTERED, "chains", [_chain(i) for i in range(30)])
    write_step(run, "notes", TEXT_ONLY, "notes", [{"problem_id": f"p{i}", "note": "n" * 80} for i in range(3)])
    for t, step in enumerate(("ingest", "filter", "notes")):  # the order they ran (no config.yaml here)
        m = Manifest.load(run / step)
        m.started_at = 1000.0 + t
        m.write(run / step)
    return run


def _out(capsys, argv) -> tuple[int, str, str]:
    rc = cli.main(argv)
    c = capsys.readouterr()
    return rc, c.out, c.err


def test_wide_table_shows_what_fits_and_names_the_rest(run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    rc, out, _ = _out(capsys, ["inspect", str(run), "filter"])
    assert rc == 0 and "30 rows" in out
    head = out.split("first 5 row(s):")[1].split("more column(s):")[0]
    assert all(len(ln) <= 120 for ln in head.splitlines()), head
    # the columns that say what happened to a chain come first
    assert "chain_id" in head and "keep" in head and "drop_reason" in head
    assert "more column(s):" in out and "score_11" in out.split("more column(s):")[1]
    assert "describe (" in out and "score_3" in out.split("describe (")[1]


def test_columns_where_limit(run, capsys):
    rc, out, _ = _out(capsys, ["inspect", str(run), "filter", "--columns", "chain_id,verdict,completion_tokens",
                               "--where", "(verdict == 'wrong') & (completion_tokens > 300)", "--limit", "3"])
    assert rc == 0
    # chains 21..29 are > 300 tokens; of those, the wrong ones are those with i % 3 != 0
    wrong_long = [i for i in range(30) if i % 3 and 100 + 10 * i > 300]
    assert f"{len(wrong_long)} matching --where" in out
    body = out.split("first 3 row(s):")[1]
    assert "c022" in body and "c023" in body and "c025" in body and "c026" not in body
    assert "more column(s)" not in out and "pred_answer" not in body
    rc, out, _ = _out(capsys, ["inspect", str(run), "filter", "-w", "drop_reason = 'wrong' AND quality = 0",
                               "-c", "chain_id", "-n", "100"])
    assert rc == 0 and "20 matching --where" in out


def test_row_vertical_with_verdict_answers_and_trace_cut(run, capsys):
    rc, out, _ = _out(capsys, ["inspect", str(run), "filter", "--row", "c004"])
    assert rc == 0
    lines = out.splitlines()
    keys = [ln[2:].split()[0] for ln in lines[2:] if ln[:2] in ("> ", "  ") and ln[2:].strip() and ln[2] != " "]
    assert keys[:8] == ["chain_id", "problem_id", "round", "keep", "drop_reason", "verdict", "pred_answer", "gold_answer"]
    for key, value in (("drop_reason", "wrong"), ("verdict", "wrong"), ("pred_answer", "4"), ("gold_answer", "7")):
        assert re.search(rf"^> {key}\s+{value}$", out, re.M), key
    trace = next(ln for ln in lines if ln.lstrip("> ").startswith("completion "))
    assert "START step0" in trace and "\\boxed{7} END" in trace and "chars]…" in trace
    rc, out, _ = _out(capsys, ["inspect", str(run), "filter", "--row", "c004", "--full"])
    assert "chars]…" not in out and "step403" in out


def test_describe_skipped_where_meaningless(run, capsys):
    rc, out, _ = _out(capsys, ["inspect", str(run), "notes"])
    assert rc == 0 and "describe (" not in out and "nnnn" in out
    rc, out, _ = _out(capsys, ["inspect", str(run), "filter", "--no-describe"])
    assert "describe (" not in out


def test_misspelt_step_table_column_name_the_valid_ones(run, capsys):
    rc, _, err = _out(capsys, ["inspect", str(run), "filtr"])
    assert rc == EXIT_USAGE
    assert "no step 'filtr'" in err and "did you mean `filter`?" in err and "valid: ingest, filter, notes" in err
    rc, _, err = _out(capsys, ["inspect", str(run), "ingest", "--table", "quarantne"])
    assert rc == EXIT_USAGE and "did you mean `quarantine`?" in err
    rc, out, _ = _out(capsys, ["inspect", str(run), "ingest", "--table", "quarantine"])
    assert rc == 0 and "bad row" in out
    rc, _, err = _out(capsys, ["inspect", str(run), "filter", "--where", "verdct == 'wrong'"])
    assert rc == EXIT_INPUT and "no column 'verdct' (did you mean `verdict`?)" in err
    rc, _, err = _out(capsys, ["inspect", str(run), "filter", "-c", "chain_id,qualty"])
    assert rc == EXIT_INPUT and "did you mean `quality`?" in err
    rc, _, err = _out(capsys, ["inspect", str(run), "filter", "--row", "c999"])
    assert rc == EXIT_INPUT and "no row with chain_id or problem_id = 'c999'" in err
    for e in (err,):
        assert len([ln for ln in e.splitlines() if ln.strip()]) == 1
