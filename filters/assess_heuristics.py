"""Model-free QDAM/VTIA scorers: pixel statistics for images, cue counts for text.

All sub-scores lie in [0, 1]; higher means "asks more of the model" (a clear image the question depends
on, a long and hard question, text and figure that must be read together), which is what lowers the
DRLC repetition penalty. `score_problem` runs per row (inside Ray actors or in-process);
`combine_scores` needs the dataset's top difficulty level and runs in the driver.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np

# Words and tags that say the question refers to its figure.
_FIGURE_CUES = re.compile(
    r"<image\s*\d*>|\bfigures?\b|\bfig\.|\bpictures?\b|\bdiagrams?\b|\bgraphs?\b|\bshown\b|\bimages?\b"
    r"|\bbelow\b|\bplot\b|\bcharts?\b|\btable\b|\bdrawn\b|\bdepicted\b|\billustrat\w*|\bgrid\b|\bas seen\b"
    r"|\bin the (?:left|right|upper|lower|following)\b",
    re.IGNORECASE,
)
_DIFFICULTY_CUES = re.compile(
    r"\bprove\b|\bshow that\b|\bmaximum\b|\bminimum\b|\blargest\b|\bsmallest\b|\bat least\b|\bat most\b"
    r"|\bhow many\b|\bprobability\b|\ball possible\b|\bintegers?\b|\bsum of all\b|\bexpected\b|\bdistinct\b"
    r"|\bremainder\b|\bgreatest\b|\bleast\b",
    re.IGNORECASE,
)
_CONSTRAINT_CUES = re.compile(
    r"\bif\b|\bsuch that\b|\bgiven\b|\beach\b|\bevery\b|\bexactly\b|\bonly\b|\bnot\b|\bwhere\b|\bsatisf\w*",
    re.IGNORECASE,
)
_OPERATORS = re.compile(
    r"[+\-*/^=<>≤≥×÷]|\\(?:frac|sqrt|sum|int|cdot|times|le|ge|leq|geq|log|ln|sin|cos|tan|binom|prod|lim)\b"
)
_NUMBERS = re.compile(r"(?<![a-zA-Z])\d+(?:\.\d+)?")
_WHICH_PICTURE = re.compile(
    r"\bwhich (?:of the )?(?:pictures?|figures?|images?|shapes?|ones?|diagrams?|options?)\b", re.IGNORECASE
)
_JUNK = re.compile(r"[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f]")


def _cap(x: float) -> float:
    return max(0.0, min(1.0, float(x)))


def image_stats(record: dict[str, Any], max_side: int) -> dict[str, float]:
    """Sharpness (variance of the 4-neighbour Laplacian), RMS contrast and size of one stored image.

    Grey levels are in [0, 1] and the image is first downscaled to `max_side`, so sharpness does not
    simply grow with resolution. A blurred copy of a figure scores far lower (edges spread out).
    """
    from PIL import Image

    with Image.open(io.BytesIO(record["bytes"])) as im:
        width, height = im.size
        grey = im.convert("L")
    grey.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    a = np.asarray(grey, dtype=np.float32) / 255.0
    if a.shape[0] < 3 or a.shape[1] < 3:
        lap_var = 0.0
    else:
        lap = a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4.0 * a[1:-1, 1:-1]
        lap_var = float(lap.var())
    return {"sharpness": lap_var, "contrast": float(a.std()), "width": width, "height": height}


def text_features(question: str) -> dict[str, float]:
    """Counts the text scorers use; exposed for tests and the report."""
    q = question or ""
    return {
        "words": len(q.split()),
        "figure_cues": len(_FIGURE_CUES.findall(q)),
        "difficulty_cues": len(_DIFFICULTY_CUES.findall(q)),
        "constraint_cues": len(_CONSTRAINT_CUES.findall(q)),
        "operators": len(_OPERATORS.findall(q)),
        "numbers": len(_NUMBERS.findall(_FIGURE_CUES.sub(" ", q))),  # "<image1>" is not data
        "junk": len(_JUNK.findall(q)) / max(1, len(q)),
        "which_picture": 1.0 if _WHICH_PICTURE.search(q) else 0.0,
    }


def score_problem(row: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """Raw sub-scores of one problem row; an unreadable image yields {'error': ...} instead of raising."""
    images = row.get("images") or []
    f = text_features(row.get("question") or "")
    out: dict[str, Any] = {"problem_id": row.get("problem_id"), "error": None}
    sharp, contrast, res = [], [], []
    for k, rec in enumerate(images):
        try:
            st = image_stats(rec, cfg.image_max_side)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises these three for bad data
            return out | {"error": f"image {k}: not a readable image ({e})", "reason": "image_unreadable"}
        sharp.append(st["sharpness"])
        contrast.append(st["contrast"])
        res.append(_cap(((st["width"] * st["height"]) ** 0.5) / cfg.resolution_target))
    n_img = len(images)
    if n_img:
        sharp_raw = float(np.mean(sharp))
        contrast_raw = float(np.mean(contrast))
        sharp_score = sharp_raw / (sharp_raw + cfg.sharpness_half)
        clarity = 0.5 * sharp_score + 0.3 * _cap(2.0 * contrast_raw) + 0.2 * float(np.mean(res))
        cue = _cap(f["figure_cues"] / 2.0)
        text_data = _cap(f["numbers"] / 4.0)
        # An attached image counts a little by itself; cues and data missing from the text count more.
        necessity = 0.25 + 0.45 * cue + 0.3 * (1.0 - text_data)
        flag = row.get("needs_image")
        if flag is not None:
            necessity = 0.5 * necessity + 0.5 * float(bool(flag))
        visual_choice = f["which_picture"] if row.get("choices") else 0.0
        multi = _cap((n_img - 1) / 2.0)
        integration = necessity * (0.4 + 0.3 * text_data + 0.3 * max(visual_choice, multi))
    else:
        sharp_raw = contrast_raw = clarity = necessity = integration = 0.0
    out.update(
        {
            "n_images": n_img,
            "qa_sharpness": sharp_raw,
            "qa_contrast": contrast_raw,
            "qa_clarity": _cap(clarity),
            "qa_image_necessity": _cap(necessity),
            "qa_integration": _cap(integration),
            "qa_text_quality": _cap(min(1.0, f["words"] / 30.0) * (1.0 - 10.0 * f["junk"])),
            "difficulty_cue": _cap(f["difficulty_cues"] / 3.0),
            "qa_reasoning_demand": (
                _cap(f["operators"] / 6.0) + _cap(f["numbers"] / 6.0) + _cap(f["constraint_cues"] / 3.0)
            )
            / 3.0,
        }
    )
    return out


def combine_scores(raw: dict[str, Any], level: float | None, level_scale: float) -> dict[str, float]:
    """S_v, S_t, S_I (before min-max normalisation) and the sub-scores, from one row's raw scores.

    A stated difficulty level (ingest's `difficulty`, 1..max) dominates the difficulty sub-score; text
    cues fill in when it is missing. Without images S_v and S_I are 0: nothing visual to read.
    """
    if raw.get("error"):
        return {}
    if level is not None and level_scale > 0:
        difficulty = 0.7 * _cap(level / level_scale) + 0.3 * raw["difficulty_cue"]
    else:
        difficulty = raw["difficulty_cue"]
    out = {name: float(raw[name]) for name in raw if name.startswith("qa_")}
    out["qa_difficulty"] = difficulty
    has_img = raw["n_images"] > 0
    out["s_v"] = 0.5 * raw["qa_clarity"] + 0.5 * raw["qa_image_necessity"] if has_img else 0.0
    out["s_t"] = (raw["qa_text_quality"] + difficulty + raw["qa_reasoning_demand"]) / 3.0
    out["s_i"] = raw["qa_integration"] if has_img else 0.0
    return out
