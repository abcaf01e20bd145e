"""The `train` stage and its plan: tau selection, wrong-problem rounds, drops counted, train_log table.

Run: .venv/bin/pytest -q tests/trainers/test_train.py
"""

from __future__ import annotations

import shutil

import pyarrow as pa
import pytest

from pipeline.config import ConfigError, validate_config
from pipeline.rundir import ShardWriter, read_table
from pipeline.runner import StageContext, plan
from pipeline.schema import SFT
from trainers.evaluate import FAILED, FAILED_DIR
from trainers.train import TrainConfig, round_settings, run, select_rows


def _ctx(tmp_path, run_cfg, step: str, round_: int, inputs: dict) -> StageContext:
    out = tmp_path / step
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(
        run_dir=tmp_path, step=step, stage="train", round=round_, out_dir=out, inputs=inputs,
        run_config=run_cfg, fingerprint="test",
    )


def _raw(**train) -> dict:
    return {
        "run": {"name": "t", "root": "runs"},
        "ingest": {"sources": [{"kind": "synthetic", "synthetic": {"n": 4, "seed": 0}}]},
        "generate": {"engine": {"kind": "scripted"}},
        "filter": {},
        "curate": {},
        "assemble": {"init": "tiny_random"},
        "train": {"max_steps": 2, **train},
        "evaluate": {"limit": 4},
    }


def test_plan_has_rounds_with_wrong_problems_from_evaluate():
    cfg = validate_config(_raw(iterative={"rounds": 2, "tau": [3, 4]}))
    steps = {s.name: s for s in plan(cfg)}
    names = list(steps)
    tail = names[names.index("assemble"):]
    assert tail == ["assemble", "train", "evaluate", "train-t1", "evaluate-t1", "train-t2", "evaluate-t2"]
    assert steps["train"].inputs == {"sft": ["curate"], "model": ["assemble"]}
    assert steps["train-t1"].inputs == {"sft": ["curate"], "model": ["train"], "wrong": ["evaluate"]}
    assert steps["train-t2"].inputs["model"] == ["train-t1"] and steps["train-t2"].inputs["wrong"] == ["evaluate-t1"]
    assert steps["evaluate-t2"].inputs["model"] == ["train-t2"]
    assert steps["train-t2"].round == 2


def test_plan_without_evaluate_or_model_source():
    raw = _raw()
    del raw["evaluate"]
    raw["train"]["iterative"] = {"rounds": 1, "tau": [4]}
    steps = {s.name: s for s in plan(validate_config(raw))}
    assert "wrong" not in steps["train-t1"].inputs and "evaluate" not in steps
    raw = _raw()
    del raw["assemble"]
    with pytest.raises(ValueError, match="train.init_from"):
        plan(validate_config(raw))
    with pytest.raises(ConfigError, match="iterative"):
        validate_config(_raw(iterative={"rounds": 3, "tau": [3, 4]}))


def test_round_settings_follow_the_iterative_schedule():
    cfg = TrainConfig(lr=4e-5, tau=None, iterative={"rounds": 4, "tau": [2, 3, 4, 5], "lr": [1e-4, 2e-5]})
    assert round_settings(cfg, 0) == (None, 4e-5)
    assert round_settings(cfg, 1) == (2, 1e-4)
    assert round_settings(cfg, 4) == (5, 2e-5)


def test_select_rows_keeps_tau_and_wrong():
    t = pa.table({"problem_id": ["a", "b", "c", "d"], "quality": [2.0, 3.5, None, 5.0]})
    rows, below = select_rows(t, 3.0, {"a"})
    assert rows.column("problem_id").to_pylist() == ["a", "b", "d"] and below == 1
    rows, below = select_rows(t, None, set())
    assert rows.num_rows == 4 and below == 0


@pytest.fixture
def sft_with_bad_image(sft_rows, tmp_path):
    rows = [dict(r) for r in sft_rows]
    bad = dict(rows[1])
    bad["sample_id"], bad["problem_id"] = "s-bad", "p-bad"
    bad["images"] = [{"bytes": b"\x89PNG\r\n\x1a\n-truncated", "format": "png", "width": 40, "height": 30}]
    rows.append(bad)
    d = tmp_path / "curate"
    with ShardWriter(d, SFT, "sft") as w:
        w.write(rows)
    return d


def test_train_stage_rounds_counts_and_outputs(tiny_student, sft_with_bad_image, tmp_path):
    run_cfg = validate_config({"run": {"name": "t"}})
    model_step = tmp_path / "assemble"
    shutil.copytree(tiny_student, model_step / "student")
    cfg = TrainConfig(max_steps=3, micro_batch=2, lr=1e-3, loss_chunk=32, data={"max_len": 512},
                      iterative={"rounds": 1, "tau": [4.0], "lr": [5e-4]})
    ctx = _ctx(tmp_path, run_cfg, "train", 0, {"sft": [sft_with_bad_image], "model": [model_step]})
    m = run(cfg, ctx)
    m.check_counts()
    assert m.rows_in == 7 and m.kept == 6 and m.dropped == {"bad_image": 1}
    log = read_table(tmp_path / "train")
    assert log.column("step").to_pylist() == [1, 2, 3]
    assert m.metrics["steps"] == 3 and m.metrics["lr"] == 1e-3
    assert (tmp_path / "train" / "model" / "config.json").exists()
    assert read_table(tmp_path / "train" / "input").num_rows == 6

    # round 1: quality >= 4 (rows s002 q=4, s003 q=5) plus every row of a problem answered wrongly (p000 q=2)
    with ShardWriter(tmp_path / "evaluate" / FAILED_DIR, FAILED, "failed") as w:
        w.write([{"problem_id": "p000", "round": 0, "verdict": "wrong", "pred_answer": "3"}])
    ctx1 = _ctx(tmp_path, run_cfg, "train-t1", 1,
                {"sft": [sft_with_bad_image], "model": [tmp_path / "train"], "wrong": [tmp_path / "evaluate"]})
    m1 = run(cfg, ctx1)
    m1.check_counts()
    trained = sorted(read_table(tmp_path / "train-t1" / "input").column("sample_id").to_pylist())
    assert trained == ["s000", "s002", "s003"]
    assert m1.dropped == {"below_tau": 4} and m1.kept == 3
    assert m1.metrics["tau"] == 4.0 and m1.metrics["lr"] == 5e-4 and m1.metrics["wrong_problems"] == 1
    assert m1.metrics["init_from"].endswith("train/model")


def test_train_stage_fails_clearly_when_nothing_is_left(tiny_student, sft_dir, tmp_path):
    run_cfg = validate_config({"run": {"name": "t"}})
    cfg = TrainConfig(max_steps=1, tau=9.0, init_from=str(tiny_student))
    ctx = _ctx(tmp_path, run_cfg, "train", 0, {"sft": [sft_dir]})
    with pytest.raises(ValueError, match="no SFT samples left.*tau=9.0"):
        run(cfg, ctx)


def test_check_images_decodes_pixels_not_only_the_container(sft_rows):
    import struct
    import zlib

    from trainers.train import drop_bad_images

    good = dict(sft_rows[1])  # one image
    png = bytearray(good["images"][0]["bytes"])
    i = png.find(b"IDAT")
    n = struct.unpack(">I", png[i - 4 : i])[0]
    for k in range(i + 24, i + 44):  # damage the compressed pixels, then make the chunk CRC valid again
        png[k] ^= 0xFF
    png[i + 4 + n : i + 8 + n] = struct.pack(">I", zlib.crc32(bytes(png[i : i + 4 + n])) & 0xFFFFFFFF)
    bad = dict(good, sample_id="s-pixels", images=[dict(good["images"][0], bytes=bytes(png))])
    kept, dropped = drop_bad_images(pa.Table.from_pylist([good, bad], schema=SFT))
    assert dropped == ["s-pixels"] and kept.column("sample_id").to_pylist() == [good["sample_id"]]
