"""Pull the final answer out of a chain's answer part, recording where it came from (`pred_source`).

Candidates in order of strength (the first kind that yields a usable answer wins):

1. `boxed`: the last `\\boxed{…}` / `\\fbox{…}`; several boxes close together at the end (`\\boxed{3},
   \\boxed{4}`) are one answer, joined as a list (`boxed_list`); an explicit marker of rule 2 or 3 after
   the last box ("… \\boxed{7}. Checking again … Final answer: 8") restates the answer and wins;
2. `answer_tag`: the teacher's own answer markers: `<answer>…</answer>`, a line starting `Answer:` (or
   `答案：`), `#### 12`, a trailing JSON object's `"answer"` (`{"answer": "12"}`, fenced or not);
3. `final_answer`: a "Final Answer" heading (the lines under it) or "final answer: …" / "final answer is …";
4. `answer_is`: "the answer is …" (or `答案是` / `答案为` / `故选`);
5. `display_formula`: a display formula (`$$…$$`, `\\[…\\]`) that ends the text;
6. `last_sentence`: the last sentence, when it reads "… is / are / = / equals X";
7. `choice_letter`: for multiple choice, a lone option letter on the last line.

For multiple choice with the option texts known, an option's text quoted in the last line
(`option_text`: "The correct option is either $R$ or $S$, but no others.") is taken after the explicit
markers (1-4) and before the prose rules (5-6), when exactly one option's text is there.

Full-width characters (`１２`, `：`) and the Unicode minus are read as their ASCII forms; a marker's last
occurrence wins even when an earlier one runs on into it ("final answer is:\n\nFinal answer: 5").
Words that judge rather than answer (correct, incorrect, yes, true, consistent, …) are never taken from
prose unless the gold answer is such a word. The trace formats and their splitting live in
filters/formats.py (re-exported here). Everything here is linear-time string scanning, so it runs in the
filter actor itself; only the sympy work goes to the deadline-guarded worker process (filters/verify.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from filters.formats import (  # noqa: F401 - re-exported: callers split and extract through this module
    MONEY,
    SKY_SOLUTION_CLOSE,
    SKY_SOLUTION_OPEN,
    SKY_THOUGHT_CLOSE,
    SKY_THOUGHT_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    Split,
    detect_format,
    ends_cut,
    split_chain,
    words_after,
)

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


def find_boxed_spans(text: str) -> list[tuple[str, int, int]]:
    """(content, start, end) of every `\\boxed{…}` / `\\fbox{…}` in order (balanced braces; unbalanced skipped)."""
    out: list[tuple[str, int, int]] = []
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
                        out.append((text[j + 1 : k].strip(), pos, k + 1))
                        break
                k += 1
            i = k + 1 if depth == 0 else j + 1
        elif pos == b and j < len(text) and j > pos + len("\\boxed"):
            # "\boxed 5": the argument is the next token
            m = re.match(r"[^\s$.,]+", text[j:])
            if m:
                out.append((m.group(0), pos, j + m.end()))
            i = j + 1
        else:
            i = j + 1


def find_boxed(text: str) -> list[str]:
    """Contents of every `\\boxed{…}` / `\\fbox{…}` in order (balanced braces; unbalanced ones skipped)."""
    return [c for c, _a, _b in find_boxed_spans(text)]


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


# ------------------------------------------------------------------ candidates


@dataclass(frozen=True)
class Extraction:
    """An extracted answer, the rule that found it and where its span ends in the searched text."""

    answer: str
    source: str
    end: int


# judgements, not answers: "…so the result checks out and is correct."
_VERDICT_WORDS = {
    "correct", "incorrect", "right", "wrong", "yes", "no", "true", "false", "valid", "invalid", "consistent",
    "inconsistent", "confirmed", "verified", "done", "satisfied", "possible", "impossible", "fine", "ok",
    "okay", "good", "same", "unchanged", "this", "that", "it", "above", "below", "as follows", "following",
    "clear", "obvious", "solved", "complete", "accurate", "reasonable", "plausible", "likely", "sound",
}
_FILLER = re.compile(r"\b(?:indeed|actually|also|thus|therefore|so|then|still|definitely|certainly|"
                     r"indeed|fully|all|now|exactly|approximately|about|roughly|the|a|an|not)\b", re.I)
# a boxed group: boxes whose gaps hold only separators ("and", commas, spacing, math delimiters)
_BOX_GAP = re.compile(r"(?:\s|,|;|[a-zA-Z](?:_\{?\w+\}?)?\s*=|\$|\\[(),;!\[\]]|\\q?quad|\\text\{\s*(?:and|or)\s*\}|\band\b|\bor\b|&|\\\\)*", re.I)
_ANSWER_LINE = re.compile(r"(?im)^[ \t>*#]*(?:\*\*)?(?:answer|(?:最终)?答案)(?:\*\*)?\s*[:：]\s*(?:\*\*)?\s*([^\n]+)$")
# a JSON object's answer field: {"answer": "12"}, {"final_answer": 12}, {"answer": ["1", "2"]}
_JSON_ANSWER = re.compile(
    r'"(?:final[_ ]?answer|answer)"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\[[^\[\]]*\])', re.I
)
# full-width forms (U+FF01-FF5E), the ideographic space, comma and full stop, the Unicode minus: one ASCII character each
_WIDE = {**{c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}, 0x3000: 0x20, 0x3001: 0x2C, 0x3002: 0x2E, 0x2212: 0x2D}


def ascii_forms(s: str) -> str:
    """`s` with full-width characters and the Unicode minus as ASCII (the same length: offsets hold)."""
    return s.translate(_WIDE)
_HASHES = re.compile(r"(?m)^\s*####\s*([^\n]+)$")
_HEADING = re.compile(r"(?im)^[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*final[ \t]+answer[ \t]*[:：]?[ \t]*(?:\*\*|__)?[ \t]*[:：]?[ \t]*$")
_FINAL_INLINE = re.compile(r"final\s+answer\s*(?:\*\*)?\s*(?:is\b|[:：=])?\s*(?:\*\*)?\s*:?\s*([^\n]{1,400})", re.I)
_ANSWER_IS = re.compile(
    r"(?:\banswer\s*(?:\*\*)?\s*(?:is\b|[:：=])|答案(?:是|为|應為|应为)|(?:故|所以|因此|应|應)选)\s*(?:\*\*)?\s*:?\s*([^\n]{1,400})",
    re.I,
)
_DISPLAY = re.compile(r"(\$\$(.+?)\$\$|\\\[(.+?)\\\])", re.S)
_COPULA = re.compile(r"\s(?:is|are|was|were|equals|equal\s+to|becomes|gives|yields)\s+|\s*(?<![<>!\\])=(?!=)\s*|\\approx|≈")
# sentence ends: ". " / "! " / "? " / newline, never the point of a decimal ("6.17") or an abbreviation ("e.g.")
_SENTENCE_END = re.compile(r"(?<![\d.]\d)(?<!e\.g)(?<!i\.e)[.!?](?=\s|$)|\n\s*\n")


# prose that follows an answer on its line: "12 but wait", "5, since …"
_AFTERTHOUGHT = re.compile(r"(?:,\s*|\s+)(?:but|since|because|which|wait|however|hence|therefore|thus|so|"
                           r"if|when|where|although|though|unless|assuming|hmm)\b", re.I)
_INLINE_MATH = re.compile(r"\$([^$]+)\$|\\\((.+?)\\\)", re.S)
_RELATION = re.compile(r"\\(?:le|ge|leq|geq|in|neq|ne|lt|gt|leqslant|geqslant)(?![a-zA-Z])|[<>=≤≥≠]")


def _words_only(s: str) -> str:
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox|emph)\s*\{([^{}]*)\}", r"\1", s)
    return " ".join(re.sub(r"[^a-z\s]", " ", s.lower()).split())


def is_verdict_word(s: str) -> bool:
    """True for a judgement ("correct", "\\text{Yes}", "is indeed true") rather than an answer."""
    w = _words_only(_FILLER.sub(" ", s))
    if re.search(r"\d", s) or not w:
        return False
    return w in _VERDICT_WORDS or all(x in _VERDICT_WORDS for x in w.split())


def _gold_is_word(gold: str | None) -> bool:
    return bool(gold) and is_verdict_word(gold)


_DANGLING = re.compile(r"[A-Za-z,]\s+(?:of|the|a|an|is|are|was|be|to|and|or|in|for|with|by|from|as|that)\s*$", re.I)
_CLAUSE = re.compile(r"(?:in|of|to|that|given|expressed|written|asked|required|needed|as follows)\b", re.I)


def _usable(ans: str | None, gold_word: bool, gold: str | None = None) -> bool:
    """A candidate from prose is an answer unless it judges ("correct") or is a clause, not a value
    ("let me think about it again"): six words or more, no digit, no math, where the gold is short."""
    if not ans or (not gold_word and is_verdict_word(ans)):
        return False
    if _CLAUSE.match(ans) and not (gold and _CLAUSE.match(gold.strip())):
        return False  # "the answer is in the form \frac{m}{n}": a description, not the answer
    if _DANGLING.search(ans) and not (gold and _DANGLING.search(gold)):
        return False  # "**Answer:** The number of" (cut off): a sentence that never reached its value
    words = len(_words_only(ans).split())
    long_gold = bool(gold) and len(_words_only(gold).split()) >= 3
    return long_gold or words < 6 or bool(re.search(r"[\d\\^=]", ans))


def _boxed(text: str) -> Extraction | None:
    spans = [sp for sp in find_boxed_spans(text) if sp[0]]
    if not spans:
        return None
    group = [spans[-1]]
    for sp in reversed(spans[:-1]):
        gap = text[sp[2] : group[0][1]]
        if len(gap) > 80 or _BOX_GAP.fullmatch(gap) is None:
            break
        group.insert(0, sp)
    contents = [c for c, _a, _b in group]
    if len(contents) > 1 and len(set(contents)) > 1:
        return Extraction(", ".join(contents), "boxed_list", group[-1][2])
    return Extraction(contents[-1], "boxed", group[-1][2])


def _trim_phrase(s: str) -> str:
    """"12. So …" -> "12"; "The coefficient is 384" -> "384"; keeps decimal points and LaTeX."""
    s = re.split(r"(?<!\d)\.(?:\s|$)|\.\s+(?=[A-Z])", s, maxsplit=1)[0]
    s = _AFTERTHOUGHT.split(s, maxsplit=1)[0]
    boxed = find_boxed(s)
    if boxed:
        return clean_answer(boxed[-1])
    if re.search(r"\s(?:is|equals)\s", s):
        s = re.split(r"\s(?:is|equals)\s", s)[-1]
    return clean_answer(s)


def _last_match(rx: re.Pattern, text: str) -> re.Match | None:
    last = None
    for m in rx.finditer(text):
        last = m
    return last


def _last_start(rx: re.Pattern, text: str) -> re.Match | None:
    """The match that starts last, also where an earlier match runs on over it ("answer is:\nAnswer: 5")."""
    last, m = None, rx.search(text)
    while m is not None:
        last, m = m, rx.search(text, m.start() + 1)
    return last


def _phrase(m: re.Match, offset: int, source: str) -> Extraction:
    """The answer of a marker match, its span ending where the answer ends (not at the end of the line)."""
    ans = _trim_phrase(m.group(1))
    at = m.group(1).find(ans) if ans else -1
    end = m.start(1) + at + len(ans) if at >= 0 else m.end()
    return Extraction(ans, source, offset + end)


def _tagged(text: str, offset: int) -> Extraction | None:
    tags = list(_ANSWER_TAG.finditer(text))
    if tags and tags[-1].group(1).strip():
        inner = tags[-1].group(1).strip()
        boxed = find_boxed(inner)
        return Extraction(clean_answer(boxed[-1] if boxed else inner), "answer_tag", offset + tags[-1].end())
    for rx in (_HASHES, _ANSWER_LINE):
        m = _last_match(rx, text)
        if m:
            return _phrase(m, offset, "answer_tag")
    return _json_answer(text, offset)


def _json_answer(text: str, offset: int) -> Extraction | None:
    """The answer field of the last JSON object in the text (`{"answer": …}`), when the object ends it."""
    import json

    m = _last_match(_JSON_ANSWER, text)
    if m is None:
        return None
    end = m.end()
    # the object around the field ({"answer": 5, "explanation": "…"}) must end the text, not the field
    dec, p = json.JSONDecoder(), m.start()
    for _ in range(8):
        p = text.rfind("{", 0, p)
        if p < 0:
            break
        try:
            obj, obj_end = dec.raw_decode(text, p)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and obj_end >= m.end():
            end = obj_end
            break
    if words_after(text, end) > 3:
        return None
    try:
        value = json.loads(m.group(1))
    except json.JSONDecodeError:
        return None
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    ans = clean_answer(str(value))
    boxed = find_boxed(ans)
    return Extraction(clean_answer(boxed[-1]) if boxed else ans, "answer_tag", offset + end) if ans else None


def _heading(text: str, offset: int) -> Extraction | None:
    m = _last_match(_HEADING, text)
    if m:
        body = text[m.end() :].strip()
        block = body.split("\n\n")[0].strip() if body else ""
        boxed = find_boxed(block)
        if block:
            ans = clean_answer(boxed[-1] if boxed else block)
            return Extraction(ans, "final_answer", offset + m.end() + text[m.end() :].find(block) + len(block))
    m = _last_start(_FINAL_INLINE, text)
    if m:
        return _phrase(m, offset, "final_answer")
    return None


def _answer_is(text: str, offset: int) -> Extraction | None:
    m = _last_start(_ANSWER_IS, text)
    return _phrase(m, offset, "answer_is") if m else None


def _display(text: str, offset: int) -> Extraction | None:
    m = _last_match(_DISPLAY, text)
    if m is None or ends_cut(text) or words_after(text, m.end()) > 3:
        return None  # a formula the text goes on from is a step, not the answer
    body = (m.group(2) or m.group(3) or "").strip()
    return Extraction(clean_answer(body), "display_formula", offset + m.end()) if body else None


_ALT_GAP = re.compile(r"\s*(?:,\s*)?(?:\b(?:or|and)\b)?\s*", re.I)
_ASSIGN = re.compile(r"^\s*([a-zA-Z](?:_\{?\w+\}?)?)\s*=\s*(.+)$", re.S)


def _alternatives(sentence: str, last: re.Match) -> str | None:
    """"$x = 2$ or $x = -3$" (several solutions of one variable, one sentence) -> "2, -3"; else None."""
    group = [last]
    for m in reversed(list(_INLINE_MATH.finditer(sentence, 0, last.start()))):
        if not _ALT_GAP.fullmatch(sentence[m.end() : group[0].start()]) or not sentence[m.end() : group[0].start()].strip():
            break
        group.insert(0, m)
    if len(group) < 2:
        return None
    bodies = [(m.group(1) or m.group(2) or "").strip() for m in group]
    assigned = [_ASSIGN.match(b) for b in bodies]
    if not all(assigned) or len({a.group(1) for a in assigned}) != 1:
        return None  # "$a = 1$ and $b = 2$" are two unknowns, not alternatives: leave it to the other rules
    return ", ".join(clean_answer(a.group(2)) for a in assigned)


def _last_sentence(text: str, offset: int) -> Extraction | None:
    t = text.rstrip()
    if ends_cut(t):
        return None  # "…Similarly, for k=3," is a cut text, not an answer "3"
    ends = [m.end() for m in _SENTENCE_END.finditer(t) if m.end() < len(t) - 1]
    start = ends[-1] if ends else max(0, len(t) - 600)
    sentence = t[start:].strip()
    if sentence.replace("$$", "").replace("\\$", "").count("$") % 2:
        # an odd "$": money ("costs $5") is no math delimiter; keep it, but out of the pairing
        sentence = MONEY.sub(lambda m: "＄" + m.group(0)[1:], sentence)
    math = _last_match(_INLINE_MATH, sentence)
    if math and not sentence[math.end() :].strip(" .!,;*"):
        body = (math.group(1) or math.group(2) or "").strip()
        prose = sentence[: math.start()]
        several = _alternatives(sentence, math)
        if several:
            return Extraction(several, "last_sentence", offset + len(t))
        if _RELATION.search(body) or re.search(r"(?:\s(?:is|are|was|were|equals|be)|=|\\approx)\s*$", prose):
            return Extraction(clean_answer(body), "last_sentence", offset + len(t)) if body else None
        return None
    parts = _COPULA.split(sentence)
    if len(parts) < 2:
        return None
    ans = clean_answer(parts[-1].strip().replace("＄", "$"))
    ans = re.sub(r"^(?:approximately|about|exactly|roughly|precisely)\s+", "", ans, flags=re.I)
    if not ans or len(ans) > 120 or len(_words_only(ans).split()) > 6:
        return None
    return Extraction(ans, "last_sentence", offset + len(t))


def _squashed(s: str) -> str:
    return re.sub(r"\s+|\$|\\[,;!]", "", s).replace("\\dfrac", "\\frac").lower()


def _option_text(tail: str, choices: list[str] | None) -> Extraction | None:
    """The one option whose text the last line quotes (options of a few characters or less, such as
    bare letters or numbers, are never matched inside prose)."""
    if not choices:
        return None
    lines = tail.rstrip().splitlines()
    last = _squashed(lines[-1][-600:] if lines else "")
    texts = [_squashed(str(c)) for c in choices]
    hits = [i for i, c in enumerate(texts) if len(c) >= 4 and c in last]
    # an option that is part of a longer quoted one ("only $R$" in "either $R$ or $S$") does not count
    hits = [i for i in hits if not any(j != i and texts[i] in texts[j] for j in hits)]
    return Extraction(str(choices[hits[0]]), "option_text", len(tail)) if len(hits) == 1 else None


def extract(response: str, answer_type: str | None = None, gold: str | None = None,
            choices: list[str] | None = None) -> Extraction | None:
    """The final answer of a response part (see the module docstring), or None."""
    if not response:
        return None
    response = ascii_forms(response)
    gold_word = _gold_is_word(gold)
    found = _boxed(response)
    if found:
        # the teacher boxed it: that is its answer, unless an explicit answer marker after the box
        # restates it otherwise ("Tentatively \\boxed{7}. … Final answer: 8")
        rest = response[found.end :]
        if len(rest) < _TAIL_CHARS and re.search(r"answer|答案|####", rest, re.I):
            later = _tagged(rest, found.end) or _heading(rest, found.end)
            if later is not None and _usable(later.answer, gold_word, gold):
                return later
        return found
    offset = max(0, len(response) - _TAIL_CHARS)
    tail = response[offset:]
    for rule in (_tagged, _heading, _answer_is, _display, _last_sentence):
        if rule is _display and answer_type == "choice":
            found = _option_text(tail, choices)
            if found is not None:
                return Extraction(found.answer, found.source, offset + found.end)
        found = rule(tail, offset)
        if found is not None and _usable(found.answer, gold_word, gold):
            return found
    if answer_type == "choice":
        last_line = tail.strip().splitlines()[-1] if tail.strip() else ""
        letter = choice_letter(last_line)
        if letter:
            return Extraction(letter, "choice_letter", len(response))
    return None


def extract_answer(response: str, answer_type: str | None = None, gold: str | None = None) -> str | None:
    """The final answer of a response part as a string, or None when nothing is extractable."""
    found = extract(response, answer_type, gold)
    return found.answer if found else None


def truncation(split: Split, found: Extraction | None) -> str | None:
    """Evidence in the text that the chain was cut off (see filters/formats.py), or None.

    `found` is the answer extracted from `split.response`: a text cut mid-sentence counts as cut only
    when no answer span ends it (a few words after the last answer, "\\boxed{5} and", are no evidence).
    """
    if not split.closed:
        return "unclosed think span" if split.fmt == "think" else "unclosed thought span"
    cut = ends_cut(split.response)
    if cut is None:
        return None
    if found is not None and (words_after(split.response, found.end) < 4 or cut == "ends mid-reasoning"):
        return None  # an answer was given: a closing check ("Let me verify: 3*4 = 12.") is no cut
    return f"solution block cut off ({cut})" if split.solution_open else cut
