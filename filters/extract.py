"""Split a chain into its thinking and answer parts, and pull the final answer out of the answer part.

Two trace formats are recognised, plus plain text:

- R1 / R1-distill: `<think> reasoning </think> response`. Chat templates usually put `<think>` in the
  prompt, so a completion often starts inside the think span; `starts_in_think=True` says so, and such
  a text without `</think>` is an unclosed (cut-off) chain.
- Sky-T1 / NovaSky: `<|begin_of_thought|> … <|end_of_thought|> <|begin_of_solution|> … <|end_of_solution|>`;
  a chain without `<|end_of_solution|>` is unclosed.

Answer extraction looks only at the response part, in this order: the last `\\boxed{…}` (or `\\fbox`),
the last `<answer>…</answer>`, the last "final answer / the answer is / **Answer:**" marker, and for
multiple choice a lone option letter. Everything here is linear-time string scanning, so it runs in the
filter actor itself; only the sympy work goes to the deadline-guarded worker process (filters/verify.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SKY_THOUGHT_OPEN, SKY_THOUGHT_CLOSE = "<|begin_of_thought|>", "<|end_of_thought|>"
SKY_SOLUTION_OPEN, SKY_SOLUTION_CLOSE = "<|begin_of_solution|>", "<|end_of_solution|>"

# Answer markers are searched only in the last part of a response: an answer sits at the end, and a
# bounded window keeps the regex cost flat on 100k-character responses.
_TAIL_CHARS = 4000
_MARKER = re.compile(
    # a bare "answer" must be followed by is / : / = ("This answer makes sense" is no marker)
    r"(?:final\s+answer\s*(?:is\b|[:：=])?|answer\s*(?:\*\*)?\s*(?:is\b|[:：=]))"
    r"\s*[:：]?\s*(?:\*\*)?\s*:?\s*([^\n]{1,400})",
    re.IGNORECASE,
)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.IGNORECASE)
_LETTER = re.compile(r"^\(?\s*([A-Ha-h])\s*\)?(?:[.:)]\s*.*)?$", re.S)
_OPTION_WORD = re.compile(r"\b(?:option|choice)\s*\(?([A-H])\)?\b", re.IGNORECASE)
_WRAPPERS = (("\\(", "\\)"), ("\\[", "\\]"), ("$$", "$$"), ("$", "$"), ("**", "**"), ("*", "*"), ("`", "`"))


@dataclass(frozen=True)
class Split:
    """A chain's parts. `closed` is False when an opened span (think / thought / solution) never ends."""

    reasoning: str
    response: str
    fmt: str  # "r1" | "sky" | "plain"
    closed: bool


def split_chain(text: str | None, starts_in_think: bool = False) -> Split:
    """Reasoning and response of a raw completion, and whether its spans are closed."""
    text = text or ""
    if SKY_THOUGHT_OPEN in text or SKY_SOLUTION_OPEN in text or SKY_SOLUTION_CLOSE in text:
        return _split_sky(text)
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        reasoning = text[:close]
        start = reasoning.find(THINK_OPEN)
        if start >= 0:
            reasoning = reasoning[start + len(THINK_OPEN) :]
        return Split(reasoning.strip(), text[close + len(THINK_CLOSE) :].strip(), "r1", True)
    open_ = text.find(THINK_OPEN)
    if open_ >= 0 or starts_in_think:
        body = text[open_ + len(THINK_OPEN) :] if open_ >= 0 else text
        return Split(body.strip(), "", "r1", False)
    return Split("", text.strip(), "plain", True)


def _split_sky(text: str) -> Split:
    t0 = text.find(SKY_THOUGHT_OPEN)
    t1 = text.find(SKY_THOUGHT_CLOSE)
    s0 = text.find(SKY_SOLUTION_OPEN)
    s1 = text.rfind(SKY_SOLUTION_CLOSE)
    r_start = t0 + len(SKY_THOUGHT_OPEN) if t0 >= 0 else 0
    r_end = t1 if t1 >= 0 else (s0 if s0 >= 0 else len(text))
    reasoning = text[r_start:r_end]
    if s0 >= 0:
        response = text[s0 + len(SKY_SOLUTION_OPEN) : s1 if s1 > s0 else len(text)]
    else:
        response = ""
    closed = s1 >= 0 and (t0 < 0 or t1 >= 0)
    return Split(reasoning.strip(), response.strip(), "sky", closed)


def find_boxed(text: str) -> list[str]:
    """Contents of every `\\boxed{…}` / `\\fbox{…}` in order (balanced braces; unbalanced ones skipped)."""
    out: list[str] = []
    i = 0
    while True:
        b = text.find("\\boxed", i)
        f = text.find("\\fbox", i)
        cands = [x for x in (b, f) if x >= 0]
        if not cands:
            return out
        pos = min(cands)
        j = pos + (len("\\boxed") if pos == b else len("\\fbox"))
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            depth, k = 0, j
            while k < len(text):
                c = text[k]
                if c == "\\":
                    k += 2
                    continue
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        out.append(text[j + 1 : k].strip())
                        break
                k += 1
            i = k + 1 if depth == 0 else j + 1
        elif pos == b and j < len(text) and j > pos + len("\\boxed"):
            # "\boxed 5": the argument is the next token
            m = re.match(r"[^\s$.,]+", text[j:])
            if m:
                out.append(m.group(0))
            i = j + 1
        else:
            i = j + 1


def clean_answer(s: str) -> str:
    """Strip math delimiters, markdown emphasis and trailing punctuation from an answer string."""
    s = s.strip()
    changed = True
    while changed and s:
        changed = False
        for a, b in _WRAPPERS:
            if len(s) >= len(a) + len(b) and s.startswith(a) and s.endswith(b):
                s = s[len(a) : len(s) - len(b)].strip()
                changed = True
        if s.endswith((".", ";", ",")) and not s.endswith("..."):
            s = s[:-1].rstrip()
            changed = True
    s = s.replace("**", "")
    m = re.fullmatch(r"\\boxed\{(.*)\}", s, re.S)
    return m.group(1).strip() if m else s


def _from_marker(tail: str) -> str | None:
    last = None
    for m in _MARKER.finditer(tail):
        last = m
    if last is None:
        return None
    s = last.group(1)
    # "The answer is 12. So ..." -> "12"; keep decimal points ("6.17") and LaTeX.
    s = re.split(r"(?<!\d)\.(?:\s|$)|\.\s+(?=[A-Z])", s, maxsplit=1)[0]
    boxed = find_boxed(s)
    if not boxed and re.search(r"\s(?:is|equals)\s", s):
        s = re.split(r"\s(?:is|equals)\s", s)[-1]  # "**Answer:** The coefficient is 384" -> "384"
    s = clean_answer(boxed[-1] if boxed else s)
    return s or None


def choice_letter(s: str, n_choices: int | None = None) -> str | None:
    """The option letter an answer string names ("B", "(B)", "B.", "B) 12", "option B"), else None."""
    s = clean_answer(re.sub(r"\\text\{([^{}]*)\}|\\textbf\{([^{}]*)\}", r"\1\2", s))
    m = _LETTER.match(s)
    letter = m.group(1).upper() if m else None
    if letter is None:
        m = _OPTION_WORD.search(s)
        letter = m.group(1).upper() if m else None
    if letter is not None and n_choices is not None and ord(letter) - ord("A") >= n_choices:
        return None
    return letter


def extract_answer(response: str, answer_type: str | None = None) -> str | None:
    """The final answer of a response part as a string, or None when nothing is extractable."""
    if not response:
        return None
    boxed = find_boxed(response)
    for cand in reversed(boxed):
        if cand:
            return cand
    tags = _ANSWER_TAG.findall(response[-_TAIL_CHARS * 4 :])
    if tags and tags[-1].strip():
        inner = tags[-1].strip()
        inner_boxed = find_boxed(inner)
        return clean_answer(inner_boxed[-1] if inner_boxed else inner)
    tail = response[-_TAIL_CHARS:]
    marked = _from_marker(tail)
    if marked:
        return marked
    if answer_type == "choice":
        last_line = tail.strip().splitlines()[-1] if tail.strip() else ""
        letter = choice_letter(last_line)
        if letter:
            return letter
    return None
