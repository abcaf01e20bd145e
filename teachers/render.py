"""Teacher prompts: problem rows → OpenAI-style chat messages, and the cache-friendly prompt record.

Multimodal teachers get each image as a data-URI `image_url` part before the question; text-only
teachers (`engine.text_only`) get the caption stage's `image_description` in the text instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import Field

from pipeline.config import StageConfig
from pipeline.images import data_uri

PROMPTS_DIR = Path(__file__).parent / "prompts"


class RenderError(ValueError):
    """A problem row that cannot be turned into a prompt (counted as `bad_input`)."""


class PromptConfig(StageConfig):
    system_prompt_file: str | None = Field(
        None,
        description="file holding the system prompt (relative paths: the working directory, then "
        "teachers/prompts/); none: no system turn, as R1 recommends",
    )
    instruction: str = Field(
        "Please reason step by step, and put your final answer within \\boxed{}.",
        description="text appended to every question",
    )
    description_header: str = Field("Image description:", description="precedes the caption for text-only teachers")


def read_prompt_file(name: str | None) -> str | None:
    if not name:
        return None
    p = Path(name)
    if not p.exists():
        p = PROMPTS_DIR / name
    if not p.exists():
        raise FileNotFoundError(f"prompt file {name!r} not found (looked in the working directory and {PROMPTS_DIR})")
    return p.read_text().strip()


def question_text(problem: dict[str, Any]) -> str:
    text = (problem.get("question") or "").strip()
    choices = problem.get("choices")
    if choices:
        lines = [f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices)]
        text += "\n\nChoices:\n" + "\n".join(lines)
    return text


def render_messages(problem: dict[str, Any], cfg: PromptConfig, text_only: bool, system: str | None = None) -> list[dict]:
    """Chat messages for one problem; raises RenderError naming the problem when it cannot."""
    pid = problem.get("problem_id", "?")
    if not (problem.get("question") or "").strip():
        raise RenderError(f"problem {pid}: empty question")
    images = problem.get("images") or []
    body = question_text(problem)
    if cfg.instruction:
        body += "\n\n" + cfg.instruction
    msgs: list[dict] = [{"role": "system", "content": system}] if system else []
    if text_only or not images:
        desc = problem.get("image_description")
        if images and desc:
            body = f"{cfg.description_header} {desc.strip()}\n\n{body}"
        elif images and problem.get("needs_image") is not False:
            raise RenderError(
                f"problem {pid}: a text-only teacher needs an image_description (add the caption stage)"
            )
        msgs.append({"role": "user", "content": body})
        return msgs
    parts: list[dict] = []
    for i, im in enumerate(images):
        if not im or not im.get("bytes"):
            raise RenderError(f"problem {pid}: image {i} has no bytes")
        parts.append({"type": "image_url", "image_url": {"url": data_uri(im)}})
    parts.append({"type": "text", "text": body})
    msgs.append({"role": "user", "content": parts})
    return msgs


def prompt_record(messages: list[dict]) -> str:
    """The rendered prompt as compact JSON, each data-URI replaced by `image:<sha256 prefix>`."""

    def shrink(m: dict) -> dict:
        c = m["content"]
        if isinstance(c, str):
            return m
        out = []
        for part in c:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                out.append({"type": "image_url", "image_url": {"url": "image:" + hashlib.sha256(url.encode()).hexdigest()[:16]}})
            else:
                out.append(part)
        return {**m, "content": out}

    return json.dumps([shrink(m) for m in messages], ensure_ascii=False, separators=(",", ":"))
