"""The student's chat template: the reasoning LLM's own, taught to take images; prompts and trained spans.

    from trainers.chat import student_template, student_prompt, conversation
    template, how = student_template(llm_tokenizer, "<image>")   # assembly: the LLM's template, wrapped
    text = student_prompt(problem, processor)   # the prompt the student sees for a problem (SFT, evaluate, RL)
    text, turns, thinks = conversation(render, messages)   # an SFT row's text and its trained character spans

The template (`assemble.chat_template`):
- `auto` (default): the LLM tokenizer's own chat template (what its `apply_chat_template` uses), with a
  short prelude that rewrites each message's list content (OpenAI / HF parts) into the form that template
  reads: one image placeholder per image part, put where the template puts the message's content. A
  template that reads `message['content']` as a string gets the text with the placeholders in it; one
  that iterates content parts gets a text part per image. The prelude is decided by rendering probes
  through the LLM's template, never by parsing it. A tokenizer without a template falls back to ChatML
  with R1-style `<think>` (trainers/templates/chatml_think.jinja).
- `llm`: the same, but a tokenizer without a template is an error;
- a template name in trainers/templates/ (without .jinja) or a path to a `.jinja` file: that template.

Trained spans (`conversation`): the prompt is rendered with the generation prompt (exactly what the
student gets at inference) and the conversation with the assistant turn; where the second extends the
first and still holds the assistant's text, the difference is the trained part. Templates that rewrite
the assistant turn (DeepSeek-R1-Distill's drops everything up to `</think>` from assistant content; newer
ones pre-fill `<think>\\n` in the generation prompt) are handled by appending the assistant text to the
prompt instead, with the end-of-turn text the template writes after an assistant message (found by
rendering a probe turn) and without the part of it the generation prompt already holds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
IMAGE_PLACEHOLDER = "<image>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
FALLBACK = "chatml_think"
POLICIES = ("auto", "llm")
# A probe that no template writes by itself and no tokenizer splits into special tokens.
_PROBE = "r1vprobe7q"

# Jinja run before the LLM's template; `@@IMAGE@@` is the processor's image token. Whitespace-trimmed
# so it writes nothing. `dict(m, content=...)` keeps a message's other keys (tool calls, names).
_PRELUDE_STRING = (
    "{#- student template: the LLM's own chat template below; each image part becomes the image placeholder "
    "where the template puts the message's content -#}\n"
    "{%- set r1v = namespace(messages=[], text='') -%}\n"
    "{%- for m in messages -%}\n"
    "{%- if m['content'] is string or m['content'] is none -%}\n"
    "{%- set r1v.messages = r1v.messages + [m] -%}\n"
    "{%- else -%}\n"
    "{%- set r1v.text = '' -%}\n"
    "{%- for part in m['content'] -%}\n"
    "{%- if part['type'] in ('image', 'image_url') -%}{%- set r1v.text = r1v.text + '@@IMAGE@@' -%}\n"
    "{%- elif part['type'] == 'text' -%}{%- set r1v.text = r1v.text + part['text'] -%}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- set r1v.messages = r1v.messages + [dict(m, content=r1v.text)] -%}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- set messages = r1v.messages %}"
)
_PRELUDE_PARTS = (
    "{#- student template: the LLM's own chat template below (it reads content parts); each image part "
    "becomes a text part holding the image placeholder -#}\n"
    "{%- set r1v = namespace(messages=[], parts=[]) -%}\n"
    "{%- for m in messages -%}\n"
    "{%- if m['content'] is none -%}\n"
    "{%- set r1v.messages = r1v.messages + [m] -%}\n"
    "{%- elif m['content'] is string -%}\n"
    "{%- set r1v.messages = r1v.messages + [dict(m, content=[{'type': 'text', 'text': m['content']}])] -%}\n"
    "{%- else -%}\n"
    "{%- set r1v.parts = [] -%}\n"
    "{%- for part in m['content'] -%}\n"
    "{%- if part['type'] in ('image', 'image_url') -%}"
    "{%- set r1v.parts = r1v.parts + [{'type': 'text', 'text': '@@IMAGE@@'}] -%}\n"
    "{%- else -%}{%- set r1v.parts = r1v.parts + [part] -%}{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- set r1v.messages = r1v.messages + [dict(m, content=r1v.parts)] -%}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- set messages = r1v.messages %}"
)
PRELUDES = {"string": _PRELUDE_STRING, "parts": _PRELUDE_PARTS}


class TemplateError(ValueError):
    """A chat template that cannot serve the student; the message says which template and why."""


# ------------------------------------------------------------------------------------------ template


def read_template(name: str, image_token: str) -> str:
    """A template file: a name in trainers/templates/ (without .jinja) or a path to a .jinja file."""
    path = Path(name) if name.endswith(".jinja") else TEMPLATES / f"{name}.jinja"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))
        raise FileNotFoundError(f"chat template {name!r}: no {path} (known: {known}, or a path to a .jinja file)")
    return path.read_text().replace("@@IMAGE@@", image_token)


def own_template(tokenizer: Any) -> str | None:
    """The tokenizer's own chat template (its default one when it has several), or None."""
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("default") or next(iter(tpl.values()), None)
    return tpl or None


def llm_template_text(llm_dir: str | Path | None) -> str | None:
    """The chat template saved with an LLM checkpoint, read from its files (no tokenizer load): the
    fingerprint of `auto` assembly. chat_template.jinja, chat_template.json, then tokenizer_config.json."""
    if not llm_dir:
        return None
    d = Path(llm_dir)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        p = d / name
        if p.is_file():
            try:
                tpl = json.loads(p.read_text()).get("chat_template")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(tpl, list):  # named templates: [{"name": ..., "template": ...}]
                tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
            if tpl:
                return tpl
    return None


def _render(tokenizer: Any, template: str, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def content_mode(tokenizer: Any, template: str) -> str:
    """How a template reads message content: `string` (message['content'] as text) or `parts` (it
    iterates [{'type': 'text', 'text': ...}]); found by rendering a probe both ways."""
    from jinja2 import TemplateError as JinjaError

    failures = []
    for mode, content in (("string", _PROBE), ("parts", [{"type": "text", "text": _PROBE}])):
        for msgs in ([{"role": "user", "content": content}],
                     [{"role": "system", "content": content}, {"role": "user", "content": content}]):
            try:
                out = _render(tokenizer, template, msgs, True)
            except (JinjaError, TypeError, ValueError, KeyError, IndexError) as e:
                failures.append(f"{mode}: {type(e).__name__}: {e}")
                continue
            if _PROBE in out:
                return mode
    raise TemplateError("the LLM's chat template renders neither string nor text-part content of a user turn "
                        f"({'; '.join(failures) or 'the text never appears in its output'}); set "
                        "assemble.chat_template to a template file")


def student_template(tokenizer: Any, image_token: str, policy: str = "auto") -> tuple[str, str]:
    """(template, provenance) for the student: the LLM's own template made to take images (see module doc)."""
    if policy not in POLICIES:
        return read_template(policy, image_token), f"file:{policy}"
    own = own_template(tokenizer)
    if own is None:
        if policy == "llm":
            raise TemplateError("assemble.chat_template=llm but the LLM's tokenizer has no chat template")
        log.info("the LLM's tokenizer has no chat template: the student uses ChatML (%s)", FALLBACK)
        return read_template(FALLBACK, image_token), f"fallback:{FALLBACK}"
    mode = content_mode(tokenizer, own)
    return PRELUDES[mode].replace("@@IMAGE@@", image_token) + own, f"llm:{mode}"


def template_fingerprint(policy: str, llm_dir: str | Path | None, tiny_template: str | None = None) -> str | None:
    """The content hash of what decides the student's template: the template file, or the LLM's own
    template (`tiny_template` for tiny_random LLMs built in the step) with the preludes."""
    from pipeline.rundir import stable_hash

    if policy not in POLICIES:
        path = Path(policy) if policy.endswith(".jinja") else TEMPLATES / f"{policy}.jinja"
        return stable_hash(path.read_bytes()) if path.is_file() else None
    own = tiny_template if tiny_template is not None else llm_template_text(llm_dir)
    fallback = TEMPLATES / f"{FALLBACK}.jinja"
    return stable_hash(policy, own, PRELUDES, fallback.read_bytes() if own is None and fallback.is_file() else None)


# ------------------------------------------------------------------------------------------ prompts


def prompt_messages(problem: dict, system: str | None = None) -> list[dict]:
    """The conversation before the student's answer, as SFT rows carry it: the system prompt (the curate
    default when None; none when "") and the user turn (one `<image>` line per image, then the text)."""
    from filters.curate import system_prompt, user_turn

    system = system_prompt() if system is None else system
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": user_turn(problem)}]


def student_prompt(problem: dict, processor: Any, system: str | None = None) -> str:
    """The text the student is prompted with for `problem`, through its own chat template with the
    generation prompt: the SFT rows' text before the assistant turn, with each image as the processor's
    image token (so `processor(text=prompt, images=...)` expands it). Evaluate and RL prompt with this."""
    text = processor.apply_chat_template(prompt_messages(problem, system), tokenize=False, add_generation_prompt=True)
    token = getattr(processor, "image_token", None) or IMAGE_PLACEHOLDER
    return text.replace(IMAGE_PLACEHOLDER, token) if token != IMAGE_PLACEHOLDER else text


# ------------------------------------------------------------------------------------ trained spans

Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text


def _strip_prefill(content: str, prefill: str) -> str:
    """The assistant text after what the generation prompt pre-filled (e.g. `<think>\\n`)."""
    p = prefill.strip()
    if not p:
        return content
    if content.startswith(prefill):
        return content[len(prefill):]
    body = content.lstrip()
    if body.startswith(p):
        rest = body[len(p):]
        return rest[1:] if prefill.endswith("\n") and rest.startswith("\n") else rest
    return content


def _final_turn(render: Render, messages: list[dict], k: int) -> tuple[str, int, int, bool]:
    """(text, trained start, trained end, think already open) for the assistant turn k, the last message."""
    prompt = render(messages[:k], True)
    content = messages[k]["content"]
    full = render(messages[: k + 1], False)
    if full.startswith(prompt) and content.strip() and content.strip() in full[len(prompt):]:
        # the template writes the turn as given: train on exactly what it renders after the prompt
        # (the newline after the end-of-turn token is never generated: no loss on it)
        return full, len(prompt), len(full.rstrip()), False
    probe = render([*messages[:k], {**messages[k], "content": _PROBE}], False)
    at = probe.find(_PROBE)
    if at < 0:
        raise ValueError("the chat template drops the assistant turn's content")
    head, tail = probe[:at], probe[at + len(_PROBE):]
    prefill = prompt[len(head):] if prompt.startswith(head) else ""
    extra = head[len(prompt):] if head.startswith(prompt) and len(head) > len(prompt) else ""
    target = extra + _strip_prefill(content, prefill) + tail
    text = prompt + target
    return text, len(prompt), len(text.rstrip()), THINK_OPEN in prefill and THINK_CLOSE not in prefill


def conversation(render: Render, messages: list[dict]) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """(text, assistant spans, think spans) of a conversation ending with an assistant turn, as
    character offsets in `text`. The last assistant turn is always trained; earlier ones are trained
    where the template renders the history as a prefix of the prompt (else they are context only)."""
    k = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if k < 0:
        raise ValueError("no assistant turn")
    if k != len(messages) - 1:
        raise ValueError(f"the conversation ends with a {messages[-1]['role']!r} turn after the assistant's")
    text, start, end, think_open = _final_turn(render, messages, k)
    turns = []
    for j, m in enumerate(messages[:k]):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:j], True), render(messages[: j + 1], False)
        if text.startswith(upto) and upto.startswith(before):
            turns.append((len(before), len(upto.rstrip())))
    turns.append((start, end))
    thinks = []
    for a, b in turns:
        t0, t1 = text.find(THINK_OPEN, a, b), text.find(THINK_CLOSE, a, b)
        if (a, b) == (start, end) and think_open and t1 >= 0 and (t0 < 0 or t1 < t0):
            thinks.append((a, t1 + len(THINK_CLOSE)))  # the prompt opened the think span
        elif t0 >= 0:
            t1 = text.find(THINK_CLOSE, t0, b)
            thinks.append((t0, b if t1 < 0 else t1 + len(THINK_CLOSE)))
    return text, turns, thinks
