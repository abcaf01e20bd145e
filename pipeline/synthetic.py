"""Synthetic visual math problems with exact gold answers, for the offline demo and tests.

    python -m pipeline.synthetic --n 12 --seed 0 --out /tmp/synth.jsonl   # writes JSONL + PNGs

Each problem is drawn procedurally (PIL) from a seeded RNG, so the same (seed, index) always gives the
same image bytes, question and answer. Kinds:

- right_triangle: legs labelled in the figure; hypotenuse (a number for Pythagorean triples, else
  `k\\sqrt{m}`) or area.
- triangle_angles: two angles labelled; the third angle.
- bar_chart: labelled bars; largest category (multiple choice), a sum, or max - min.
- count_shapes: circles and squares scattered; counts and differences.
- line_plot: a line through two marked lattice points; slope (fraction), intercept, or where it is
  positive (an interval).

Roughly a third of the problems state every number in the text (`needs_image=False`); the rest carry
them only in the picture. Difficulty runs 1-3.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from fractions import Fraction
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pipeline.images import encode_pil

KINDS = ("right_triangle", "triangle_angles", "bar_chart", "count_shapes", "line_plot")
W, H = 320, 240


def _font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # FreeType missing: fixed bitmap font
        return ImageFont.load_default()


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("RGB", (W, H), "white")
    return im, ImageDraw.Draw(im)


def _latex_sqrt(n: int) -> str:
    """sqrt(n) as k\\sqrt{m} with m square-free."""
    k, m = 1, n
    for f in range(int(math.isqrt(n)), 1, -1):
        if n % (f * f) == 0:
            k, m = f, n // (f * f)
            break
    if m == 1:
        return str(k)
    return f"{k}\\sqrt{{{m}}}" if k > 1 else f"\\sqrt{{{m}}}"


def _latex_frac(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"


def _right_triangle(rng: random.Random, level: int, text_only: bool) -> dict[str, Any]:
    if level == 1:
        a0, b0 = rng.choice([(3, 4), (5, 12), (8, 15), (7, 24)])
        s = rng.randint(1, 3)
        a, b = a0 * s, b0 * s
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    im, d = _canvas()
    x0, y0 = 60, 200
    sx, sy = 200 / max(a, b), 160 / max(a, b)
    p1, p2, p3 = (x0, y0), (x0 + b * sx, y0), (x0, y0 - a * sy)
    d.polygon([p1, p2, p3], outline="black", width=3)
    d.rectangle([x0, y0 - 12, x0 + 12, y0], outline="black", width=2)
    f = _font()
    d.text((x0 - 30, y0 - a * sy / 2), str(a), fill="blue", font=f)
    d.text((x0 + b * sx / 2, y0 + 8), str(b), fill="blue", font=f)
    d.text(((p2[0] + p3[0]) / 2 + 8, (p2[1] + p3[1]) / 2 - 12), "?", fill="red", font=f)
    legs = f" with legs {a} and {b}" if text_only else ""
    where = "" if text_only else " shown in the figure"
    if level == 3:
        q = f"What is the area of the right triangle{legs}{where}?"
        ans = Fraction(a * b, 2)
        return {"question": q, "answer": _latex_frac(ans), "answer_type": "number" if ans.denominator == 1 else "expression", "image": im}
    q = f"Find the length of the hypotenuse (marked ?) of the right triangle{legs}{where}."
    hyp = a * a + b * b
    ans = _latex_sqrt(hyp)
    return {"question": q, "answer": ans, "answer_type": "number" if ans.isdigit() else "expression", "image": im}


def _triangle_angles(rng: random.Random, level: int, text_only: bool) -> dict[str, Any]:
    a = rng.randint(25, 80)
    b = rng.randint(25, 150 - a)
    im, d = _canvas()
    pts = [(40, 200), (280, 200), (rng.randint(110, 210), 40)]
    d.polygon(pts, outline="black", width=3)
    f = _font()
    d.text((pts[0][0] + 18, pts[0][1] - 24), f"{a}°", fill="blue", font=f)
    d.text((pts[1][0] - 48, pts[1][1] - 24), f"{b}°", fill="blue", font=f)
    d.text((pts[2][0] - 6, pts[2][1] + 18), "x", fill="red", font=f)
    given = f" Two of its angles are {a}° and {b}°." if text_only else ""
    if level == 1:
        q = f"In the triangle{'' if text_only else ' in the figure'}, find the angle x in degrees.{given}"
        ans = str(180 - a - b)
    else:
        q = f"In the triangle{'' if text_only else ' in the figure'}, find the exterior angle at the vertex marked x, in degrees.{given}"
        ans = str(a + b)
    return {"question": q, "answer": ans, "answer_type": "number", "image": im}


def _bar_chart(rng: random.Random, level: int, text_only: bool) -> dict[str, Any]:
    names = rng.sample(["apples", "pears", "plums", "figs", "kiwis", "limes"], k=2 + level)
    vals = rng.sample(range(2, 20), k=len(names))
    im, d = _canvas()
    f = _font(12)
    bw = 240 // len(names)
    for i, (n, v) in enumerate(zip(names, vals, strict=True)):
        x = 40 + i * bw
        top = 200 - v * 8
        d.rectangle([x + 6, top, x + bw - 6, 200], fill=(70, 130, 180), outline="black")
        d.text((x + 8, top - 16), str(v), fill="black", font=f)
        d.text((x + 6, 206), n, fill="black", font=f)
    d.line([(36, 200), (300, 200)], fill="black", width=2)
    table = (" The values are " + ", ".join(f"{n}: {v}" for n, v in zip(names, vals, strict=True)) + ".") if text_only else ""
    if level == 1:
        letters = "ABCDE"[: len(names)]
        opts = "\n".join(f"({L}) {n}" for L, n in zip(letters, names, strict=True))
        best = letters[vals.index(max(vals))]
        q = f"Which fruit has the largest count in the bar chart?{table}\nChoices:\n{opts}"
        return {"question": q, "answer": best, "answer_type": "choice", "choices": list(names), "image": im}
    if level == 2:
        i, j = rng.sample(range(len(names)), 2)
        q = f"What is the total count of {names[i]} and {names[j]} in the bar chart?{table}"
        return {"question": q, "answer": str(vals[i] + vals[j]), "answer_type": "number", "image": im}
    q = f"By how much does the largest bar exceed the smallest bar in the chart?{table}"
    return {"question": q, "answer": str(max(vals) - min(vals)), "answer_type": "number", "image": im}


def _count_shapes(rng: random.Random, level: int, text_only: bool) -> dict[str, Any]:
    nc, ns = rng.randint(1, 4 + 2 * level), rng.randint(1, 3 + 2 * level)
    im, d = _canvas()
    placed: list[tuple[int, int]] = []
    for kind in ["c"] * nc + ["s"] * ns:
        for _ in range(200):
            x, y = rng.randint(20, W - 40), rng.randint(20, H - 40)
            if all(abs(x - px) > 30 or abs(y - py) > 30 for px, py in placed):
                break
        placed.append((x, y))
        if kind == "c":
            d.ellipse([x, y, x + 22, y + 22], fill=(220, 60, 60), outline="black")
        else:
            d.rectangle([x, y, x + 22, y + 22], fill=(60, 160, 60), outline="black")
    told = f" There are {nc} circles and {ns} squares." if text_only else ""
    if level == 1:
        q, ans = f"How many circles are in the picture?{told}", nc
    elif level == 2:
        q, ans = f"How many shapes (circles and squares) are in the picture in total?{told}", nc + ns
    else:
        q, ans = f"How many more circles than squares are in the picture? (Give a negative number if fewer.){told}", nc - ns
    return {"question": q, "answer": str(ans), "answer_type": "number", "image": im}


def _line_plot(rng: random.Random, level: int, text_only: bool) -> dict[str, Any]:
    while True:
        x1, x2 = rng.randint(-4, 0), rng.randint(1, 4)
        y1, y2 = rng.randint(-4, 4), rng.randint(-4, 4)
        if y1 != y2:
            break
    slope = Fraction(y2 - y1, x2 - x1)
    icpt = y1 - slope * x1
    im, d = _canvas()
    cx, cy, u = W // 2, H // 2, 22

    def px(x: float, y: float) -> tuple[float, float]:
        return (cx + x * u, cy - y * u)

    for g in range(-6, 7):
        d.line([px(g, -5), px(g, 5)], fill=(225, 225, 225))
        d.line([px(-6, g), px(6, g)], fill=(225, 225, 225))
    d.line([px(-6, 0), px(6, 0)], fill="black", width=2)
    d.line([px(0, -5), px(0, 5)], fill="black", width=2)
    d.line([px(-6, y1 + slope * (-6 - x1)), px(6, y1 + slope * (6 - x1))], fill=(40, 80, 200), width=2)
    f = _font(11)
    for x, y in ((x1, y1), (x2, y2)):
        a, b = px(x, y)
        d.ellipse([a - 4, b - 4, a + 4, b + 4], fill="red")
        d.text((a + 6, b - 14), f"({x},{y})", fill="red", font=f)
    told = f" The line passes through ({x1}, {y1}) and ({x2}, {y2})." if text_only else ""
    if level == 1:
        q, ans, t = f"What is the slope of the line shown in the graph?{told}", _latex_frac(slope), "number"
        t = "number" if slope.denominator == 1 else "expression"
    elif level == 2:
        q, ans = f"At what y-value does the line in the graph cross the y-axis?{told}", _latex_frac(icpt)
        t = "number" if icpt.denominator == 1 else "expression"
    else:
        root = _latex_frac(-icpt / slope)
        ans = f"({root}, \\infty)" if slope > 0 else f"(-\\infty, {root})"
        q = f"For which values of x does the line in the graph lie strictly above the x-axis? Give an interval.{told}"
        t = "interval"
    return {"question": q, "answer": ans, "answer_type": t, "image": im}


_MAKERS = {
    "right_triangle": _right_triangle,
    "triangle_angles": _triangle_angles,
    "bar_chart": _bar_chart,
    "count_shapes": _count_shapes,
    "line_plot": _line_plot,
}
SUBJECTS = {
    "right_triangle": "metric geometry",
    "triangle_angles": "metric geometry",
    "bar_chart": "statistics",
    "count_shapes": "counting",
    "line_plot": "analytic geometry",
}


def make_problem(seed: int, index: int, kinds: tuple[str, ...] = KINDS, levels: tuple[int, ...] = (1, 2, 3)) -> dict[str, Any]:
    """Problem number `index` of the set drawn with `seed`; the same arguments give the same problem."""
    rng = random.Random(f"r1v-synthetic/{seed}/{index}")
    kind = kinds[index % len(kinds)]
    level = rng.choice(list(levels))
    text_only = rng.random() < 0.33
    p = _MAKERS[kind](rng, level, text_only)
    image = encode_pil(p.pop("image"), "png")
    return {
        "id": f"synthetic-{seed}-{index}",
        "question": p["question"],
        "answer": p["answer"],
        "answer_type": p["answer_type"],
        "choices": p.get("choices"),
        "images": [image],
        "subject": SUBJECTS[kind],
        "difficulty": level,
        "needs_image": not text_only,
        "kind": kind,
    }


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="JSONL file; images go beside it")
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    img_dir = args.out.parent / "images"
    img_dir.mkdir(exist_ok=True)
    with open(args.out, "w") as f:
        for i in range(args.n):
            p = make_problem(args.seed, i)
            img = p.pop("images")[0]
            name = f"{p['id']}.png"
            (img_dir / name).write_bytes(img["bytes"])
            f.write(json.dumps({**p, "image": f"images/{name}"}) + "\n")


if __name__ == "__main__":
    _main()
