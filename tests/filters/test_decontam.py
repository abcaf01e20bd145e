"""decontaminate: normalisation, n-gram overlap, counts, the matches table, MATH-V as an eval set."""

from __future__ import annotations

import json

import pytest

from filters import decontaminate
from filters.decontaminate import DecontaminateConfig, EvalIndex, EvalSetConfig, normalize
from pipeline.rundir import read_table
from pipeline.schema import PROBLEMS
from pipeline.synthetic import make_problem
from tests.filters.stagectx import run_stage, write_step

EVAL = [
    {"id": "e1", "question": "A right triangle has legs of length 6 and 8. What is the length of its hypotenuse?"},
    {"id": "e2", "question": "Let $f(x) = \\frac{x^2 + 1}{x - 3}$. Find all real x for which f(x) is negative."},
    {"id": "e3", "question": "How many squares are in the picture?"},
    {"id": "e4", "question": "Find the area."},
]


def _p(pid: str, q: str) -> dict:
    return {"problem_id": pid, "question": q, "images": [], "answer": "1", "answer_type": "number", "source": "t"}


def test_normalize_strips_latex_punctuation_and_tags():
    assert normalize("Let $f(x) = \\frac{x^2}{3}$, <image1> FIND it!") == ["let", "f", "x", "x", "2", "3", "find", "it"]
    assert normalize(None) == []


def test_overlap_cases():
    items = [("ev", e["id"], e["question"]) for e in EVAL]
    idx = EvalIndex(items, n=8, min_words=5)
    # Re-typeset copy (LaTeX and punctuation differ) matches fully.
    hit = idx.best_match("Let f(x)=(x^2+1)/(x-3); find ALL real x for which f(x) is negative!")
    assert hit is not None and items[hit[0]][1] == "e2" and hit[1] == pytest.approx(1.0)
    # An eval question embedded in a longer problem: overlap counts against the smaller set.
    long = "Warm-up. " + EVAL[0]["question"] + " Then double it and add three more units to the result."
    hit = idx.best_match(long)
    assert items[hit[0]][1] == "e1" and hit[1] == pytest.approx(1.0)
    # Short question (< n words, >= min_words) appearing verbatim inside nothing: only e3 itself.
    hit = idx.best_match("how many squares are in the picture")
    assert items[hit[0]][1] == "e3" and hit[1] == 1.0
    # Below min_words only an exact match counts: "find the area of the square" is not "find the area".
    assert idx.best_match("Find the area of the square") is None
    assert idx.best_match("find   the AREA") is not None
    # Unrelated text does not match.
    assert idx.best_match("A bag holds 4 red and 6 blue marbles; two are drawn. What is the probability?") is None


def test_decontaminate_stage_counts_and_matches(tmp_path):
    eval_path = tmp_path / "eval.jsonl"
    eval_path.write_text("\n".join(json.dumps(e) for e in EVAL) + "\n")
    clean = [_p(f"c{i}", make_problem(3, i)["question"]) for i in range(6)]
    dirty = [
        _p("d1", "A right triangle has legs of length 6 and 8. What is the length of its hypotenuse?"),
        _p("d2", "Let f(x) = (x^2+1)/(x-3). Find all real x for which f(x) is negative."),
        _p("d3", "HOW MANY squares are in the picture?"),
    ]
    # Shares a 10-word phrase with e1: 3 of e1's 10 8-grams (overlap 0.3).
    partial = _p("part", "A right triangle has legs of length 6 and 8. Compute the radius of its inscribed circle now.")
    run = tmp_path / "run"
    write_step(run, "ingest", PROBLEMS, "problems", clean + dirty + [partial])
    cfg = DecontaminateConfig(eval_sets=[EvalSetConfig(path=str(eval_path), name="evalset", id_column="id")])
    m = run_stage(decontaminate, cfg, run, "decontaminate", {"problems": ["ingest"]})
    assert m.rows_in == 10 and m.kept == 7 and m.dropped == {"contaminated": 3}
    kept = {r["problem_id"] for r in read_table(run / "decontaminate").to_pylist()}
    assert kept == {c["problem_id"] for c in clean} | {"part"}
    matches = {r["problem_id"]: r for r in read_table(run / "decontaminate" / "matches").to_pylist()}
    assert {k: v["eval_id"] for k, v in matches.items()} == {"d1": "e1", "d2": "e2", "d3": "e3"}
    assert matches["d1"]["eval_set"] == "evalset" and matches["d1"]["overlap"] == 1.0
    assert m.metrics["contaminated_by_set"] == {"evalset": 3}

    loose = cfg.model_copy(update={"threshold": 0.15})
    m2 = run_stage(decontaminate, loose, run, "decontaminate", {"problems": ["ingest"]})
    assert m2.dropped == {"contaminated": 4} and m2.kept == 6
    matches = {r["problem_id"]: r for r in read_table(run / "decontaminate" / "matches").to_pylist()}
    assert matches["part"]["eval_id"] == "e1" and matches["part"]["overlap"] == pytest.approx(0.3)


def test_decontaminate_against_mathv(tmp_path, mathv_dir):
    """MATH-V questions mixed into a synthetic pool are exactly the ones dropped."""
    mathv = [json.loads(line) for line in open(mathv_dir / "testmini.jsonl")]
    leaked = [_p(r["id"], r["problem"]) for r in mathv[:25]]
    pool = [_p(f"s{i}", make_problem(0, i)["question"]) for i in range(40)]
    run = tmp_path / "run"
    write_step(run, "ingest", PROBLEMS, "problems", pool + leaked)
    cfg = DecontaminateConfig(
        eval_sets=[EvalSetConfig(path=str(mathv_dir / "testmini.jsonl"), question_column="problem", id_column="id")]
    )
    m = run_stage(decontaminate, cfg, run, "decontaminate", {"problems": ["ingest"]})
    assert m.metrics["eval_items"] == len(mathv)
    assert m.dropped == {"contaminated": 25} and m.kept == 40
    matches = read_table(run / "decontaminate" / "matches").to_pylist()
    assert sorted(r["problem_id"] for r in matches) == sorted(r["problem_id"] for r in leaked)
    assert all(r["eval_id"] == r["problem_id"] for r in matches)


def test_bad_eval_set_names_file_and_column(tmp_path):
    p = tmp_path / "eval.jsonl"
    p.write_text('{"text": "hello"}\n')
    run = tmp_path / "run"
    write_step(run, "ingest", PROBLEMS, "problems", [_p("a", "x")])
    cfg = DecontaminateConfig(eval_sets=[EvalSetConfig(path=str(p))])
    with pytest.raises(KeyError, match="eval.jsonl.*'question'"):
        run_stage(decontaminate, cfg, run, "decontaminate", {"problems": ["ingest"]})
    cfg = DecontaminateConfig(eval_sets=[EvalSetConfig(path=str(tmp_path / "missing.jsonl"))])
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run_stage(decontaminate, cfg, run, "decontaminate", {"problems": ["ingest"]})
    p.write_text('{"question": "ok"}\n{not json\n')
    cfg = DecontaminateConfig(eval_sets=[EvalSetConfig(path=str(p))])
    with pytest.raises(ValueError, match="eval.jsonl:2"):
        run_stage(decontaminate, cfg, run, "decontaminate", {"problems": ["ingest"]})


def _synthetic_rows(seed: int, idx: range, prefix: str) -> list[dict]:
    out = []
    for i in idx:
        p = make_problem(seed, i)
        out.append(_p(f"{prefix}{i}", p["question"]) | {"images": p["images"]})
    return out


def test_image_aware_needs_the_same_figure(tmp_path):
    """Templated questions over different figures are different problems; a copied figure is a leak."""
    from PIL import Image

    from pipeline.images import decode, encode_pil

    eval_src = {"kind": "synthetic", "name": "synth-eval", "synthetic": {"n": 30, "seed": 1}}
    eval_imgs = {make_problem(1, i)["images"][0]["bytes"] for i in range(30)}
    pool = _synthetic_rows(0, range(60), "s")
    leaked = _synthetic_rows(1, range(5), "leak")  # same question text and the very same images
    # A lossless re-encoding (PNG -> BMP) of an eval figure is still that figure.
    p6 = make_problem(1, 6)
    leaked.append(_p("leak-bmp", p6["question"]) | {"images": [encode_pil(decode(p6["images"][0]), "bmp")]})
    run = tmp_path / "run"
    write_step(run, "ingest", PROBLEMS, "problems", pool + leaked)
    # exact pixels: the synthetic figures come from one template, and only the very same figure counts
    cfg = DecontaminateConfig(eval_sets=[EvalSetConfig(source=eval_src)], image_match="exact")
    m = run_stage(decontaminate, cfg, run, "decontaminate", {"problems": ["ingest"]})
    assert m.metrics["eval_items"] == 30
    dropped = {r["problem_id"] for r in read_table(run / "decontaminate" / "matches").to_pylist()}
    assert {r["problem_id"] for r in leaked} <= dropped
    # Any pool problem dropped besides them really repeats an eval figure byte for byte (the generator
    # can draw the same problem under two seeds).
    extra = [r for r in pool if r["problem_id"] in dropped]
    assert all(r["images"][0]["bytes"] in eval_imgs for r in extra)
    assert len(extra) <= 3 and m.dropped == {"contaminated": len(dropped)} and m.kept == 66 - len(dropped)

    # Text alone would throw away most of the pool: the synthetic questions are templated.
    text_only = cfg.model_copy(update={"image_aware": False})
    m2 = run_stage(decontaminate, text_only, run, "decontaminate", {"problems": ["ingest"]})
    assert m2.dropped["contaminated"] > 40

    # A resized JPEG copy is caught only by the perceptual hash (the default).
    small = encode_pil(decode(p6["images"][0]).resize((160, 120), Image.Resampling.BILINEAR), "jpeg")
    write_step(run, "ingest", PROBLEMS, "problems", [_p("resized", p6["question"]) | {"images": [small]}])
    assert run_stage(decontaminate, cfg, run, "decontaminate", {"problems": ["ingest"]}).kept == 1
    perceptual = cfg.model_copy(update={"image_match": DecontaminateConfig().image_match})
    assert run_stage(decontaminate, perceptual, run, "decontaminate", {"problems": ["ingest"]}).kept == 0


def test_eval_set_needs_exactly_one_of_path_or_source():
    with pytest.raises(ValueError, match="exactly one"):
        EvalSetConfig()
    with pytest.raises(ValueError, match="exactly one"):
        EvalSetConfig(path="a.jsonl", source={"kind": "synthetic"})


def _variants(im):
    """Near-copies of a figure as another team would hold them: re-compressed, resized, re-encoded."""
    from PIL import Image

    from pipeline.images import encode_pil

    w, h = im.size
    half = im.resize((max(16, w // 2), max(16, h // 2)), Image.Resampling.BILINEAR)
    big = im.resize((int(w * 1.5), int(h * 1.5)), Image.Resampling.BICUBIC)
    out = {"jpeg": encode_pil(im.convert("RGB"), "jpeg"), "half_jpeg": encode_pil(half.convert("RGB"), "jpeg"),
           "upscaled_png": encode_pil(big, "png"), "webp": encode_pil(im.convert("RGB"), "webp")}
    return out


def test_perceptual_hash_catches_recompressed_and_resized_mathv_figures(tmp_path, mathv_dir):
    """MATH-V items copied with their question and a re-encoded / resized figure are contaminated; the
    same questions over other MATH-V figures are not (a text match alone does not count)."""
    from pipeline.images import decode

    src = {"kind": "jsonl", "path": str(mathv_dir / "testmini.jsonl"), "name": "mathv",
           "columns": {"id": "id", "question": "problem", "answer": "gold_answer", "images": "image_path",
                       "choices": "options"}}
    cfg = DecontaminateConfig(eval_sets=[EvalSetConfig(source=src)])
    items, _skipped = decontaminate.load_eval_items(cfg.eval_sets, cfg.image_match)
    from pipeline.ingest import SourceConfig, load_sources

    problems = [r for kind, r in load_sources([SourceConfig.model_validate(src)]) if kind == "problem"]
    picked = problems[:40]
    copies, others = [], []
    for i, p in enumerate(picked):
        im = decode(p["images"][0])
        for name, rec in _variants(im).items():
            copies.append(_p(f"{p['problem_id']}-{name}", p["question"]) | {"images": [rec]})
        other = problems[(i + 100) % len(problems)]["images"][0]  # a different MATH-V figure
        others.append(_p(f"{p['problem_id']}-other", p["question"]) | {"images": [other]})
    run = tmp_path / "run"
    write_step(run, "ingest", PROBLEMS, "problems", copies + others)
    m = run_stage(decontaminate, cfg, run, "decontaminate", {"problems": ["ingest"]})
    dropped = {r["problem_id"] for r in read_table(run / "decontaminate" / "matches").to_pylist()}
    assert not dropped & {o["problem_id"] for o in others}
    missed = sorted(c["problem_id"] for c in copies if c["problem_id"] not in dropped)
    # a half-size JPEG of a thin-line drawing can move the hash past the threshold (1 of MATH-V's 304)
    assert all(x.endswith("-half_jpeg") for x in missed) and len(missed) <= len(picked) // 20, missed
    assert m.kept == len(others) + len(missed)
    # the distances behind the default threshold: copies well inside it, different figures outside
    hashes = [decontaminate.perceptual_hash(p["images"][0]) for p in problems]
    closest = min(decontaminate.hash_distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :])
    assert closest > cfg.image_hash_distance
    assert len(items) == len(problems)
