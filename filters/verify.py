"""Answer verification: does a chain's final answer match the gold? (math-verify + type-aware wrappers)

    from filters.verify import verify_response
    verify_response("<think>...</think> The answer is $\\boxed{\\frac{1}{2}}$", {"answer": "0.5",
                    "answer_type": "number"}).verdict        # -> "correct"

Verdicts, kept apart on purpose (an unverifiable gold is not a wrong chain):
`correct`, `wrong`, `no_answer` (nothing extractable), `gold_unparsable` (the gold does not parse, or was
damaged in its source: filters/equivalence.py), `timeout` (the hard deadline hit, or the check's worker
died: memory limit, crash; `detail` says which), `truncated` (evidence that the chain was cut off:
filters/formats.py, filters/extract.py).

`check_answer` decides in this order: identical answers (after spelling normalisation) are equal; clock
times compare as times; a damaged gold is `gold_unparsable`; an assignment prefix only one side carries is
dropped; lists of ordered tuples compare as multisets of tuples ("(a,b) or (b,a)" included); then the
type-aware check picked from `VERIFIERS`, an explicit dict keyed on the problem's `answer_type`; and
where that finds no definite difference, bare math-verify on the two `$…$`-wrapped answers as a second
route, so a verdict is never below math-verify's own. The type-aware checks wrap math-verify 0.9
(`parse` / `verify(gold, target)`, gold first) and fix what it gets wrong by default:
currency (`\\$10` does not parse), percentages (`6.17\\%` vs `6.17`), bare letter golds (need string
extraction), ordered tuples (a bare `1, 2, 3` parses to a *set*), relations vs intervals (`x>2` vs
`(2,\\infty)`), intervals vs sets (`(1,2)` equals `\\{1,2\\}` to math-verify), equations (compared
as whole equations, not by right-hand side), thousands separators and decimal commas, units, and rounded
decimals (`0.67` for `2/3`, also inside tuples, matrices and interval ends). A definite difference
(order, element count, interval kind, matrix shape, another option) is never overturned by the second
route: math-verify's known false "equal"s (subsets, permutations) stay wrong.
The checks run inside a `filters.deadline.DeadlinePool`
worker process, so math-verify's own signal timeouts are switched off and the pool enforces a hard
deadline instead; `verify_response` uses one process-wide pool, the filter stage one pool per actor.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import Field

from filters import equivalence as eqv
from filters.equivalence import rounded_equal
from filters.extract import choice_letter, clean_answer, extract, split_chain, truncation
from pipeline.config import StageConfig

log = logging.getLogger(__name__)

VERDICTS = ("correct", "wrong", "no_answer", "gold_unparsable", "timeout", "truncated")


class VerifyConfig(StageConfig):
    timeout_s: float = Field(5.0, gt=0, description="hard deadline per answer check, in seconds")
    memory_mb: int | None = Field(
        4096, ge=256, description="address-space limit of a check worker (a runaway sympy allocation dies, not the host)"
    )
    float_rounding: int = Field(6, ge=0, description="decimal places numbers are rounded to before comparing")
    percent_either_way: bool = Field(
        True, description="a number with % equals the same number without it, or a hundredth of it"
    )
    starts_in_think: bool = Field(
        False, description="verify_response: the text starts inside <think> (template added it to the prompt)"
    )


@dataclass(frozen=True)
class VerifyResult:
    pred_answer: str | None
    verdict: str
    detail: str = ""


# ------------------------------------------------------------------ parsing helpers (run in the worker)


def _mv():
    import math_verify

    return math_verify


@lru_cache(maxsize=8192)
def _parse(s: str) -> tuple:
    """Sympy objects math-verify reads from `s` (LaTeX in a math env first, then plain expressions)."""
    mv = _mv()
    if not s.strip():
        return ()
    cfg = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    out = mv.parse(f"${s}$", extraction_config=cfg, fallback_mode="no_fallback", parsing_timeout=None)
    if not out:
        out = mv.parse(s, extraction_config=cfg, fallback_mode="no_fallback", parsing_timeout=None)
    return tuple(x for x in out if not isinstance(x, str))


def warmup() -> None:
    """Import sympy/math-verify and parse once (a check worker calls this before taking tasks)."""
    _parse("\\frac{1}{2}")
    _eq(_parse("1")[0], _parse("1")[0], {})


def _eq(gold: Any, pred: Any, opts: dict) -> bool:
    if _mv().verify(gold, pred, float_rounding=opts.get("float_rounding", 6), timeout_seconds=None):
        return True
    # 0.67 for 2/3: the digits each side was written with come from check_answer (`_dec`)
    g_dec, p_dec = opts.get("_dec", (0, 0))
    return (g_dec or p_dec) > 0 and rounded_equal(gold, pred, g_dec, p_dec)


_CURRENCY = re.compile(r"\\\$|\$|US\s*\\?\$|\bUSD\b|€|£|¥|\\euro|\\pounds|\b(?:dollars?|euros?|cents?)\b", re.I)
_PERCENT = re.compile(r"\\%|%|\\percent|\bpercent\b", re.I)
_DEGREE = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree|\bdegrees?\b", re.I)
_TEXT_UNIT = re.compile(r"(?:\\(?:text|mathrm|mbox|textrm|operatorname)\s*\{[^{}]*\}(?:\^\{?\d\}?)?\s*)+$")
# A trailing unit: letter words after a number ("5 cm", "3 hours", "5 m^2"), never a tail with other digits
# ("3 hours 20 minutes") or a conjunction ("5 and 6", "2 or 3"); a one-letter word only after a space ("3x").
_UNIT_WORD = r"[a-zA-Z]+(?:\^\{?[23]\}?)?(?:/[a-zA-Z]+(?:\^\{?[23]\}?)?)?"
_WORD_UNIT = re.compile(
    rf"(?<=[\d}}])(?:\s+|(?=[a-zA-Z]{{2}}))(?![eE][-+]?\d+$)(?!.*\b(?:and|or|to)\b)"
    rf"{_UNIT_WORD}(?:\s+{_UNIT_WORD})*$",
    re.I,
)
_LATEX_SPACE = re.compile(r"\\[,;:! ]|\\q?quad|~")


def _strip_number(s: str, other: str = "") -> tuple[str, bool]:
    """A number answer without currency, units and spacing; and whether it carried a percent sign."""
    s = clean_answer(s)
    # "1{,}000" groups thousands; "3{,}5" is a decimal comma
    s = re.sub(r"(?<=\d)\{,\}(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"(?<=\d)\{,\}(?=\d)", ".", s).replace("{,}", "")
    s = s.replace("\\left", "").replace("\\right", "")
    pct = bool(_PERCENT.search(s))
    s = _PERCENT.sub("", s)
    s = _CURRENCY.sub("", s)
    s = _DEGREE.sub("", s)
    s = _TEXT_UNIT.sub("", s.strip())
    s = _LATEX_SPACE.sub("", s).strip()
    if re.search(r"\d", s):
        s = _WORD_UNIT.sub("", s).strip()
    s = re.sub(r"^[a-zA-Z]\w*\s*=\s*", "", s)  # "r = 6.17" -> "6.17"
    s = eqv.number_text(s, other)
    # math-verify reads "1e5" as 1*E*5 (Euler's number): write scientific notation out
    s = re.sub(r"^([-+]?\d+(?:\.\d+)?)[eE]([-+]?\d+)$", r"\1\\times 10^{\2}", s)
    return s, pct


def _first(objs: tuple) -> Any:
    return objs[0] if objs else None


# ------------------------------------------------------------------ the type-aware checks


class _GoldUnparsable(Exception):
    pass


def _gold(s: str) -> tuple:
    objs = _parse(s)
    if not objs:
        raise _GoldUnparsable(f"gold {s[:80]!r} does not parse")
    return objs


def _check_number(pred: str, gold: str, choices: Any, opts: dict) -> tuple[str, str]:
    g_s, g_pct = _strip_number(gold, _strip_number(pred)[0])
    G = _first(_gold(g_s))
    p_s, p_pct = _strip_number(pred, g_s)
    P = _first(_parse(p_s))
    if P is None:
        return "wrong", f"prediction {p_s[:80]!r} does not parse"
    pairs = [(G, P)]
    if opts.get("percent_either_way", True) and g_pct != p_pct:
        pairs += [(G / 100, P)] if g_pct else [(G, P / 100)]
    return ("correct", "") if any(_eq(g, p, opts) for g, p in pairs) else ("wrong", "")


def _is_eq(x: Any) -> bool:
    import sympy

    return isinstance(x, sympy.Eq)


def _equations_equal(g: Any, p: Any, opts: dict) -> bool:
    """Two equations are equal when both sides match, or (for implicit forms) lhs-rhs differ by a factor."""
    import sympy

    if g.lhs.is_Symbol and p.lhs.is_Symbol:
        return g.lhs == p.lhs and _eq(g.rhs, p.rhs, opts)
    dg, dp = sympy.expand(g.lhs - g.rhs), sympy.expand(p.lhs - p.rhs)
    if dp == 0:
        return dg == 0
    ratio = sympy.simplify(dg / dp)
    return bool(ratio.is_number and ratio != 0)


def _check_expression(pred: str, gold: str, choices: Any, opts: dict) -> tuple[str, str]:
    G = _gold(clean_answer(gold))
    P = _parse(clean_answer(pred))
    if not P:
        return "wrong", f"prediction {pred[:80]!r} does not parse"
    if _is_eq(G[0]) and _is_eq(P[0]) and not (eqv.membership(G[0]) or eqv.membership(P[0])):
        return ("correct", "") if _equations_equal(G[0], P[0], opts) else ("wrong", "equations differ")
    if eqv.is_relation(G[0]) or eqv.is_relation(P[0]):
        # `y \le 2`, `t \in [0,3]` vs `0 \le t \le 3`: the same set of the same variable
        gs, ps = _as_set(G[0]), _as_set(P[0])
        if gs is not None and ps is not None:
            gv, pv = G[0].free_symbols, P[0].free_symbols
            if gv and pv and gv != pv:
                return "wrong", "relations differ: other variable"
            return ("correct", "") if eqv.sets_equal(gs, ps, lambda a, b: _eq(a, b, opts)) else ("wrong", "relations differ")
    # a list compare first (several parsed readings), then the first readings (rounded decimals)
    return ("correct", "") if _eq(list(G), list(P), opts) or _eq(G[0], P[0], opts) else ("wrong", "")


def _as_set(x: Any) -> Any:
    """An interval-like answer as a sympy Set: relations (`x>2`, `1<x<=3`) via as_set, `x \\in S` via S."""
    import sympy

    rel = (sympy.core.relational.Relational, sympy.And, sympy.Or)
    if isinstance(x, sympy.FiniteSet) and x.args and all(isinstance(a, rel) for a in x.args):
        # "x<2 or x>3" parses to a set of relations: the answer is their union
        if len(x.free_symbols) == 1:
            return sympy.Union(*(a.as_set() for a in x.args))
    if isinstance(x, sympy.Set):
        return x
    if isinstance(x, sympy.Eq) and isinstance(x.rhs, sympy.Set):
        return x.rhs
    if isinstance(x, rel) and len(x.free_symbols) == 1:
        return x.as_set()
    return None


def _check_interval(pred: str, gold: str, choices: Any, opts: dict) -> tuple[str, str]:
    import sympy

    G = _as_set(_first(_gold(clean_answer(gold))))
    if G is None:
        raise _GoldUnparsable(f"gold {gold[:80]!r} is not an interval")
    P = _as_set(_first(_parse(clean_answer(pred))))
    if P is None:
        return "wrong", f"prediction {pred[:80]!r} is not an interval"
    if G == P:
        return "correct", ""
    # intervals and sets are different objects even when math-verify's loose comparison says otherwise
    kinds = (sympy.Interval, sympy.Union, sympy.FiniteSet)
    if not any(isinstance(G, k) and isinstance(P, k) for k in kinds):
        return "wrong", f"{type(G).__name__} vs {type(P).__name__}"
    if isinstance(G, sympy.Union) and len(G.args) != len(P.args):
        return "wrong", "different number of pieces"
    return ("correct", "") if eqv.sets_equal(G, P, lambda a, b: _eq(a, b, opts)) else ("wrong", "different set")


_OPEN_CLOSE = [("\\left\\{", "\\right\\}"), ("\\{", "\\}"), ("\\left(", "\\right)"), ("\\left[", "\\right]"),
               ("\\left\\langle", "\\right\\rangle"), ("\\langle", "\\rangle"), ("(", ")"), ("[", "]"), ("{", "}")]
_ASSIGN = re.compile(r"^\s*[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*")


def _split_elements(s: str) -> list[str]:
    """Top-level elements of `(a, b, c)`, `\\{a, b\\}`, `a, b` or `x=1 or x=2`."""
    s = clean_answer(s).strip()
    for a, b in _OPEN_CLOSE:
        if s.startswith(a) and s.endswith(b):
            inner = s[len(a) : len(s) - len(b)]
            if _balanced(inner):
                s = inner
                break
    s = re.sub(r"\\text\{\s*(or|and)\s*\}|\s+(?:or|and)\s+", ",", s)
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch in ",;" and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    out = []
    for p in (_ASSIGN.sub("", p).strip() for p in parts if p.strip()):
        pm = re.match(r"^(.*?)(?:\\pm|±)\s*(.+)$", p)
        out += [f"{pm.group(1)}-{pm.group(2)}", f"{pm.group(1)}+{pm.group(2)}"] if pm else [p]  # "\pm 2": two
    return out


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth < 0:
            return False
    return depth == 0


def _parse_elements(s: str, is_gold: bool) -> list[Any] | None:
    out = []
    for el in _split_elements(s):
        objs = _parse(el)
        if not objs:
            if is_gold:
                raise _GoldUnparsable(f"gold element {el[:60]!r} does not parse")
            return None
        out.append(objs[0])
    if not out and is_gold:
        raise _GoldUnparsable(f"gold {s[:80]!r} has no elements")
    return out


def _elements(pred: str, gold: str) -> tuple[list, list] | tuple[str, str]:
    """(gold elements, predicted elements), or a ("wrong", why) verdict when they cannot pair up."""
    G = _parse_elements(gold, True)
    P = _parse_elements(pred, False)
    if P is None:
        return "wrong", "prediction does not parse"
    if len(G) != len(P):
        return "wrong", f"{len(P)} elements, gold has {len(G)}"
    return G, P


def _check_set(pred: str, gold: str, choices: Any, opts: dict) -> tuple[str, str]:
    G, P = _elements(pred, gold)
    if isinstance(G, str):
        return G, P
    unmatched = list(P)
    for g in G:  # exact multiset match: every gold element pairs with its own predicted element
        hit = next((i for i, p in enumerate(unmatched) if _eq(g, p, opts)), None)
        if hit is None:
            return "wrong", f"gold element {g} not found"
        unmatched.pop(hit)
    return "correct", ""


def _check_tuple(pred: str, gold: str, choices: Any, opts: dict) -> tuple[str, str]:
    G, P = _elements(pred, gold)
    if isinstance(G, str):
        return G, P
    for i, (g, p) in enumerate(zip(G, P, strict=True)):
        if not _eq(g, p, opts):
            return "wrong", f"element {i} differs"
    return "correct", ""


def _check_matrix(pred: str, gold: str, choices: Any, opts: dict) -> tuple[str, str]:
    import sympy

    G = _first(_gold(clean_answer(gold)))
    P = _first(_parse(clean_answer(pred)))
    if P is None:
        return "wrong", "prediction does not parse"
    if isinstance(G, sympy.MatrixBase) and isinstance(P, sympy.MatrixBase):
        if G.shape != P.shape:
            return "wrong", f"shape {P.shape} vs {G.shape}"
        ok = all(_eq(g, p, opts) for g, p in zip(G, P, strict=True))
        return ("correct", "") if ok else ("wrong", "")
    return ("correct", "") if _eq(G, P, opts) else ("wrong", "")


def _norm_text(s: str) -> str:
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", clean_answer(s))
    s = re.sub(r"[^\w\s.-]", " ", s.lower())
    s = re.sub(r"\b(?:the|a|an)\b", " ", s)
    return " ".join(s.split()).strip(" .")


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", clean_answer(s)).replace("\\dfrac", "\\frac").replace("\\left", "").replace("\\right", "")


def _match_option(text: str, choices: list[str], opts: dict) -> str | None:
    """The letter of the one option `text` names: exact text, then loose text, then mathematical equality.

    Each step must single out one option; loose text alone can merge options ("-g(x+2)" and "-g(x)+2").
    """
    for same in (lambda c: _squash(c) == _squash(text), lambda c: _norm_text(c) == _norm_text(text)):
        hits = [i for i, c in enumerate(choices) if same(c)]
        if len(hits) == 1:
            return chr(65 + hits[0])
        if len(hits) > 1:
            break
    P = _parse(clean_answer(text))
    if not P:
        return None
    hits = []
    for i, c in enumerate(choices):
        C = _parse(clean_answer(c))
        if C and _eq(list(C), list(P), opts):
            hits.append(i)
    return chr(65 + hits[0]) if len(hits) == 1 else None


def _check_choice(pred: str, gold: str, choices: Any, opts: dict) -> tuple[str, str]:
    choices = list(choices or [])
    n = len(choices) or None
    g = choice_letter(gold, n)
    if g is None and choices:
        g = _match_option(gold, choices, opts)
    if g is None:
        raise _GoldUnparsable(f"gold {gold[:40]!r} is neither an option letter nor an option text")
    p = choice_letter(pred, n)
    if p is None and choices:
        p = _match_option(pred, choices, opts)  # the option text instead of its letter
    if p is None:
        return "wrong", f"{pred[:40]!r} names no single option"
    return ("correct", "") if p == g else ("wrong", f"chose {p}, gold {g}")


def _check_text(pred: str, gold: str, choices: Any, opts: dict) -> tuple[str, str]:
    if not _norm_text(gold):
        raise _GoldUnparsable("empty gold")
    if _norm_text(pred) == _norm_text(gold):
        return "correct", ""
    G, P = _parse(clean_answer(gold)), _parse(clean_answer(pred))
    return ("correct", "") if G and P and (_eq(list(G), list(P), opts) or _eq(G[0], P[0], opts)) else ("wrong", "")


VERIFIERS = {
    "number": _check_number,
    "expression": _check_expression,
    "interval": _check_interval,
    "set": _check_set,
    "tuple": _check_tuple,
    "matrix": _check_matrix,
    "choice": _check_choice,
    "text": _check_text,
}


_BARE_LETTER = re.compile(r"\(?[A-H]\)?")


# a "wrong" the type-aware check is sure of: math-verify's looser reading (subsets accepted, tuples read
# as sets, equations compared by right-hand side, intervals equal to sets) must not overturn it
_DEFINITE = re.compile(
    r"^(?:element|\d+ elements|gold element|different (?:number|set)|shape|chose|equations differ|relations differ|"
    r"\w+ vs \w+)"
)


def _mv_equal(pred: str, gold: str, opts: dict) -> bool:
    """Bare math-verify on the two answers, each wrapped in `$…$` (the route any filter must match)."""
    G, P = _parse(gold), _parse(pred)
    return bool(G and P and _eq(list(G), list(P), opts))


def _same_element(g: str, p: str, opts: dict) -> bool:
    if eqv.identical(p, g):
        return True
    gs, ps = _strip_number(g, _strip_number(p)[0])[0], _strip_number(p, _strip_number(g)[0])[0]
    G, P = _first(_parse(gs)), _first(_parse(ps))
    return G is not None and P is not None and _eq(G, P, opts)


def _mv_extract(tail: str) -> str | None:
    """The answer math-verify's own extraction reads from a text (boxed first, then the last math)."""
    mv = _mv()
    cfg = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    out = mv.parse(tail, extraction_config=cfg, parsing_timeout=None)
    strings = [x for x in out if isinstance(x, str)]
    return strings[-1] if len(out) > 1 and strings else None


def check_answer(
    pred: str | None, gold: str, answer_type: str | None, choices: Any, opts: dict, tail: str | None = None
) -> tuple:
    """(verdict, detail) for one extracted answer; runs inside a deadline worker (no timeout of its own).

    With no `pred` but a `tail`, math-verify extracts the answer from it: (verdict, detail, answer).

    Identical answers are equal; a damaged gold is `gold_unparsable`; then the type-aware check, and
    where it finds no definite difference, bare math-verify (`$…$`-wrapped) as a second route, so a
    verdict is never "wrong" where math-verify alone would say "correct" (except its known false ones).
    """
    if not pred:
        used = _mv_extract(tail) if tail else None
        if not used:
            return "no_answer", "nothing extractable", None
        return (*check_answer(used, gold, answer_type, choices, opts), used)
    pred, gold = eqv.plain_form(str(pred)), eqv.plain_form(str(gold or ""))
    if eqv.identical(pred, gold):
        return "correct", "identical"
    clock = eqv.clock_time(gold)
    if clock is not None:  # math-verify reads "9:30" as the ratio 3/10 (equal to "3:10")
        return ("correct", "same time") if eqv.same_time(clock, eqv.clock_time(pred)) else ("wrong", "different time")
    fn = VERIFIERS.get(answer_type or "expression", _check_expression)
    if answer_type == "choice" or _BARE_LETTER.fullmatch(gold.strip()):
        # a bare option letter as gold ("B"), with or without the option texts, is a choice question
        try:
            return _check_choice(pred, gold, choices, opts)
        except _GoldUnparsable as e:
            return "gold_unparsable", str(e)
    damaged = eqv.damaged_gold(gold)
    if damaged:
        return "gold_unparsable", damaged
    p, g = eqv.drop_assignment(pred, gold)
    opts = {**opts, "_dec": (eqv.decimals(g), eqv.decimals(p))}
    listed = eqv.compare_tuple_lists(p, g, lambda a, b: _same_element(a, b, opts))
    if listed is not None:
        return listed
    try:
        verdict, detail = fn(p, g, choices, opts)
    except _GoldUnparsable as e:
        verdict, detail = "gold_unparsable", str(e)
    if verdict == "correct" or (verdict == "wrong" and _DEFINITE.match(detail)):
        return verdict, detail
    if _mv_equal(p, g, opts) or (p, g) != (pred, gold) and _mv_equal(pred, gold, opts):
        return "correct", "math-verify"
    return verdict, detail


# ------------------------------------------------------------------ public API


def _opts(cfg: VerifyConfig) -> dict:
    return {"float_rounding": cfg.float_rounding, "percent_either_way": cfg.percent_either_way}


def check_many(items: list[tuple], cfg: VerifyConfig, pool: Any) -> list[tuple[str, str, float, str | None]]:
    """(verdict, detail, seconds, answer checked) per (pred_answer, problem[, tail]) item, through `pool`
    (a DeadlinePool). With no pred_answer, math-verify's own extraction reads `tail`."""
    opts = _opts(cfg)
    tasks = []
    for item in items:
        pred, p = item[0], item[1]
        tail = item[2] if len(item) > 2 else None
        choices = list(p.get("choices") or []) or None
        tasks.append((pred, str(p.get("answer") or ""), p.get("answer_type"), choices, opts, tail))
    out = []
    for (pred, *_rest), o in zip(tasks, pool.map(tasks), strict=True):
        used = pred
        if o.ok:
            verdict, detail = o.value[:2]
            if len(o.value) > 2:
                used = o.value[2]
        elif o.timed_out:
            verdict, detail = "timeout", f"no result within {cfg.timeout_s:g}s"
        else:
            verdict, detail = "timeout", f"check failed: {o.error}"
        out.append((verdict, detail, round(o.seconds, 4), used))
    return out


_POOL = None
_POOL_KEY: tuple | None = None
_POOL_LOCK = threading.Lock()


def shared_pool(cfg: VerifyConfig) -> Any:
    """The process-wide check pool (one worker), re-created when the deadline or memory limit changes."""
    global _POOL, _POOL_KEY
    from filters.deadline import DeadlinePool

    key = (cfg.timeout_s, cfg.memory_mb)
    with _POOL_LOCK:
        if _POOL is None or _POOL_KEY != key:
            if _POOL is not None:
                _POOL.close()
            _POOL = DeadlinePool(check_answer, workers=1, timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb)
            _POOL_KEY = key
        return _POOL


@atexit.register
def _close_shared_pool() -> None:
    if _POOL is not None:
        _POOL.close()


def check_shared(items: list[tuple], cfg: VerifyConfig) -> list[tuple[str, str, float, str | None]]:
    """check_many through the process-wide pool (serialised: its workers are not re-entrant)."""
    pool = shared_pool(cfg)
    with _POOL_LOCK:
        return check_many(items, cfg, pool)


def verify_response(response: str, problem: dict, cfg: VerifyConfig | None = None, pool: Any = None) -> VerifyResult:
    """Verify one model output against `problem` (`answer`, `answer_type`, optional `choices`).

    `response` may be the whole completion (`<think>…</think>answer`, Sky-T1 markers) or just the answer
    part. Thread-safe and usable inside Ray actors: the sympy work runs in a deadline worker process.
    """
    cfg = cfg or VerifyConfig()
    split = split_chain(response, cfg.starts_in_think)
    found = extract(split.response, problem.get("answer_type"), str(problem.get("answer") or ""),
                    list(problem.get("choices") or []) or None)
    cut = truncation(split, found)
    if cut:
        return VerifyResult(None, "truncated", cut)
    if found is None:
        return VerifyResult(None, "no_answer", "")
    pool = pool or shared_pool(cfg)
    # the shared pool serves one caller at a time (its workers are not re-entrant)
    with _POOL_LOCK if pool is _POOL else contextlib.nullcontext():
        verdict, detail, _s, _used = check_many([(found.answer, problem)], cfg, pool)[0]
    return VerifyResult(found.answer, verdict, detail)
