"""Malformed external traces never crash the filter run and never lose rows: each bad row is a counted
quarantine reason (its message naming the file, row and column), each odd-but-usable row gets a verdict,
and rows_in == kept + dropped + quarantined. A wrong column name or an unreadable file fails at once with
a message naming the key or the file."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filters import filter as filter_stage
from filters.external import ChainsSourceConfig, load_chains
from filters.filter import FilterConfig
from pipeline.rundir import read_table
from tests.filters.stagectx import run_stage

COLS = {"question": "q", "answer": "gold", "trace": "out", "id": "id"}
OK = "<think>add</think>The answer is \\boxed{5}."

# (row, quarantine reason or None for a row that must be scored, its verdict)
ROWS = [
    ({"q": "2+3?", "gold": "5", "out": OK}, None, "correct"),
    ({"q": "2+3 again?", "out": OK}, "missing_answer", None),
    ({"q": "2+3, null gold?", "gold": None, "out": OK}, "missing_answer", None),
    ({"q": "2+3, empty trace?", "gold": "5", "out": "   "}, "missing_trace", None),
    ({"q": "2+3, int gold?", "gold": 5, "out": OK}, None, "correct"),
    ({"q": "2+3, float gold?", "gold": 5.0, "out": OK}, None, "correct"),
    ({"q": "roots?", "gold": [2, 3], "out": "<think>x</think>\\boxed{2}, \\boxed{3}"}, None, "correct"),
    ({"q": "object gold?", "gold": {"value": 5}, "out": OK}, "bad_answer", None),
    ({"q": "int trace?", "gold": "5", "out": 5}, "bad_trace", None),
    ({"q": "list trace?", "gold": "5", "out": [1, 2]}, "bad_trace", None),
    ({"q": "chat without assistant?", "gold": "5", "out": [{"role": "user", "content": "hi"}]}, "bad_trace", None),
    ({"q": ["not", "a", "string"], "gold": "5", "out": OK}, "missing_question", None),
    ({"q": "huge trace?", "gold": "5", "out": "<think>" + "We add the numbers once more. " * 70000 + "</think>\\boxed{5}"},
     None, "correct"),
    ({"q": "a chat trace?", "gold": "5", "out": [{"role": "user", "content": "2+3?"},
                                                 {"role": "assistant", "content": OK}]}, None, "correct"),
]


def _write(path, rows, extra: bytes = b"") -> None:
    path.write_bytes(b"\n".join(json.dumps(r).encode() for r in rows) + b"\n" + extra)


def test_bad_rows_are_counted_never_fatal(tmp_path):
    path = tmp_path / "traces.jsonl"
    bad_utf8 = json.dumps({"q": "latin-1 bytes?", "gold": "5", "out": "caf\udce9 " + OK}, ensure_ascii=False)
    extra = bad_utf8.encode("utf-8", "surrogateescape") + b"\n{truncated json\n[1, 2]\n"
    _write(path, [r for r, _q, _v in ROWS], extra)
    assert len(json.dumps(ROWS[12][0])) > 2_000_000
    cfg = FilterConfig(workers=0, source={"path": str(path), "columns": COLS}, verify={"timeout_s": 5.0})
    m = run_stage(filter_stage, cfg, tmp_path / "run", "filter", {"problems": [], "chains": []})
    want_q: dict[str, int] = {}
    for _r, reason, _v in ROWS:
        if reason:
            want_q[reason] = want_q.get(reason, 0) + 1
    want_q["bad_row"] = 2  # the broken JSON line and the line that is no object
    assert m.quarantined == want_q
    n_scored = sum(1 for _r, q, _v in ROWS if q is None) + 1  # + the line with invalid UTF-8 (kept)
    assert m.rows_in == len(ROWS) + 3
    assert m.rows_in == m.kept + sum(m.dropped.values()) + sum(m.quarantined.values())
    assert m.outputs["chains"] == n_scored
    assert m.metrics["invalid_utf8_rows"] == 1
    rows = read_table(tmp_path / "run" / "filter").to_pylist()
    by_q = {}
    problems = {p["problem_id"]: p for p in read_table(tmp_path / "run" / "filter" / "problems").to_pylist()}
    for r in rows:
        by_q[problems[r["problem_id"]]["question"]] = r["verdict"]
    for row, reason, verdict in ROWS:
        if reason is None:
            assert by_q[row["q"]] == verdict, row["q"]
    assert by_q["latin-1 bytes?"] == "correct"


def test_messages_name_the_file_row_and_column(tmp_path):
    path = tmp_path / "t.jsonl"
    _write(path, [ROWS[0][0], ROWS[8][0], ROWS[7][0]])
    loaded = load_chains(ChainsSourceConfig(path=str(path), columns=COLS))
    assert loaded.bad_refs == [
        f"{path}:2: column 'out' is a int, not a string, message or chat",
        f"{path}:3: column 'gold' holds a dict with objects in it, not an answer",
    ]


def test_parquet_with_wrong_column_types(tmp_path):
    path = tmp_path / "t.parquet"
    table = pa.table({"q": ["2+3?", "2+4?", "2+5?"], "gold": pa.array([b"5", b"6", None], type=pa.binary()),
                      "out": pa.array([1, 2, 3], type=pa.int64())})
    pq.write_table(table, path)
    loaded = load_chains(ChainsSourceConfig(path=str(path), columns={**COLS, "id": None}))
    assert loaded.quarantined == {"bad_trace": 3}
    assert loaded.bad_refs[0] == f"{path}:row0: column 'out' is a int, not a string, message or chat"
    # bytes golds are text: with a string trace column the same file scores
    pq.write_table(table.set_column(2, "out", pa.array([OK, OK, OK])), path)
    loaded = load_chains(ChainsSourceConfig(path=str(path), columns={**COLS, "id": None}))
    assert loaded.problems.column("answer").to_pylist() == ["5", "6"]


def test_a_wrong_column_name_or_an_unreadable_file_fails_at_once(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"q": ["x"], "gold": ["1"], "trace": [OK]}), path)
    with pytest.raises(ValueError, match=r"filter.source.columns.trace: column 'out' is not in .*t.parquet"):
        load_chains(ChainsSourceConfig(path=str(path), columns={**COLS, "id": None}))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"filter.source.path: .*broken.parquet is not a readable Parquet file"):
        load_chains(ChainsSourceConfig(path=str(broken), columns=COLS))
    jl = tmp_path / "t.jsonl"
    _write(jl, [{"q": "x", "gold": "1", "trace": OK}] * 3)
    with pytest.raises(ValueError, match="filter.source.columns.trace: no row of .* has a column 'out'"):
        load_chains(ChainsSourceConfig(path=str(jl), columns=COLS))
