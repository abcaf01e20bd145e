"""Alignment pairs (pipeline/pairs.py): image+caption and image+question+short-answer rows from JSONL,
Parquet and HF `save_to_disk` become SFT samples the trainer's data path takes as they are; every bad row
(missing image, unreadable image, empty caption or answer, bad JSON) is quarantined with its reason and
counted, and the same pairs written in another format give the same samples."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import pairs
from pipeline.pairs import PairsConfig
from tests.filters.stagectx import run_stage
from tests.pipeline.helpers import read_rows

N_GOOD_CAPTIONS, N_GOOD_VQA = 5, 2


def _figures(n: int, seed: int = 3) -> list[dict]:
    """The synthetic generator's figures, each with a caption that says what it shows."""
    from pipeline.synthetic import make_problem

    out = []
    for i in range(n):
        p = make_problem(seed, i)
        out.append({"id": p["id"], "png": p["images"][0]["bytes"], "question": p["question"], "answer": p["answer"],
                    "caption": f"A {p['kind'].replace('_', ' ')} figure ({p['subject']}), difficulty {p['difficulty']}."})
    return out


def _rows(tmp: Path) -> tuple[list, dict]:
    """Good caption and VQA rows plus one bad row of every kind, as JSONL rows with image files."""
    img = tmp / "img"
    img.mkdir(parents=True)
    figs = _figures(N_GOOD_CAPTIONS + N_GOOD_VQA)
    for f in figs:
        (img / f"{f['id']}.png").write_bytes(f["png"])
    (img / "garbage.png").write_bytes(b"this is not an image at all")
    (img / "truncated.png").write_bytes(figs[0]["png"][: len(figs[0]["png"]) // 2])
    rows: list = [{"id": f["id"], "image": f"img/{f['id']}.png", "caption": f["caption"]} for f in figs[:N_GOOD_CAPTIONS]]
    rows += [{"id": f["id"], "image": f"img/{f['id']}.png", "question": f["question"], "answer": f["answer"]}
             for f in figs[N_GOOD_CAPTIONS:]]
    rows += [
        {"id": "gone", "image": "img/does-not-exist.png", "caption": "a figure"},
        {"id": "noimage", "image": None, "caption": "a caption without its image"},
        {"id": "garbage", "image": "img/garbage.png", "caption": "a figure"},
        {"id": "truncated", "image": "img/truncated.png", "caption": "a figure"},
        {"id": "blank", "image": f"img/{figs[1]['id']}.png", "caption": "   "},
        {"id": "unanswered", "image": f"img/{figs[2]['id']}.png", "question": "How many bars?", "answer": ""},
        "{not json",
        dict(rows[0]),  # the first pair again
    ]
    expect = {"kept": N_GOOD_CAPTIONS + N_GOOD_VQA, "dropped": {"duplicate": 1},
              "quarantined": {"missing_image": 2, "unreadable_image": 2, "empty_caption": 1, "empty_answer": 1,
                              "bad_json": 1}}
    return rows, expect


def _jsonl(tmp: Path) -> tuple[Path, dict]:
    rows, expect = _rows(tmp)
    path = tmp / "pairs.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path, expect


def _run(tmp: Path, sources: list[dict], **kw):
    cfg = PairsConfig.model_validate({"sources": sources, **kw})
    m = run_stage(pairs, cfg, tmp / "run", "align-data", {})
    return m, read_rows(tmp / "run" / "align-data"), read_rows(tmp / "run" / "align-data" / "quarantine")


def test_caption_and_vqa_rows_become_sft_samples_and_bad_rows_are_counted(tmp_path, tiny_student):
    from trainers.data import SFTDataset
    from trainers.model import load_student

    path, expect = _jsonl(tmp_path)
    m, rows, quarantine = _run(tmp_path, [{"kind": "jsonl", "path": str(path)}])
    assert m.rows_in == 7 + 8 and m.kept == expect["kept"]
    assert m.quarantined == expect["quarantined"] and m.dropped == expect["dropped"]
    assert m.rows_in == m.kept + sum(m.quarantined.values()) + sum(m.dropped.values())
    assert (m.metrics["caption_rows"], m.metrics["vqa_rows"]) == (N_GOOD_CAPTIONS, N_GOOD_VQA)
    # every quarantined row names its file and line and says what is wrong with it
    by_reason = {}
    for q in quarantine:
        by_reason.setdefault(q["reason"], []).append(q)
        assert q["source_ref"].startswith(f"{path}:")
    assert any("does-not-exist.png" in q["error"] for q in by_reason["missing_image"])
    assert any("no image in column 'image'" in q["error"] for q in by_reason["missing_image"])
    assert {json.loads(q["row_json"])["id"] for q in by_reason["unreadable_image"]} == {"garbage", "truncated"}
    assert "not valid JSON" in by_reason["bad_json"][0]["error"]

    figs = _figures(N_GOOD_CAPTIONS + N_GOOD_VQA)
    for row, fig in zip(rows, figs, strict=True):
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert user["content"].startswith("<image>\n") and user["content"].count("<image>") == 1
        assert len(row["images"]) == 1 and row["images"][0]["bytes"] == fig["png"]
    for row, fig in zip(rows[:N_GOOD_CAPTIONS], figs, strict=False):
        assert row["messages"][0]["content"] == "<image>\nDescribe the image briefly."
        assert row["messages"][1]["content"] == fig["caption"]
    vqa = rows[N_GOOD_CAPTIONS:]
    assert [r["messages"][1]["content"] for r in vqa] == [f["answer"] for f in figs[N_GOOD_CAPTIONS:]]
    assert all(figs[i]["question"].split("?")[0] in r["messages"][0]["content"] for i, r in
               zip(range(N_GOOD_CAPTIONS, len(figs)), vqa, strict=True))

    # the trainer's data path takes every pair: the loss covers exactly the answer and its end of turn
    _, processor = load_student(tiny_student, dtype="float32")
    ds = SFTDataset(tmp_path / "run" / "align-data", processor)
    assert len(ds) == len(rows) and not ds.dropped
    tok = processor.tokenizer
    for i, row in enumerate(rows):
        item = ds[i]
        assert item["pixel_values"] is not None
        target = tok.decode(item["labels"][item["labels"] != -100])
        assert target == row["messages"][1]["content"] + "<|im_end|>"
        assert "<think>" not in target


def test_the_same_pairs_as_parquet_and_hf_dataset_give_the_same_samples(tmp_path):
    datasets = pytest.importorskip("datasets")
    path, expect = _jsonl(tmp_path / "j")
    _, ref, _ = _run(tmp_path / "j", [{"kind": "jsonl", "path": str(path)}])
    # rewritten: images inline as bytes, columns renamed, the bad rows carried along in that format
    raw, _ = _rows(tmp_path / "p")
    recs = []
    for r in raw:
        if isinstance(r, str):
            continue  # a Parquet file has no unparseable lines
        img = r.get("image")
        # the file that is not there: empty bytes
        data = (tmp_path / "p" / img).read_bytes() if img and (tmp_path / "p" / img).exists() else (b"" if img else None)
        recs.append({"key": r["id"], "picture": data, "text": r.get("caption"), "q": r.get("question"),
                     "a": r.get("answer")})
    cols = {"id": "key", "images": "picture", "caption": "text", "question": "q", "answer": "a"}
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "pairs.parquet")
    m, got, _ = _run(tmp_path / "pq", [{"kind": "parquet", "path": str(tmp_path / "pairs.parquet"), "columns": cols}])
    assert [r["sample_id"] for r in got] == [r["sample_id"] for r in ref]
    assert [r["messages"] for r in got] == [r["messages"] for r in ref]
    assert m.kept == expect["kept"] and m.quarantined["unreadable_image"] == 2
    assert m.quarantined["missing_image"] == 2

    # an HF dataset saved to disk with an Image feature (the good rows; images decoded by the dataset)
    good = [r for r in recs if r["picture"] and r["key"] not in ("garbage", "truncated", "blank", "unanswered")]
    feats = datasets.Features({"key": datasets.Value("string"), "picture": datasets.Image(),
                               "text": datasets.Value("string"), "q": datasets.Value("string"),
                               "a": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({k: [r[k] if k != "picture" else {"bytes": r[k], "path": None} for r in good]
                                     for k in feats}, features=feats)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    m, got, _ = _run(tmp_path / "hfrun", [{"kind": "hf", "path": str(tmp_path / "hf"), "split": "train",
                                           "columns": cols}])
    assert [r["sample_id"] for r in got] == [r["sample_id"] for r in ref]
    assert m.dropped == {"duplicate": 1} and not m.quarantined


def test_every_row_bad_is_a_clear_error_and_a_missing_file_is_named(tmp_path):
    from pipeline.ingest import IngestError

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"image": "nope.png", "caption": "x"}) + "\n")
    with pytest.raises(IngestError, match=r"none of the 1 rows read is a usable pair.*missing_image"):
        _run(tmp_path, [{"kind": "jsonl", "path": str(path)}])
    assert pairs.preflight(PairsConfig.model_validate({"sources": [{"kind": "jsonl", "path": str(tmp_path / "x")}]})) \
        == [f"align.pairs.sources.0.path: file not found: {tmp_path / 'x'}"]


def test_mathv_figures_as_vqa_pairs(mathv_dir, tmp_path, tiny_student):
    """MATH-V's real competition figures with their questions and short gold answers."""
    from pipeline.ingest import normalise_answer
    from trainers.data import SFTDataset
    from trainers.model import load_student

    cols = {"id": "id", "images": "image_path", "caption": None, "question": "problem", "answer": "gold_answer",
            "choices": "options"}
    m, rows, _ = _run(tmp_path, [{"kind": "jsonl", "path": str(mathv_dir / "testmini.jsonl"), "columns": cols,
                                  "limit": 24}], image_check="full")
    assert m.rows_in == 24 and m.kept + sum(m.quarantined.values()) + sum(m.dropped.values()) == 24
    assert m.kept >= 20 and m.metrics["vqa_rows"] == m.kept
    src = [json.loads(x) for x in (mathv_dir / "testmini.jsonl").read_text().splitlines()[:24]]
    golds = {normalise_answer(s["gold_answer"]) for s in src}
    options = {o for s in src for o in (s["options"] or [])}
    for r in rows:
        user, assistant = r["messages"]
        assert user["content"].count("<image>") == 1 and "<image1>" not in user["content"]
        assert assistant["content"] in golds
        assert r["images"][0]["width"] > 0
        if assistant["content"] in ("A", "B", "C", "D", "E"):  # a multiple-choice gold: its options are in the question
            assert "(A)" in user["content"] and any(o in user["content"] for o in options)
    _, processor = load_student(tiny_student, dtype="float32")
    ds = SFTDataset(tmp_path / "run" / "align-data", processor)
    assert len(ds) == len(rows) and not ds.dropped
    assert ds[0]["pixel_values"] is not None
