"""Ingest on real MATH-V data and on every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.ingest import IngestError, infer_answer_type, normalise_answer
from pipeline.rundir import Manifest

from .helpers import png_bytes, read_rows, run_config, write_config, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def _mathv_source(mathv_dir: Path, **extra) -> dict:
    return {
        "kind": "jsonl",
        "path": str(mathv_dir / "testmini.jsonl"),
        "name": "mathv",
        "columns": {
            "id": "id", "question": "problem", "answer": "gold_answer", "images": "image_path",
            "choices": "options", "answer_text": "gold_option_text", "answer_type": None,
            "subject": "subject", "difficulty": "level",
        },
        **extra,
    }


def test_mathv_testmini(tmp_path, mathv_dir, ray_local):
    cfg = write_config(tmp_path, {"ingest": {"sources": [_mathv_source(mathv_dir)]}})
    runner, res = run_config(cfg)
    m = res["ingest"]
    assert m.rows_in == 304 and m.kept + sum(m.dropped.values()) + sum(m.quarantined.values()) == 304
    rows = read_rows(runner.run_dir / "ingest")
    assert len(rows) == m.kept
    assert len({r["problem_id"] for r in rows}) == len(rows)
    choice = [r for r in rows if r["answer_type"] == "choice"]
    assert len(choice) == 190
    assert all(r["answer"] in "ABCDE" and r["choices"] and r["answer_text"] for r in choice)
    # a letter gold keeps its option text: MATH-V gives it as gold_option_text
    src = {r["source_ref"].split("id=")[1]: r for r in rows}
    import json

    raw = {j["id"]: j for j in map(json.loads, open(mathv_dir / "testmini.jsonl"))}
    for rid, r in src.items():
        if raw[rid]["question_type"] == "multi_choice":
            assert r["answer_text"] == raw[rid]["gold_option_text"]
    for r in rows:
        (im,) = r["images"]
        assert im["format"] in ("jpeg", "png") and im["width"] > 0 and im["height"] > 0 and len(im["bytes"]) > 100
    # same input, same ids (stable across runs)
    runner2, _ = run_config(cfg, ["run.name=again"])
    assert [r["problem_id"] for r in read_rows(runner2.run_dir / "ingest")] == [r["problem_id"] for r in rows]


def _bad_jsonl(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "img").mkdir(parents=True)
    (d / "img" / "ok.png").write_bytes(png_bytes())
    (d / "img" / "ok2.png").write_bytes(png_bytes((0, 0, 255)))
    (d / "img" / "corrupt.png").write_bytes(png_bytes()[:40])
    (d / "img" / "garbage.jpg").write_bytes(b"this is not an image")
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 99, 199)).save(buf, format="JPEG")
    (d / "img" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    path = write_jsonl(d / "p.jsonl", [
        {"question": "What is 2+2?", "answer": "4", "images": "img/ok.png"},
        '{"question": "broken line", "answer": ',
        {"question": "Which colour?", "answer": "(B)", "choices": ["red", "blue"], "images": ["img/ok2.png"]},
        {"question": "truncated image", "answer": "1", "images": "img/corrupt.png"},
        {"question": "garbage image", "answer": "1", "images": "img/garbage.jpg"},
        {"question": "truncated jpeg", "answer": "1", "images": ["img/ok.png", "img/cut.jpg"]},
        {"question": "missing image", "answer": "1", "images": "img/nope.png"},
        {"question": "no answer here", "answer": None},
        {"question": "empty answer", "answer": "  "},
        {"question": "What is 2+2?", "answer": "4", "images": "img/ok.png"},
        {"question": "Which is blue?", "answer": "blue", "choices": ["(A) red", "(B) blue"]},
    ])
    with open(path, "ab") as f:  # a Latin-1 degree sign: line 12 is not UTF-8
        f.write(b'{"question": "An angle of 90\xb0?", "answer": "90"}\n')
    return path


def test_bad_rows_are_quarantined_with_reasons(tmp_path, ray_local):
    path = _bad_jsonl(tmp_path)
    cfg = write_config(tmp_path, {"ingest": {"sources": [{"kind": "jsonl", "path": str(path)}]}})
    runner, res = run_config(cfg)
    m: Manifest = res["ingest"]
    assert m.rows_in == 12
    assert m.kept == 3
    assert m.dropped == {"duplicate": 1}
    assert m.quarantined == {"bad_json": 1, "corrupt_image": 3, "missing_image": 1, "missing_answer": 2,
                             "invalid_utf8": 1}
    quar = read_rows(runner.run_dir / "ingest" / "quarantine")
    assert len(quar) == 8
    assert any("cut.jpg" in q["error"] and "runcated" in q["error"] for q in quar)
    by_reason = {q["reason"]: q for q in quar}
    assert f"{path}:2" in by_reason["bad_json"]["error"]
    assert f"{path}:12" in by_reason["invalid_utf8"]["error"] and "\\xb0" in by_reason["invalid_utf8"]["error"]
    assert "nope.png" in by_reason["missing_image"]["error"]
    assert any("corrupt.png" in q["error"] for q in quar if q["reason"] == "corrupt_image")
    kept = read_rows(runner.run_dir / "ingest")
    letter = next(r for r in kept if r["question"] == "Which colour?")
    assert (letter["answer"], letter["answer_text"], letter["answer_type"]) == ("B", "blue", "choice")
    text_gold = next(r for r in kept if r["question"] == "Which is blue?")
    assert (text_gold["answer"], text_gold["answer_text"], text_gold["choices"]) == ("B", "blue", ["red", "blue"])


def test_all_rows_bad_fails_with_clear_message(tmp_path, ray_local):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"q": ', {"question": "x"}, {"question": "y", "answer": ""}])
    cfg = write_config(tmp_path, {"ingest": {"sources": [{"kind": "jsonl", "path": str(path)}]}})
    with pytest.raises(IngestError, match=r"none of the 3 rows.*missing_answer.*quarantine"):
        run_config(cfg)


def test_missing_input_file_fails_at_once(tmp_path, ray_local):
    cfg = write_config(tmp_path, {"ingest": {"sources": [{"kind": "parquet", "path": str(tmp_path / "nope.parquet")}]}})
    with pytest.raises(IngestError, match=r"ingest\.sources\.0\.path: file not found: .*nope\.parquet"):
        run_config(cfg)


def test_parquet_and_hf_sources(tmp_path, ray_local):
    import datasets

    img = png_bytes()
    rows = [
        {"q": f"What is {i}+1?", "a": str(i + 1), "img": {"bytes": img, "path": None}, "topic": "arith"} for i in range(6)
    ]
    pq.write_table(pa.Table.from_pylist([{**r, "img": img} for r in rows]), tmp_path / "p.parquet")
    features = datasets.Features({"q": datasets.Value("string"), "a": datasets.Value("string"),
                                  "img": datasets.Image(), "topic": datasets.Value("string")})
    ds = datasets.Dataset.from_list(rows, features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "hf"))
    cols = {"question": "q", "answer": "a", "images": "img", "subject": "topic"}
    cfg = write_config(tmp_path, {"ingest": {"sources": [
        {"kind": "parquet", "path": str(tmp_path / "p.parquet"), "columns": cols, "name": "pq"},
        {"kind": "hf", "path": str(tmp_path / "hf"), "split": "test", "columns": cols, "name": "hf", "limit": 4},
    ]}})
    runner, res = run_config(cfg)
    m = res["ingest"]
    # the HF rows are the same problems as the Parquet ones: exact duplicates across sources
    assert (m.rows_in, m.kept, m.dropped) == (10, 6, {"duplicate": 4})
    out = read_rows(runner.run_dir / "ingest")
    assert {r["source"] for r in out} == {"pq"}
    assert all(r["images"][0]["width"] == 32 and r["subject"] == "arith" for r in out)


@pytest.mark.parametrize(
    "raw,norm,atype",
    [
        ("$\\frac{9}{7}$", "\\frac{9}{7}", "number"),
        ("\\boxed{12}", "12", "number"),
        ("3.50.", "3.50", "number"),
        ("(2, \\infty)", "(2, \\infty)", "interval"),
        ("[1, 3)", "[1, 3)", "interval"),
        ("\\{1, 2, 3\\}", "\\{1, 2, 3\\}", "set"),
        ("(3, -4)", "(3, -4)", "tuple"),
        ("\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}", "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}", "matrix"),
        ("2\\sqrt{3}", "2\\sqrt{3}", "expression"),
        ("Tuesday", "Tuesday", "text"),
    ],
)
def test_answer_normalisation(raw, norm, atype):
    assert normalise_answer(raw) == norm
    assert infer_answer_type(norm, None) == atype


def test_synthetic_is_deterministic(tmp_path):
    from pipeline.synthetic import make_problem

    a, b = make_problem(3, 7), make_problem(3, 7)
    assert a == b
    assert make_problem(4, 7) != a
    kinds = {make_problem(0, i)["kind"] for i in range(10)}
    assert len(kinds) == 5
    levels = {make_problem(0, i)["difficulty"] for i in range(40)}
    assert levels == {1, 2, 3}
    needs = [make_problem(0, i)["needs_image"] for i in range(60)]
    assert 0 < sum(needs) < 60


def test_malformed_rows_and_decompression_bombs_are_quarantined(tmp_path, ray_local):
    from PIL import Image

    d = tmp_path / "d"
    d.mkdir()
    Image.new("1", (15000, 15000)).save(d / "bomb.png")
    path = write_jsonl(d / "p.jsonl", [
        {"question": "ok", "answer": "1"},
        {"question": "choices not a list", "answer": "A", "choices": 5},
        {"question": "image is a number", "answer": "1", "images": [5]},
        {"question": "bomb", "answer": "1", "images": "bomb.png"},
        {"question": "numeric subject", "answer": "2", "subject": 7},
        {"question": "subject is a list", "answer": "3", "subject": ["algebra"]},
    ])
    cfg = write_config(tmp_path, {"ingest": {"sources": [{"kind": "jsonl", "path": str(path)}]}})
    runner, res = run_config(cfg)
    m = res["ingest"]
    assert (m.rows_in, m.kept) == (6, 2)
    assert m.quarantined == {"bad_row": 2, "missing_image": 1, "corrupt_image": 1}
    errors = [(q["reason"], q["error"]) for q in read_rows(runner.run_dir / "ingest" / "quarantine")]
    assert any(r == "bad_row" and f"{path}:2" in e for r, e in errors)
    assert any(r == "bad_row" and f"{path}:6" in e and "'subject'" in e for r, e in errors)
    assert any(r == "corrupt_image" and "bomb.png" in e for r, e in errors)
    kept = {p["question"]: p["subject"] for p in read_rows(runner.run_dir / "ingest")}
    assert kept["numeric subject"] == "7", kept


def test_replacing_an_image_changes_the_fingerprint(tmp_path):
    import os

    from pipeline.config import load_config
    from pipeline.runner import Runner

    d = tmp_path / "data"
    (d / "img").mkdir(parents=True)
    (d / "img" / "a.png").write_bytes(png_bytes())
    path = write_jsonl(d / "p.jsonl", [{"question": "q", "answer": "1", "images": "img/a.png"}])
    cfg = write_config(tmp_path, {"ingest": {"sources": [{"kind": "jsonl", "path": str(path)}]}})
    before = Runner(load_config(cfg))
    fp = before.fingerprint(before.steps[0])
    (d / "img" / "a.png").write_bytes(png_bytes((1, 2, 3), size=(40, 30)))
    os.utime(d / "img" / "a.png", ns=(1, 1))
    after = Runner(load_config(cfg))
    assert after.fingerprint(after.steps[0]) != fp
