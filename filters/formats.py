"""Trace formats, detected per row from the text: split into reasoning and response, find evidence of
truncation, and split rows that hold several samples.

Formats (the `trace_format` column):

- `think`: R1 / R1-distill, `<think> reasoning </think> response`. Chat templates often put `<think>`
  in the prompt, so the completion may start inside the span and carry only `</think>`.
- `sky`: Sky-T1 / OpenThoughts, `<|begin_of_thought|> … <|end_of_thought|> <|begin_of_solution|> …
  <|end_of_solution|>`; any one of the four markers is enough to detect it.
- `plain`: no markers at all: a worked solution, or reasoning whose markers were stripped.

Other teams' spellings of a think span are read as `think` (`THINK_ALIASES`: `<thinking>`, `<thought>`,
`<reasoning>`, `<reason>`, `<seed:think>`, Kimi's `◁think▷ … ◁/think▷`, any case), so their reasoning
is split off (curate needs it) and an unclosed one is evidence of truncation like an unclosed `<think>`.

A chain is called truncated only on evidence (`truncation`): a think / thought span the text opened and
never closed (the answer part never began); or a text (the response, an open solution block, a plain
trace) that stops mid-sentence or mid-formula, or on a sentence announcing more work ("Wait, …",
"Let me simplify this.", "Maybe I should consider …"), with no final-answer region at its end. A solution block
without its end marker whose text is complete is not truncated: teachers drop that marker. The
generation-side evidence (finish_reason "length", token count at the budget) is checked by the filter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SKY_THOUGHT_OPEN, SKY_THOUGHT_CLOSE = "<|begin_of_thought|>", "<|end_of_thought|>"
SKY_SOLUTION_OPEN, SKY_SOLUTION_CLOSE = "<|begin_of_solution|>", "<|end_of_solution|>"
SKY_MARKERS = (SKY_THOUGHT_OPEN, SKY_THOUGHT_CLOSE, SKY_SOLUTION_OPEN, SKY_SOLUTION_CLOSE)
FORMATS = ("think", "sky", "plain")

# Lines or tokens that separate samples joined into one row: end-of-sequence tokens of common tokenizers,
# and a line that only names a sample by number ("=== Sample 2 ===", "### Response 3", "Attempt 2:").
DEFAULT_SAMPLE_SEPARATOR = (
    r"<\|endoftext\|>|<\|im_end\|>|<\|eot_id\|>|<｜end▁of▁sentence｜>|</s>"
    r"|(?im:^[ \t]*(?:[-=#*]{2,}[ \t]*)?(?:sample|response|completion|attempt|generation|output)"
    r"[ \t]*#?[ \t]*\d+[ \t]*:?[ \t]*(?:[-=#*]{2,})?[ \t]*$)"
)


# think spans as other models and teams write them: (open, close) patterns, case-insensitive
THINK_ALIASES = re.compile(
    r"<\s*(/?)\s*(?:think|thinking|thought|reasoning|reason|seed:think)\s*>|◁(/?)think▷", re.IGNORECASE
)


def canonical_think(text: str) -> str:
    """`text` with other spellings of a think span written as `<think>` / `</think>` (see THINK_ALIASES).

    Texts that already carry `<think>` / `</think>` or Sky-T1 markers are returned as they are."""
    if THINK_OPEN in text or THINK_CLOSE in text or any(m in text for m in SKY_MARKERS):
        return text
    if "<" not in text and "◁" not in text:
        return text
    return THINK_ALIASES.sub(lambda m: THINK_CLOSE if (m.group(1) or m.group(2)) else THINK_OPEN, text)


@dataclass(frozen=True)
class Split:
    """A chain's parts. `closed` is False when the text opened a span (think / thought) it never closed;
    `solution_open` when a Sky solution block has no end marker (truncated only if its text is cut)."""

    reasoning: str
    response: str
    fmt: str
    closed: bool
    solution_open: bool = False


def detect_format(text: str | None) -> str:
    """`think`, `sky` or `plain`, from the markers the text carries."""
    text = canonical_think(text or "")
    if any(m in text for m in SKY_MARKERS):
        return "sky"
    if THINK_OPEN in text or THINK_CLOSE in text:
        return "think"
    return "plain"


def split_chain(text: str | None, starts_in_think: bool = False) -> Split:
    """Reasoning and response of a raw completion, and whether its spans are closed.

    `starts_in_think` is engine knowledge (the chat template opened `<think>` in the prompt): a text
    without any marker is then an open think span. Traces of unknown origin are split with it False.
    """
    text = canonical_think(text or "")
    fmt = detect_format(text)
    if fmt == "sky":
        return _split_sky(text)
    if fmt == "think":
        close = text.rfind(THINK_CLOSE)
        if close >= 0:
            reasoning = text[:close]
            start = reasoning.find(THINK_OPEN)
            if start >= 0:
                reasoning = reasoning[start + len(THINK_OPEN) :]
            return Split(reasoning.strip(), text[close + len(THINK_CLOSE) :].strip(), "think", True)
        body = text[text.find(THINK_OPEN) + len(THINK_OPEN) :]
        return Split(body.strip(), "", "think", False)
    if starts_in_think:
        return Split(text.strip(), "", "think", False)
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
    elif t1 >= 0:  # the solution without its begin marker
        response = text[t1 + len(SKY_THOUGHT_CLOSE) : s1 if s1 > t1 else len(text)]
    else:
        response = ""
    thought_open = t0 >= 0 and t1 < 0 and s0 < 0
    solution_open = s0 >= 0 and s1 < s0
    return Split(reasoning.strip(), response.strip(), "sky", not thought_open, solution_open)


# ------------------------------------------------------------------ does a text stop mid-way?

_CLEAN_END = re.compile(
    r"(?:[.!?。！？)\]}|>\"'”’»∎■□✓✔✅]|\$\$|\$|\\\]|\\\)|\*\*|`|\\end\{[a-z*]+\}|[\d%°]|\\circ)\s*$", re.I
)
_WORDS = re.compile(r"[A-Za-z]{2,}")


# "$50." in prose is money, not an open formula ("$5$" is a formula: its number is followed by "$")
MONEY = re.compile(r"\$\d+(?:[.,]\d+)*(?![\d$])")


def _unbalanced_math(tail: str) -> bool:
    """An open formula in the last paragraph: `$` / `$$` / `\\[` / `\\(` / braces / environments."""
    t = tail.replace("\\$", "")
    if t.count("$$") % 2:
        return True
    if t.replace("$$", "").count("$") % 2 and not MONEY.search(t):
        return True  # an odd "$" that no amount of money ("$50.") explains
    if t.count("\\[") > t.count("\\]") or t.count("\\(") > t.count("\\)"):
        return True
    if len(re.findall(r"\\begin\{", t)) > len(re.findall(r"\\end\{", t)):
        return True
    depth = 0
    for ch in t.replace("\\{", "").replace("\\}", ""):
        depth += (ch == "{") - (ch == "}")
    return depth > 0


# a last sentence that announces more work is no ending: "Wait, that might not be right.", "Let me simplify
# this step by step.", "Maybe I should consider the days." (never "Let me know if …", a sign-off)
_PLAN = re.compile(
    r"(?:(?:so|but|okay|ok|now|hmm+|alright|well),?\s+)*"
    r"(?:wait|hmm+|let me(?!\s+know)|let's|maybe i|perhaps i|alternatively|i (?:need|should|will|must) (?:to )?"
    r"(?:check|verify|compute|calculate|find|consider|think|figure|simplify|re-?examine|reconsider|make sure)|"
    r"now,? (?:i|we) (?:need|have|should|will|can)|next,? (?:i|we))\b",
    re.I,
)


def ends_in_plan(text: str) -> bool:
    """True when the text's last sentence announces more work ("Wait, …", "Let me …", "Maybe I should …")."""
    t = text.rstrip()[-400:]
    parts = re.split(r"(?<=[.!?])\s+|\n+", t)
    last = next((p for p in reversed(parts) if p.strip()), "")
    # a sentence that does the work it announces ("Let me verify: 5*3 = 15, …") is no plan
    return bool(_PLAN.match(last.strip().lstrip("*#>- "))) and "=" not in last


def ends_cut(text: str) -> str | None:
    """Why `text` looks cut off mid-way ("ends mid-formula" / "ends mid-sentence"), or None.

    A clean end is sentence punctuation, a closed formula or bracket, a number, or a markdown close.
    A trailing word, comma, colon or operator is mid-sentence ("Similarly, for k=3,").
    """
    t = text.rstrip()
    if not t:
        return None
    para = t[t.rfind("\n\n") + 2 :] if "\n\n" in t[-3000:] else t[-3000:]
    if _unbalanced_math(para):
        return "ends mid-formula"
    if t.endswith("..."):
        return "ends mid-sentence"
    if re.search(r"[=+\-*/^_,:;(]\s*$", t):
        return "ends mid-sentence"  # a trailing operator, comma or colon ("x = 3 +", "for k=3,")
    if _CLEAN_END.search(t):
        return "ends mid-reasoning" if ends_in_plan(t) else None
    return "ends mid-sentence"


def words_after(text: str, end: int) -> int:
    """Words of prose after position `end` (the end of the last answer span)."""
    return len(_WORDS.findall(text[end:]))


# ------------------------------------------------------------------ several samples in one row


def split_samples(text: str, separator: str | None = DEFAULT_SAMPLE_SEPARATOR) -> list[str]:
    """The samples of a row: split on `separator` (a regex; None = never split) and where a format's
    opening marker starts again after a closed sample (a second `<think>` after `</think>`, a second
    `<|begin_of_thought|>`). Empty pieces are dropped; a row without separators is one sample."""
    pieces = [text]
    if separator:
        pieces = [p for p in re.split(separator, text) if p and p.strip()]
    out: list[str] = []
    for p in pieces:
        out.extend(_split_on_reopen(p))
    return out or [text]


def _split_on_reopen(text: str) -> list[str]:
    for open_, close in ((SKY_THOUGHT_OPEN, None), (THINK_OPEN, THINK_CLOSE)):
        starts = [m.start() for m in re.finditer(re.escape(open_), text)]
        if len(starts) < 2:
            continue
        if close is not None:  # a second <think> counts only after the first span was closed
            starts = [s for i, s in enumerate(starts) if i == 0 or close in text[starts[i - 1] : s]]
        starts[0] = 0
        return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)], strict=True) if text[a:b].strip()]
    return [text]
