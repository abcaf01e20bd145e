"""A deterministic teacher simulator for the synthetic problems (DESIGN.md, "Engines").

It writes `<think>` chains of known quality, so the filter, curate and trainer stages can be exercised
offline: correct chains end in the gold answer, wrong ones in a plausible wrong value of the same type
(a number off by a little, another choice letter), looping ones repeat a "Wait, let me re-check"
paragraph, rambling ones run past `max_tokens` and are cut (finish_reason=length). Everything follows
from (seed, problem): the same request always gives the same text. Chains grow with the problem's
difficulty and shrink with a higher repetition penalty, as the adaptive penalty intends. Tokens are
whitespace-separated words; an image counts as 64 prompt tokens. Every result says `simulated=True`.
"""

from __future__ import annotations

import random
import re
import time
from typing import Any

from pipeline.rundir import stable_hash
from teachers.engines import GenRequest, GenResult, ScriptedEngineConfig, sampling_value, split_think

_IMAGE_TOKENS = 64
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

_STEPS = (
    "First I restate what is asked: {q}",
    "The key quantities are given in the {src}; I write them down before computing anything.",
    "Let me set up the relation between the known values and the unknown.",
    "I can simplify step by step, keeping exact fractions and radicals.",
    "Checking units and signs: nothing changes the structure of the answer.",
    "Another way to see it is to estimate roughly first, which bounds the result.",
    "Now I combine the pieces carefully and carry the arithmetic through.",
    "Each intermediate value is consistent with the picture described in the problem.",
    "I should make sure the answer has the requested form ({t}).",
    "Substituting back confirms the relation holds for the value I found.",
)
_LOOP = (
    "Wait, let me re-check the computation. I recompute the main step from the start and compare it "
    "with what I had before, because a slip here would change the final value."
)


def _words(text: str) -> int:
    return len(text.split())


def _images(messages: list[dict[str, Any]]) -> list[Any]:
    import base64
    import io

    from PIL import Image

    out = []
    for m in messages:
        for part in m.get("content") if isinstance(m.get("content"), list) else []:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                out.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    return out


def _cut(text: str, n: int) -> str:
    """The first n words of text, whitespace kept as it was."""
    for i, m in enumerate(re.finditer(r"\S+", text)):
        if i == n - 1:
            return text[: m.end()]
    return text


def _prompt_tokens(messages: list[dict[str, Any]]) -> int:
    n = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            n += _words(content)
            continue
        for part in content or []:
            if part.get("type") == "text":
                n += _words(part.get("text", ""))
            else:
                n += _IMAGE_TOKENS
    return n


def wrong_answer(answer: str, answer_type: str, choices: list[str] | None, rng: random.Random) -> str:
    """A plausible wrong value of the answer's type."""
    letters = [chr(ord("A") + i) for i in range(len(choices) if choices else 5)]
    if answer_type == "choice" or (len(answer) == 1 and answer.upper() in letters):
        others = [c for c in letters if c != answer.strip().upper()] or ["A"]
        return rng.choice(others)
    nums = list(_NUMBER.finditer(answer))
    if nums:
        m = rng.choice(nums)
        delta = rng.choice([-3, -2, -1, 1, 2, 3])
        val = m.group(0)
        new = str(round(float(val) + delta / 2, 6)) if "." in val else str(int(val) + delta)
        if new == val:
            new = str(int(float(val)) + 7)
        return answer[: m.start()] + new + answer[m.end():]
    return rng.choice(["0", "1", "2", "-1"]) if answer_type == "number" else f"{answer} + 1"


class ScriptedEngine:
    def __init__(self, cfg: ScriptedEngineConfig) -> None:
        self.cfg = cfg

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        return [self._one(r) for r in requests]

    def close(self) -> None:
        pass

    def _one(self, req: GenRequest) -> GenResult:
        t0 = time.perf_counter()
        p = req.problem or {}
        if not p.get("answer") and _images(req.messages):
            return self._caption(req, t0)
        if not p.get("answer"):
            return GenResult(finish_reason="error", error="bad_input: the scripted engine needs the problem's gold answer",
                             error_kind="bad_input", simulated=True)
        seed = int(sampling_value(req.sampling, "seed", 0))
        max_tokens = int(sampling_value(req.sampling, "max_tokens", 4096))
        penalty = float(sampling_value(req.sampling, "repetition_penalty", 1.0))
        rng = random.Random(stable_hash(seed, p.get("problem_id"), p.get("question"), p["answer"]))
        text = self._completion(p, rng, penalty, max_tokens)
        finish = "stop"
        if _words(text) > max_tokens:
            text = _cut(text, max_tokens)
            finish = "length"
        if self.cfg.latency_s:
            time.sleep(self.cfg.latency_s)
        reasoning, response = split_think(text, self.cfg.think_start, self.cfg.think_end, finish)
        return GenResult(
            text=text,
            reasoning=reasoning,
            response=response,
            finish_reason=finish,
            prompt_tokens=_prompt_tokens(req.messages),
            completion_tokens=_words(text),
            latency_s=time.perf_counter() - t0,
            simulated=True,
        )

    def _caption(self, req: GenRequest, t0: float) -> GenResult:
        """Describe images from their pixels (size, dominant colour): the simulated captioner."""
        descs = []
        for i, im in enumerate(_images(req.messages)):
            w, h = im.size
            r, g, b = (int(c) for c in im.convert("RGB").resize((1, 1)).getpixel((0, 0)))
            tone = "light" if r + g + b > 600 else "dark" if r + g + b < 150 else "mid-toned"
            descs.append(f"Image {i + 1}: a {w}x{h} {tone} figure (mean colour rgb({r}, {g}, {b})).")
        text = " ".join(descs)
        if self.cfg.latency_s:
            time.sleep(self.cfg.latency_s)
        return GenResult(text=text, reasoning="", response=text, prompt_tokens=_prompt_tokens(req.messages),
                         completion_tokens=_words(text), latency_s=time.perf_counter() - t0, simulated=True)

    def _completion(self, p: dict[str, Any], rng: random.Random, penalty: float, max_tokens: int) -> str:
        c = self.cfg
        steps = list(_STEPS)
        level = max(1, int(p.get("difficulty") or 2))
        # A higher penalty discourages repeats: fewer loops and shorter chains (DRLC's intent).
        p_loop = c.p_loop / penalty**2
        target = c.tokens_per_level * level * rng.lognormvariate(0, 0.25) / penalty**1.5
        u = rng.random()
        kind = "ramble" if u < c.p_truncate else "loop" if u < c.p_truncate + p_loop else "plain"
        correct = rng.random() < c.p_correct
        answer = p["answer"] if correct else wrong_answer(p["answer"], p.get("answer_type") or "", p.get("choices"), rng)
        src = "figure" if p.get("needs_image") else "text"
        fill = {"q": (p.get("question") or "").strip(), "src": src, "t": p.get("answer_type") or "value"}
        paras: list[str] = []
        n = 0

        def step() -> str:
            # Walk a shuffled deck of steps so a healthy chain does not repeat itself back to back.
            if not steps:
                steps.extend(_STEPS)
            rng.shuffle(steps)
            return f"Step {len(paras) + 1}. " + steps.pop().format(**fill)

        while n < target:
            paras.append(step())
            n += _words(paras[-1])
        if kind == "loop":
            paras += [_LOOP] * rng.randint(6, 14)
        elif kind == "ramble":
            while n <= max_tokens:
                paras.append(step())
                n += _words(paras[-1])
        paras.append(f"So the answer is {answer}.")
        reasoning = "\n\n".join(paras)
        return f"{c.think_start}\n{reasoning}\n{c.think_end}\n\nThe final answer is $\\boxed{{{answer}}}$."
