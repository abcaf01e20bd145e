"""assess: DRLC formula, heuristic QDAM/VTIA scores on real MATH-V images, the stage end to end."""

from __future__ import annotations

import io
import json
import math

import pyarrow as pa
import pytest
from PIL import Image, ImageFilter

from filters import assess
from filters.assess import AssessConfig, BudgetConfig, HeuristicConfig, drlc_penalty, minmax, token_budget
from filters.assess_heuristics import combine_scores, image_stats, score_problem
from pipeline.images import image_record
from pipeline.rundir import read_table
from pipeline.schema import PROBLEMS
from pipeline.synthetic import make_problem
from tests.filters.stagectx import run_stage, write_step


def _problem(pid: str, question: str, images=(), difficulty=None, needs_image=None, choices=None) -> dict:
    return {
        "problem_id": pid, "question": question, "images": list(images), "answer": "1", "choices": choices,
        "answer_type": "number", "source": "test", "subject": "geometry", "difficulty": difficulty,
        "needs_image": needs_image,
    }


def _mathv(mathv_dir, n: int) -> list[dict]:
    rows = [json.loads(line) for line in open(mathv_dir / "testmini.jsonl")][:n]
    out = []
    for r in rows:
        rec = image_record((mathv_dir / r["image_path"]).read_bytes(), r["image_path"])
        out.append(_problem(r["id"], r["problem"], [rec], difficulty=r["level"], choices=r["options"]))
    return out


def _blurred(rec: dict, radius: float = 3.0) -> dict:
    im = Image.open(io.BytesIO(rec["bytes"])).convert("RGB").filter(ImageFilter.GaussianBlur(radius))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return image_record(buf.getvalue(), "blurred")


# --- DRLC ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.1, 0.2, math.log(2), 1.0, 3.0])
def test_drlc_penalty_range_and_endpoints(alpha):
    grid = [i / 10 for i in range(11)]
    pens = [drlc_penalty(s, s, s, alpha, 1.0, 1.0) for s in grid]
    hi = min(2.0, math.exp(alpha))
    assert pens[0] == pytest.approx(hi)  # easiest problem: the highest penalty
    assert pens[-1] == pytest.approx(1.0)  # hardest: no penalty
    assert all(1.0 - 1e-12 <= p <= hi + 1e-12 for p in pens)
    assert all(a >= b for a, b in zip(pens, pens[1:], strict=False))  # falls as complexity rises


def test_drlc_penalty_known_values_and_weights():
    # c = (0.2 + 2*0.5 + 0.5*0.8) / 3.5 = 1.6/3.5
    c = (0.2 + 2 * 0.5 + 0.5 * 0.8) / 3.5
    assert drlc_penalty(0.2, 0.5, 0.8, alpha=0.5, beta=2.0, gamma=0.5) == pytest.approx(math.exp(0.5 * (1 - c)))
    # beta weighs S_t: raising S_t with a larger beta lowers P more.
    lo_beta = drlc_penalty(0.0, 1.0, 0.0, 0.5, 0.5, 1.0)
    hi_beta = drlc_penalty(0.0, 1.0, 0.0, 0.5, 3.0, 1.0)
    assert hi_beta < lo_beta


def test_token_budget_grows_and_is_bounded():
    cfg = BudgetConfig(min_tokens=1000, max_tokens=9000, exponent=2.0, multiple_of=100)
    vals = [token_budget(i / 20, cfg) for i in range(21)]
    assert vals[0] == 1000 and vals[-1] == 9000
    assert all(a <= b for a, b in zip(vals, vals[1:], strict=False))
    assert all(v % 100 == 0 for v in vals)
    assert token_budget(0.5, cfg) == 3000  # 1000 + 8000 * 0.25
    with pytest.raises(ValueError, match="max_tokens"):
        BudgetConfig(min_tokens=500, max_tokens=100)


def test_minmax():
    assert minmax([2.0, 4.0, 3.0]) == [0.0, 1.0, 0.5]
    assert minmax([7.0, 7.0]) == [0.5, 0.5]
    assert minmax([]) == []


# --- heuristics on real images ------------------------------------------------------------------------


def test_sharpness_drops_on_blurred_mathv_images(mathv_dir):
    cfg = HeuristicConfig()
    for p in _mathv(mathv_dir, 12):
        rec = p["images"][0]
        sharp = image_stats(rec, cfg.image_max_side)["sharpness"]
        blur = image_stats(_blurred(rec), cfg.image_max_side)["sharpness"]
        assert blur < 0.5 * sharp, p["problem_id"]
        raw_sharp = score_problem(p, cfg)
        raw_blur = score_problem(p | {"images": [_blurred(rec)]}, cfg)
        assert raw_blur["qa_clarity"] < raw_sharp["qa_clarity"], p["problem_id"]


def test_image_necessity_from_text_cues():
    cfg = HeuristicConfig()
    img = make_problem(0, 0)["images"][0]
    refers = score_problem(_problem("a", "In the figure shown below, what is the length of the hypotenuse?", [img]), cfg)
    self_contained = score_problem(
        _problem("b", "A right triangle has legs 3 and 4 and area 6; the sum of legs is 7. Find the hypotenuse.", [img]),
        cfg,
    )
    assert refers["qa_image_necessity"] > self_contained["qa_image_necessity"]
    no_img = score_problem(_problem("c", "In the figure shown below, what is x?"), cfg)
    assert no_img["qa_image_necessity"] == 0.0 and no_img["qa_integration"] == 0.0
    s = combine_scores(no_img, None, 0.0)
    assert s["s_v"] == 0.0 and s["s_i"] == 0.0


# --- the stage ----------------------------------------------------------------------------------------


def _write_problems(run_dir, rows):
    return write_step(run_dir, "ingest", PROBLEMS, "problems", rows)


def test_assess_stage_monotone_in_difficulty(tmp_path):
    """Same problem at difficulty 1, 2, 3: penalty falls, budget grows, all within [1, min(2, e^alpha)]."""
    base = make_problem(0, 0)
    rows = [
        _problem(f"p{d}", base["question"], base["images"], difficulty=d, needs_image=base["needs_image"])
        for d in (1, 2, 3)
    ]
    run = tmp_path / "run"
    _write_problems(run, rows)
    cfg = AssessConfig(alpha=0.5, workers=0, budget=BudgetConfig(min_tokens=256, max_tokens=4096, multiple_of=32))
    m = run_stage(assess, cfg, run, "assess", {"problems": ["ingest"]})
    assert (m.rows_in, m.kept) == (3, 3)
    out = {r["problem_id"]: r for r in read_table(run / "assess").to_pylist()}
    pens = [out[f"p{d}"]["repetition_penalty"] for d in (1, 2, 3)]
    toks = [out[f"p{d}"]["max_tokens"] for d in (1, 2, 3)]
    assert pens[0] > pens[1] > pens[2]
    assert toks[0] < toks[1] < toks[2]
    assert all(1.0 <= p <= min(2.0, math.exp(0.5)) + 1e-9 for p in pens)
    assert all(256 <= t <= 4096 for t in toks)
    # Every input column survives, and the scores are min-max normalised.
    assert set(PROBLEMS.names) <= set(out["p1"])
    assert out["p1"]["s_t"] == 0.0 and out["p3"]["s_t"] == 1.0


@pytest.mark.parametrize("compute", ["tasks", "actors"])
def test_assess_stage_ray_matches_in_process_on_mathv(tmp_path, mathv_dir, ray_local, compute):
    rows = _mathv(mathv_dir, 16)
    rows[0] = rows[0] | {"images": [_blurred(rows[0]["images"][0], 4.0)], "problem_id": "blurred"}
    run = tmp_path / "run"
    _write_problems(run, rows)
    m_local = run_stage(assess, AssessConfig(workers=0, batch_size=5), run, "assess", {"problems": ["ingest"]})
    local = read_table(run / "assess").to_pylist()
    m_ray = run_stage(assess, AssessConfig(workers=2, batch_size=5, compute=compute), run, "assess", {"problems": ["ingest"]})
    dist = read_table(run / "assess").to_pylist()
    assert m_local.kept == m_ray.kept == 16
    assert [r["problem_id"] for r in dist] == [r["problem_id"] for r in local]
    for a, b in zip(local, dist, strict=True):
        assert a["repetition_penalty"] == pytest.approx(b["repetition_penalty"])
        assert a["max_tokens"] == b["max_tokens"]
    by_id = {r["problem_id"]: r for r in dist}
    others = [r["qa_sharpness"] for r in dist if r["problem_id"] != "blurred"]
    assert by_id["blurred"]["qa_sharpness"] < min(others)
    pens = [r["repetition_penalty"] for r in dist]
    assert min(pens) >= 1.0 and max(pens) <= min(2.0, math.exp(AssessConfig().alpha)) + 1e-9
    assert m_ray.metrics["penalty_min"] < m_ray.metrics["penalty_max"]


def test_assess_quarantines_unreadable_image(tmp_path):
    good = make_problem(0, 1)
    bad_img = {"bytes": b"\x89PNG\r\n\x1a\nnot really", "format": "png", "width": 10, "height": 10}
    # The broken row comes first in its batch: the batch must keep every score column anyway.
    rows = [
        _problem("broken", "What is shown in the picture?", [bad_img], difficulty=2),
        _problem("ok", good["question"], good["images"], difficulty=1),
        _problem("text", "Compute 2 + 3 * 4.", difficulty=1),
    ]
    run = tmp_path / "run"
    _write_problems(run, rows)
    m = run_stage(assess, AssessConfig(workers=0), run, "assess", {"problems": ["ingest"]})
    assert m.rows_in == 3 and m.kept == 2 and m.quarantined == {"image_unreadable": 1}
    q = read_table(run / "assess" / "quarantine").to_pylist()
    assert q[0]["source_ref"] == "broken" and "image 0" in q[0]["error"]
    assert {r["problem_id"] for r in read_table(run / "assess").to_pylist()} == {"ok", "text"}


def test_assess_empty_input_writes_nothing_and_adds_up(tmp_path):
    run = tmp_path / "run"
    (run / "ingest").mkdir(parents=True)
    pa_empty = pa.Table.from_pylist([], schema=PROBLEMS)
    import pyarrow.parquet as pq

    pq.write_table(pa_empty, run / "ingest" / "part-00000.parquet")
    m = run_stage(assess, AssessConfig(workers=0), run, "assess", {"problems": ["ingest"]})
    assert (m.rows_in, m.kept) == (0, 0)
