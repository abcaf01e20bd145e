"""The optional QDAM/VTIA judge: a model behind any teacher engine scores problems by a rubric.

The rubric (filters/prompts/judge_rubric.md by default) asks for one JSON object with six 0-10 scores.
Replies are validated strictly (`parse_judge_reply`); a malformed one is re-asked up to
`max_retries` times with the validation error quoted back, at a slightly higher temperature and a new
seed. A problem that never gets a valid reply falls back to heuristic scores or is quarantined
(`judge.on_failure`), and is counted either way.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

PROMPTS = Path(__file__).resolve().parent / "prompts"
DEFAULT_RUBRIC = PROMPTS / "judge_rubric.md"

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


class JudgeFormatError(ValueError):
    """A judge reply that is not the JSON object the rubric asks for."""


class JudgeScores(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image_clarity: float | None = Field(None, ge=0, le=10)
    image_necessity: float | None = Field(None, ge=0, le=10)
    question_quality: float = Field(ge=0, le=10)
    difficulty: float = Field(ge=0, le=10)
    reasoning_demand: float = Field(ge=0, le=10)
    integration: float | None = Field(None, ge=0, le=10)
    rationale: str = ""

    def as_subscores(self) -> dict[str, float]:
        """Scores on [0, 1] under the heuristic sub-score names, plus S_v, S_t, S_I (pre-normalisation)."""
        clar = (self.image_clarity or 0.0) / 10.0
        nec = (self.image_necessity or 0.0) / 10.0
        integ = (self.integration or 0.0) / 10.0
        out = {
            "qa_clarity": clar,
            "qa_image_necessity": nec,
            "qa_text_quality": self.question_quality / 10.0,
            "qa_difficulty": self.difficulty / 10.0,
            "qa_reasoning_demand": self.reasoning_demand / 10.0,
            "qa_integration": integ,
        }
        out["s_v"] = (clar + nec) / 2.0
        out["s_t"] = (out["qa_text_quality"] + out["qa_difficulty"] + out["qa_reasoning_demand"]) / 3.0
        out["s_i"] = integ
        return out


def parse_judge_reply(text: str | None) -> JudgeScores:
    """The scores in a judge reply; raises JudgeFormatError saying exactly what is wrong.

    Accepts the object bare, inside a ```json fence, or after a reasoning model's `</think>`; anything
    else (no object, several candidates that fail, missing or out-of-range keys) is an error.
    """
    if not text or not text.strip():
        raise JudgeFormatError("empty reply")
    body = text.split("</think>")[-1]
    fenced = _FENCE.findall(body)
    candidates = fenced or [body]
    last_err = "no JSON object found"
    for cand in candidates:
        start, end = cand.find("{"), cand.rfind("}")
        if start < 0 or end <= start:
            continue
        try:
            obj = json.loads(cand[start : end + 1])
        except json.JSONDecodeError as e:
            last_err = f"invalid JSON ({e.msg} at char {e.pos})"
            continue
        if not isinstance(obj, dict):
            last_err = "the JSON value is not an object"
            continue
        try:
            return JudgeScores.model_validate(obj)
        except ValidationError as e:
            errs = "; ".join(f"{'.'.join(str(p) for p in x['loc'])}: {x['msg']}" for x in e.errors())
            last_err = f"wrong fields ({errs})"
    raise JudgeFormatError(last_err)


@dataclass
class JudgeResult:
    scores: JudgeScores | None
    attempts: int
    error: str | None = None
    raw: str | None = None
    requests: int = 0  # attempts that went to the engine (the rest came from the cache)


def judge_messages(problem: dict[str, Any], rubric: str, text_only: bool = False) -> list[dict[str, Any]]:
    """System rubric + a user turn with the problem's images (data URIs) and text (question, choices).

    A text-only judge gets no image parts (assess runs before caption, so there is no description yet);
    it is told how many images it cannot see, so it can still rate necessity and integration.
    """
    from filters.curate import problem_text
    from pipeline.images import data_uri

    images = problem.get("images") or []
    text = problem_text(problem)
    if text_only:
        if images:
            text = f"[This problem comes with {len(images)} image(s) that you cannot see.]\n\n{text}"
        return [{"role": "system", "content": rubric}, {"role": "user", "content": text}]
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_uri(im)}} for im in images]
    parts.append({"type": "text", "text": text})
    return [{"role": "system", "content": rubric}, {"role": "user", "content": parts}]


def load_rubric(path: str | None) -> str:
    p = Path(path) if path else DEFAULT_RUBRIC
    if path and not p.exists() and (PROMPTS / path).is_file():
        p = PROMPTS / path
    if not p.exists():
        raise FileNotFoundError(f"assess.judge.rubric_file: {p} not found")
    return p.read_text()


def load_engine(cfg: Any) -> Any:
    from teachers.engines import make_engine

    return make_engine(cfg.engine)


def _cached_generate(engine: Any, reqs: list, cache: Any) -> tuple[list, list[bool]]:
    """engine.generate for the requests the cache lacks; (results in order, came-from-engine flags).

    Keyed like generation (teachers.cache: engine identity, rendered messages, sampling), so the same
    question to the same judge is never paid twice; errors are not stored."""
    from teachers.cache import cache_key
    from teachers.engines import GenResult

    if cache is None:
        return engine.generate(reqs), [True] * len(reqs)
    identity = engine.cfg.cache_identity()
    keys = [cache_key(identity, json.dumps(r.messages, sort_keys=True), r.sampling) for r in reqs]
    out: list = [None] * len(reqs)
    for j, k in enumerate(keys):
        entry = cache.get(k)
        if entry is not None:
            out[j] = GenResult(**{f: entry.get(f) for f in ("text", "reasoning", "response", "finish_reason")})
    miss = [j for j, r in enumerate(out) if r is None]
    if miss:
        for j, res in zip(miss, engine.generate([reqs[j] for j in miss]), strict=True):
            out[j] = res
            if res.finish_reason != "error":
                cache.put(keys[j], {"text": res.text, "reasoning": res.reasoning, "response": res.response,
                                    "finish_reason": res.finish_reason})
    fresh = set(miss)
    return out, [j in fresh for j in range(len(reqs))]


def judge_problems(engine: Any, problems: list[dict[str, Any]], cfg: Any, seed: int = 0,
                   cache: Any = None) -> list[JudgeResult]:
    """Score `problems` (rows of the problems table) with `engine`; one JudgeResult per row, in order.

    All pending problems go to the engine in one batch per attempt, so batch engines stay efficient.
    With `cache` (a teachers.cache.GenerationCache) replies already paid for are read back instead.
    """
    from teachers.engines import GenRequest

    rubric = load_rubric(cfg.rubric_file)
    text_only = bool(getattr(getattr(engine, "cfg", None), "text_only", False))
    convs = [judge_messages(p, rubric, text_only) for p in problems]
    results: list[JudgeResult | None] = [None] * len(problems)
    n_req = [0] * len(problems)
    last: dict[int, tuple[str | None, str]] = {}
    pending = list(range(len(problems)))
    for attempt in range(cfg.max_retries + 1):
        if not pending:
            break
        sampling = {
            "temperature": cfg.temperature + 0.3 * attempt,
            "top_p": 1.0,
            "max_tokens": cfg.max_tokens,
            "seed": seed + 1009 * attempt,
            "repetition_penalty": 1.0,
        }
        reqs = [
            GenRequest(messages=convs[i], sampling=dict(sampling), problem=problems[i], request_id=f"judge-{i}-{attempt}")
            for i in pending
        ]
        outs, fresh = _cached_generate(engine, reqs, cache)
        still = []
        for i, out, paid in zip(pending, outs, fresh, strict=True):
            n_req[i] += int(paid)
            text = out.response if out.response else out.text
            if out.finish_reason == "error":
                last[i] = (text, f"engine error: {out.error}")
                still.append(i)
                continue
            try:
                scores = parse_judge_reply(out.text or text)
            except JudgeFormatError as e:
                last[i] = (text, str(e))
                # Show the model its reply and the exact problem, so a retry can fix the format.
                convs[i] = convs[i] + [
                    {"role": "assistant", "content": text or ""},
                    {
                        "role": "user",
                        "content": f"That reply was not usable: {e}. Reply with only the JSON object the rubric asks for.",
                    },
                ]
                still.append(i)
                continue
            results[i] = JudgeResult(scores=scores, attempts=attempt + 1, raw=text, requests=n_req[i])
        pending = still
    for i in pending:
        text, err = last[i]
        results[i] = JudgeResult(scores=None, attempts=cfg.max_retries + 1, error=err, raw=text, requests=n_req[i])
        log.warning("judge: problem %s: no valid reply after %d attempts: %s",
                    problems[i].get("problem_id"), cfg.max_retries + 1, err)
    return [r for r in results if r is not None]
