"""Answer equivalence beyond what math-verify reads: the string-level classes it misses.

filters/verify.py runs these inside its deadline worker, around the type-aware checks:

- identical answers after surface normalisation (`9:30` and `9:30`, `C` and `\\mathrm{C}`, spacing,
  `\\dfrac`) are equal before anything is parsed (math-verify reads `9:30` as the ratio 3/10);
- a gold damaged in its source (a LaTeX command that lost its backslash, `begin{pmatrix}`; matrix rows
  whose separators were lost; unbalanced braces) is `gold_unparsable`, never a wrong chain;
- an assignment prefix on one side only (`(m,n)=(1,4)` vs `(1,4)`, `x = 5` vs `5`) is dropped;
- number spellings: thousands separators (`2 000`, thin and no-break spaces, `2,500.75`, `2.500,75`),
  decimal commas (`3,14` against a gold with a decimal point);
- rounding: a decimal with at least two significant digits equals an exact value with no finite decimal
  expansion when that value rounds to it (`0.67` vs `2/3`, `1.41` vs `\\sqrt{2}`; not `0.13` vs `0.125`);
- lists of ordered tuples compared as a multiset of tuples, with "(a,b) or (b,a)" alternatives: a
  prediction listing every ordering of the gold tuple, or one ordering of a gold that lists them all.
- `plain_form`: full-width characters as ASCII, Unicode math (`½`, `²`, `√`, `×`) as LaTeX, and a whole
  answer wrapped in `\\text{…}` around math or a number as its content.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from filters.extract import ascii_forms, clean_answer, find_boxed

_WRAP_CMD = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mathit|mbox|operatorname|boldsymbol)\s*\{([^{}]*)\}")
_SPACES = re.compile(r"\s+|\\[,;:! ]|\\q?quad|~")


def surface(s: str) -> str:
    """A spelling-insensitive form of an answer: delimiters, font commands, sizing and spacing removed."""
    s = clean_answer(s or "")
    for _ in range(3):
        s = _WRAP_CMD.sub(r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\displaystyle", "").replace("\\varnothing", "\\emptyset").replace("\\{\\}", "\\emptyset")
    return _SPACES.sub("", s).strip(".")


_CLOCK = re.compile(r"0?(\d{1,2}):([0-5]\d)(?::([0-5]\d))?(am|pm|a\.m|p\.m)?", re.I)


def clock_time(s: str) -> tuple[str, str] | None:
    """A clock time ("9:30", "09:30 AM", "9:30\\text{ pm}") as (h:mm[:ss], am/pm or ""), or None."""
    m = _CLOCK.fullmatch(surface(s).replace(".", "") if "m." in s.lower() else surface(s))
    if m is None:
        return None
    ampm = (m.group(4) or "").replace(".", "").lower()
    return f"{int(m.group(1))}:{m.group(2)}{':' + m.group(3) if m.group(3) else ''}", ampm


def same_time(a: tuple[str, str], b: tuple[str, str] | None) -> bool:
    """Equal clock readings; AM/PM must agree only when both sides give it."""
    return b is not None and a[0] == b[0] and (not a[1] or not b[1] or a[1] == b[1])


def identical(pred: str, gold: str) -> bool:
    a, b = surface(pred), surface(gold)
    return bool(a) and a == b


# ------------------------------------------------------------------ damaged golds

_LOST_BACKSLASH = re.compile(r"(?<![\\a-zA-Z])(?:begin|end)\{(?:[pbvBV]?matrix|array|cases|aligned)\}|"
                             r"(?<![\\a-zA-Z])(?:d?frac|sqrt)\{")


def damaged_gold(gold: str) -> str | None:
    """Why a gold string cannot be a faithful answer (lost backslashes, broken matrix rows), or None."""
    g = gold or ""
    if _LOST_BACKSLASH.search(g):
        return "gold lost a backslash (a LaTeX command without its \\)"
    depth = 0
    for ch in g.replace("\\{", "").replace("\\}", ""):
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            break
    if depth != 0:
        return "gold has unbalanced braces"
    m = re.search(r"\\begin\{([pbvBV]?matrix|array)\}(.*?)\\end\{\1\}", g, re.S)
    if m:
        body = m.group(2)
        if m.group(1) == "array":
            body = re.sub(r"^\s*\{[^{}]*\}", "", body)
        if re.search(r"(?<!\\)\\(?=[\s\d-])", body.replace("\\\\", "")):
            return "gold matrix has a lone backslash where a row break was"
        rows = [r for r in body.split("\\\\") if r.strip()]
        widths = {r.count("&") for r in rows}
        if len(widths) > 1:
            return f"gold matrix rows have different lengths ({sorted(w + 1 for w in widths)})"
    return None


# ------------------------------------------------------------------ assignments, number spellings

_LHS = r"(?:[a-zA-Z](?:_\{?\w+\}?)?|\\[a-zA-Z]+(?:\s*[a-zA-Z])?|[a-zA-Z]\(\w+\))"
_ASSIGN = re.compile(rf"^\s*(?:{_LHS}|\(\s*{_LHS}(?:\s*,\s*{_LHS})+\s*\))\s*=\s*(?=[^=]+$)")


def _has_relation(s: str) -> bool:
    return bool(re.search(r"=|\\(?:le|ge|leq|geq|neq|in)(?![a-zA-Z])|[<>]", s))


def drop_assignment(pred: str, gold: str) -> tuple[str, str]:
    """(pred, gold) without an assignment prefix that only one side carries: `(m,n)=(1,4)` vs `(1,4)`."""
    p, g = clean_answer(pred), clean_answer(gold)
    if _ASSIGN.match(g) and not _has_relation(p):
        g = _ASSIGN.sub("", g, count=1)
    elif _ASSIGN.match(p) and not _has_relation(g):
        p = _ASSIGN.sub("", p, count=1)
    return p, g


_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:(?:[ \u2009\u202f\u00a0']|\\,|\\ |\{,\}|,)\d{3})+(?:\.\d+)?$")
_EURO = re.compile(r"^[-+]?\d{1,3}(?:\.\d{3})+,\d+$")
_DECIMAL_COMMA = re.compile(r"^[-+]?\d+,(?:\d{1,2}|\d{4,})$")


def number_text(s: str, other: str = "") -> str:
    """A number written without grouping: `2 000`, `2\\,500.75`, `2.500,75` -> `2000`, `2500.75`, `2500.75`;
    `3,14` -> `3.14` when `other` (the answer it is compared with) is a decimal with a point."""
    t = s.strip()
    if _THOUSANDS.match(t):
        return re.sub(r"[ \u2009\u202f\u00a0',]|\\,|\\ |\{,\}", "", t)
    if _EURO.match(t):
        return t.replace(".", "").replace(",", ".")
    if _DECIMAL_COMMA.match(t) and re.fullmatch(r"[-+]?\d*\.\d+", other.strip()):
        return t.replace(",", ".")
    return t


# ------------------------------------------------------------------ rounding


def decimals(s: str) -> int:
    """Most digits after a decimal point in `s` (0 when it has none)."""
    return max((len(m) for m in re.findall(r"\d\.(\d+)", s or "")), default=0)


def _terminating(x: Any) -> bool:
    """True when an exact number has a finite decimal expansion (an integer, or p/q with q = 2^a 5^b)."""
    import sympy

    if not isinstance(x, sympy.Rational):
        return False
    q = int(x.q)
    for f in (2, 5):
        while q % f == 0:
            q //= f
    return q == 1


def rounded_equal(g: Any, p: Any, g_dec: int, p_dec: int) -> bool:
    """An approximation (a Float) equals an exact non-terminating value it is a rounding of."""
    import math

    import sympy

    for approx, exact, d in ((p, g, p_dec), (g, p, g_dec)):
        if not isinstance(approx, sympy.Float) or isinstance(exact, sympy.Float) or d < 1:
            continue
        if not getattr(exact, "is_number", False) or _terminating(exact):
            continue
        try:
            e, a = float(sympy.N(exact, 30)), float(approx)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(e) or a == 0:
            continue
        if d + math.floor(math.log10(abs(a))) + 1 < 2:
            continue  # one significant digit (0.7 for 2/3) is too coarse to count
        if abs(e - a) <= 0.5 * 10 ** (-d) * (1 + 1e-9):
            return True
    return False


# ------------------------------------------------------------------ relations and sets (sympy objects)


def membership(x: Any) -> bool:
    import sympy

    return isinstance(x, sympy.Eq) and isinstance(x.rhs, sympy.Set)


def is_relation(x: Any) -> bool:
    r"""An inequality or a membership (`x \in S`), not a plain equation."""
    import sympy

    if membership(x):
        return True
    rel = (sympy.core.relational.Relational, sympy.And, sympy.Or)
    return isinstance(x, rel) and not isinstance(x, (sympy.Eq, sympy.Ne))


def sets_equal(G: Any, P: Any, eq: Callable[[Any, Any], bool]) -> bool:
    """Two sets equal as sets, interval ends compared as numbers (so rounded ends count, 0.67 for 2/3)."""
    import sympy

    if G == P:
        return True
    if isinstance(G, sympy.Interval) and isinstance(P, sympy.Interval):
        return (G.left_open, G.right_open) == (P.left_open, P.right_open) and all(
            a == b or (a.is_finite and b.is_finite and eq(a, b)) for a, b in ((G.start, P.start), (G.end, P.end))
        )
    if isinstance(G, sympy.Union) and isinstance(P, sympy.Union) and len(G.args) == len(P.args):
        return all(sets_equal(a, b, eq) for a, b in zip(G.args, P.args, strict=True))
    if isinstance(G, sympy.FiniteSet) and isinstance(P, sympy.FiniteSet) and len(G) == len(P):
        left = list(P.args)
        for g in G.args:
            hit = next((i for i, p in enumerate(left) if eq(g, p)), None)
            if hit is None:
                return False
            left.pop(hit)
        return True
    return False


# ------------------------------------------------------------------ lists of tuples


def _top_split(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch in ",;" and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def tuple_list(s: str) -> list[list[str]] | None:
    """`(1,2),(2,1)` / `(1,2) or (2,1)` / `\\{(1,2),(2,1)\\}` -> [["1","2"],["2","1"]]; None if not tuples."""
    t = surface(s)
    t = re.sub(r"^\\\{(.*)\\\}$", r"\1", t)
    if t.startswith("[(") and t.endswith(")]"):
        t = t[1:-1]
    t = re.sub(r"(?<=\))(?:or|and)(?=\()", ",", t)
    items = _top_split(t)
    out = []
    for it in items:
        it = re.sub(r"^\(?[a-zA-Z](?:,[a-zA-Z])+\)?=", "", it)  # "(x,y)=(1,2)"
        if not (it.startswith("(") and it.endswith(")")):
            return None
        inner = _top_split(it[1:-1])
        if len(inner) < 2:
            return None
        out.append(inner)
    return out or None


def compare_tuple_lists(pred: str, gold: str, same: Callable[[str, str], bool]) -> tuple[str, str] | None:
    """Verdict for answers that are lists of ordered tuples (None when either is not one).

    `same(gold_element, pred_element)` compares two elements. Tuples are ordered; the list is not.
    """
    G, P = tuple_list(gold), tuple_list(pred)
    if G is None or P is None or (len(G) == 1 and len(P) == 1):
        return None  # one tuple each: the tuple check decides

    def eq(a: list[str], b: list[str]) -> bool:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))

    def perm(a: list[str], b: list[str]) -> bool:
        left = list(b)
        for x in a:
            hit = next((i for i, y in enumerate(left) if same(x, y)), None)
            if hit is None:
                return False
            left.pop(hit)
        return len(a) == len(b)

    if len(G) == 1 and all(perm(G[0], p) for p in P) and any(eq(G[0], p) for p in P):
        return "correct", "every ordering of the gold tuple"
    if len(P) == 1 and all(perm(G[0], g) for g in G) and any(eq(g, P[0]) for g in G):
        return "correct", "one of the gold's orderings"
    left = list(P)
    for g in G:
        hit = next((i for i, p in enumerate(left) if eq(g, p)), None)
        if hit is None:
            return "wrong", f"element gold tuple ({', '.join(g)}) not found"
        left.pop(hit)
    if left:
        return "wrong", f"{len(P)} elements, gold has {len(G)}"
    return "correct", ""


# ------------------------------------------------------------------ other scripts and wrappers

_TEXT_WRAP = re.compile(r"\\(?:text|textrm|mathrm|mbox|textbf)\s*\{(.*)\}", re.S)


_VULGAR = {"½": (1, 2), "⅓": (1, 3), "⅔": (2, 3), "¼": (1, 4), "¾": (3, 4), "⅕": (1, 5), "⅖": (2, 5), "⅗": (3, 5),
           "⅘": (4, 5), "⅙": (1, 6), "⅚": (5, 6), "⅐": (1, 7), "⅛": (1, 8), "⅜": (3, 8), "⅝": (5, 8), "⅞": (7, 8),
           "⅑": (1, 9), "⅒": (1, 10)}
_SUPER = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺", "0123456789-+")
_UNICODE_OPS = {"×": "\\times ", "÷": "\\div ", "·": "\\cdot ", "⋅": "\\cdot ", "∞": "\\infty ", "≤": "\\le ",
                "≥": "\\ge ", "≠": "\\ne "}


def _unicode_math(s: str) -> str:
    """Unicode math as LaTeX: `½` -> `\\frac{1}{2}`, `2²` -> `2^{2}`, `√2` -> `\\sqrt{2}`, `×` -> `\\times`."""
    if s.isascii():
        return s
    for ch, (a, b) in _VULGAR.items():
        s = s.replace(ch, f"\\frac{{{a}}}{{{b}}}")
    s = re.sub(r"[⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺]+", lambda m: "^{" + m.group(0).translate(_SUPER) + "}", s)
    s = re.sub(r"√\s*(\d+(?:\.\d+)?|[a-zA-Z]|\([^()]*\)|\{[^{}]*\})",
               lambda m: "\\sqrt{" + m.group(1).strip("(){}") + "}", s)
    for ch, tex in _UNICODE_OPS.items():
        s = s.replace(ch, tex)
    return s


def plain_form(s: str) -> str:
    """ASCII forms of full-width characters and Unicode math (`½`, `²`, `√`, `×`) as LaTeX; a whole
    answer wrapped in `\\text{…}` around math or a number (`\\text{-\\dfrac{1}{4}}`, `\\text{45^\\circ}`,
    `\\text{5 apples}`) is its content."""
    s = _unicode_math(ascii_forms(s)).strip()
    m = _TEXT_WRAP.fullmatch(s)
    if m and find_boxed("\\boxed{" + m.group(1) + "}") == [m.group(1).strip()] and re.search(r"[\\^_\d]", m.group(1)):
        s = m.group(1).strip()
    return s
