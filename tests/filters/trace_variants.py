"""Traces as other teams hand them over: traces-dev and MATH-V rewritten into other record shapes, reasoning
markers and answer styles, each row with the verdict it must get (its true label, known by construction).

Truth: the traces-dev chains whose verdict the source's own label confirms (the filter says correct or wrong
on the original trace and the source agrees), so a rewrite of the answer's *form* keeps the label. MATH-V
rows are built from the gold itself (a right answer) and from another option / another number (a wrong one).

`variant_classes(traces, mathv)` -> {class: Variant}; each Variant holds JSONL records, the `columns` map a
user would write for them, the true verdict per record, and the text bare math-verify reads from it.
Used by tests/filters/test_trace_variants.py and benchmarks/filter.py (agreement per class).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from filters.extract import find_boxed_spans, split_chain

BASE_COLS = {"question": "problem", "answer": "gold_answer", "trace": "trace", "id": "id"}


NOT_CORRECT = "not_correct"  # a truth label: any verdict but correct (the chain must be dropped)


def matches(verdict: str, truth: str) -> bool:
    return verdict != "correct" if truth == NOT_CORRECT else verdict == truth


@dataclass
class Variant:
    records: list[dict]
    truth: list[str]  # "correct" / "wrong" / "truncated" / NOT_CORRECT per record
    bare_text: list[str]  # what a bare math-verify user parses (the assistant's text)
    golds: list[str]
    columns: dict = field(default_factory=lambda: dict(BASE_COLS))


def clean_traces(traces: list[dict], verdicts: list[str]) -> list[dict]:
    """Traces whose original filter verdict (correct / wrong) the source's label confirms, with the
    parts of each: reasoning, response, the boxed answer and the response without its boxes."""
    out = []
    for s, v in zip(traces, verdicts, strict=True):
        if v not in ("correct", "wrong") or (v == "correct") != bool(s["source_is_correct"]):
            continue
        sp = split_chain(s["trace"])
        spans = find_boxed_spans(sp.response)
        if not spans or not sp.reasoning:
            continue
        out.append({**s, "_r": sp.reasoning, "_a": sp.response, "_x": spans[-1][0], "_truth": v})
    return out


def _unboxed(a: str) -> str:
    """The response without its boxed paragraphs (the answer is then written in the variant's style)."""
    paras = [p for p in re.split(r"\n\s*\n", a) if "\\boxed" not in p and "\\fbox" not in p]
    return "\n\n".join(paras).strip()


def _thousands(x: str, sep: str = ",") -> str:
    m = re.fullmatch(r"(-?)(\d{4,})", x)
    if not m:
        return x
    d = m.group(2)
    groups = []
    while d:
        groups.insert(0, d[-3:])
        d = d[:-3]
    return m.group(1) + sep.join(groups)


_FULLWIDTH = str.maketrans("0123456789-", "０１２３４５６７８９－")

# answer styles: the final-answer line after the response's other paragraphs
STYLES = {
    "final_colon": lambda x: f"Final answer: {x}",
    "final_dollar": lambda x: f"Final Answer: ${x}$",
    "bold_answer": lambda x: f"**Answer:** {x}",
    "bold_value": lambda x: f"The answer is **{x}**.",
    "answer_is_math": lambda x: f"The answer is ${x}$.",
    "answer_caps": lambda x: f"ANSWER: {x}",
    "json_tail": lambda x: json.dumps({"answer": x}),
    "json_answer_first": lambda x: json.dumps({"answer": x, "explanation": "the computation above, checked by substituting back"}),
    "json_fenced": lambda x: "```json\n" + json.dumps({"reasoning": "see above", "answer": x}) + "\n```",
    "boxed_text": lambda x: f"$\\boxed{{\\text{{{x}}}}}$",
    "boxed_units": lambda x: f"$\\boxed{{{x}\\ \\text{{units}}}}$",
    "boxed_then_final": lambda x: f"At first I had $\\boxed{{{x}1}}$, but that misreads the question. So the final answer is $\\boxed{{{x}}}$.",
    "thousands": lambda x: f"The answer is $\\boxed{{{_thousands(x)}}}$.",
    "thousands_thin": lambda x: f"The answer is $\\boxed{{{_thousands(x, chr(92) + ',')}}}$.",
    "unicode_minus": lambda x: f"The answer is {x.replace('-', '−')}.",
    "fullwidth": lambda x: f"答案：{x.translate(_FULLWIDTH)}",
    "no_marker_last_line": lambda x: f"Therefore, the result is {x}.",
    "minerva": lambda x: f"Final Answer: The final answer is ${x}$. I hope it is correct.",
    "answer_then_explanation": lambda x: f"**Answer:** {x}\n\nThis follows from the computation above, since every step was checked twice.",
    "boxed_then_plain_final": lambda x: f"Tentatively $\\boxed{{{x}1}}$. Checking again, that was an arithmetic slip.\n\nFinal answer: {x}",
    "answer_tag_xml": lambda x: f"<answer>{x}</answer>",
    "im_end_token": lambda x: f"The answer is $\\boxed{{{x}}}$.<|im_end|>",
}

# reasoning markers: (open, close) around the reasoning, the answer after it
MARKERS = {
    "tag_reasoning": ("<reasoning>", "</reasoning>"),
    "tag_thought": ("<thought>", "</thought>"),
    "tag_thinking": ("<thinking>", "</thinking>"),
    "kimi_think": ("◁think▷", "◁/think▷"),
    "think_upper": ("<THINK>", "</THINK>"),
    "seed_think": ("<seed:think>", "</seed:think>"),
}


def _plan_cut(r: str) -> str | None:
    """The reasoning up to the end of the first "Wait, …" / "Let me …" sentence past its middle; None where
    the text just before it already states an answer ("… is 88572. Wait, let me make sure"): its truth is open."""
    m = re.compile(r"(?:(?<=\n)|(?<=[.!?] ))(?:Wait|Let me|Hmm|Maybe I)\b[^.!?\n]{5,200}[.!?](?=\s)").search(r, len(r) // 2)
    if m is None:
        return None
    para = r[max(0, m.start() - 400) : m.start()]
    return None if re.search(r"answer|\\boxed|\bis \$?-?\d", para, re.I) else r[: m.end()]


def _trace_rows(clean: list[dict], name: str, make) -> Variant:
    recs, truth, bare_text, golds = [], [], [], []
    for s in clean:
        rec, text = make(s)
        recs.append({"id": s["id"], "problem": s["problem"], "gold_answer": s["gold_answer"], **rec})
        truth.append(s["_truth"])
        bare_text.append(text)
        golds.append(s["gold_answer"])
    return Variant(recs, truth, bare_text, golds)


def trace_classes(clean: list[dict]) -> dict[str, Variant]:
    out: dict[str, Variant] = {}
    for name, style in STYLES.items():
        def make(s, style=style):
            a = _unboxed(s["_a"])
            text = f"<think>\n{s['_r']}\n</think>\n\n{a}\n\n{style(s['_x'])}".replace("\n\n\n\n", "\n\n")
            return {"trace": text}, text
        out[f"style:{name}"] = _trace_rows(clean, name, make)
    for name, (o, c) in MARKERS.items():
        def make(s, o=o, c=c):
            text = f"{o}\n{s['_r']}\n{c}\n\n{s['_a']}"
            return {"trace": text}, text
        out[f"marker:{name}"] = _trace_rows(clean, name, make)

    def crlf(s):
        text = f"<think>\n{s['_r']}\n</think>\n\n{s['_a']}".replace("\n", "\r\n")
        return {"trace": text}, text
    out["text:crlf"] = _trace_rows(clean, "crlf", crlf)

    def bom_nbsp(s):
        text = "\ufeff" + f"<think>\n{s['_r']}\n</think>\n\n{s['_a']}".replace(" ", "\u00a0")
        return {"trace": text}, text
    out["text:nbsp"] = _trace_rows(clean, "nbsp", bom_nbsp)

    # record shapes
    def openai(s):
        text = f"<think>\n{s['_r']}\n</think>\n\n{s['_a']}"
        return {"messages": [{"role": "system", "content": "Reason step by step."},
                             {"role": "user", "content": s["problem"]},
                             {"role": "assistant", "content": text}]}, text
    v = _trace_rows(clean, "openai", openai)
    v.columns = {**BASE_COLS, "trace": "messages"}
    out["record:openai_messages"] = v

    def sharegpt(s):
        text = f"<think>\n{s['_r']}\n</think>\n\n{s['_a']}"
        return {"conversations": [{"from": "human", "value": s["problem"]}, {"from": "gpt", "value": text}]}, text
    v = _trace_rows(clean, "sharegpt", sharegpt)
    v.columns = {"question": "problem", "answer": "gold_answer", "trace": "conversations", "id": "id"}
    for r in v.records:  # ShareGPT files carry the question only in the conversation
        del r["problem"]
    v.columns["question"] = "conversations"
    out["record:sharegpt"] = v

    def reasoning_field(s):
        return {"reasoning_content": s["_r"], "content": s["_a"]}, s["_a"]
    v = _trace_rows(clean, "reasoning_content", reasoning_field)
    v.columns = {**BASE_COLS, "trace": "content", "reasoning": "reasoning_content"}
    out["record:reasoning_content"] = v

    def openai_reasoning(s):
        return {"messages": [{"role": "user", "content": s["problem"]},
                             {"role": "assistant", "content": s["_a"], "reasoning_content": s["_r"]}]}, s["_a"]
    v = _trace_rows(clean, "openai_reasoning", openai_reasoning)
    v.columns = {**BASE_COLS, "trace": "messages"}
    out["record:openai_reasoning_content"] = v

    def api_response(s):
        return {"response": {"id": "cmpl-1", "object": "chat.completion", "choices": [
            {"index": 0, "finish_reason": "stop",
             "message": {"role": "assistant", "content": s["_a"], "reasoning_content": s["_r"]}}]}}, s["_a"]
    v = _trace_rows(clean, "api_response", api_response)
    v.columns = {**BASE_COLS, "trace": "response"}
    out["record:openai_response"] = v

    def cut_plain(s):  # reasoning only, cut mid-sentence, no end marker and no finish reason
        r = s["_r"]
        i = int(len(r) * 0.5)
        m = re.search(r"[A-Za-z]{3,} [A-Za-z]{3,} [a-z]{2,}", r[i:])
        text = r[: i + (m.end() if m else 0)]
        return {"trace": text}, text
    v = _trace_rows(clean, "cut", cut_plain)
    v.truth = ["truncated"] * len(v.truth)
    out["text:cut_no_marker"] = v

    # reasoning cut right after a sentence that announces more work ("Wait, …", "Let me …"): no marker,
    # no finish reason, a clean full stop, and still a cut chain
    recs = [s for s in clean if _plan_cut(s["_r"])]
    v = _trace_rows(recs, "cut_at_plan", lambda s: ({"trace": _plan_cut(s["_r"])}, _plan_cut(s["_r"])))
    v.truth = [NOT_CORRECT] * len(v.truth)  # cut, but a sentence end: truncated where evidence shows, else dropped
    out["text:cut_after_plan"] = v

    def cut_in_answer(s):  # the answer part cut mid-sentence before its boxed answer
        a = s["_a"]
        at = a.find("\\boxed")
        head = a[: max(0, at)]
        m = list(re.finditer(r"[A-Za-z]{3,} [A-Za-z]{3,} [a-z]{2,}", head))
        text = f"<think>\n{s['_r']}\n</think>\n\n{head[: m[-1].end()] if m else 'We now compute the'}"
        return {"trace": text}, text
    v = _trace_rows(clean, "cut_answer", cut_in_answer)
    v.truth = ["truncated"] * len(v.truth)
    out["text:cut_in_answer"] = v
    return out


# ------------------------------------------------------------------ MATH-V: choices and gold forms


def _mathy(t: str) -> bool:
    """An option text that is a formula (no `$`, no ellipsis, no words of two letters or more)."""
    return "$" not in t and "..." not in t and not re.search(r"[A-Za-z]{2,}", re.sub(r"\\[a-zA-Z]+", "", t))


def _choice_text(letter: str, options: list[str]) -> str:
    return options[ord(letter) - 65]


CHOICE_STYLES = {
    "letter_caps": lambda L, t: f"ANSWER: ({L})",
    "letter_is": lambda L, t: f"The answer is {L}.",
    "letter_bold": lambda L, t: f"**Answer:** {L}",
    "letter_boxed_paren": lambda L, t: f"$\\boxed{{({L})}}$",
    "letter_boxed_text": lambda L, t: f"$\\boxed{{\\text{{{L}}}}}$",
    "letter_boxed_with_text": lambda L, t: f"$\\boxed{{{L}. {t}}}$" if "$" not in t else f"$\\boxed{{{L}}}$",
    "letter_json": lambda L, t: json.dumps({"answer": L}),
    "option_text_boxed": lambda L, t: f"$\\boxed{{{t}}}$" if _mathy(t) else f"The answer is {t}.",
    "option_text_is": lambda L, t: f"The correct option is {t}." if not _mathy(t) else f"The correct option is ${t}$.",
    "option_word": lambda L, t: f"So I pick option {L}.",
}


def mathv_classes(mathv: list[dict]) -> dict[str, Variant]:
    """Multiple-choice MATH-V items answered in every style, right (gold) and wrong (the next option)."""
    out: dict[str, Variant] = {}
    mc = [m for m in mathv if m["question_type"] in ("multi_choice", "multiple_choice") and m.get("options")
          and len({str(o).strip() for o in m["options"]}) == len(m["options"])
          # an option whose text is another option's letter ("D. E") cannot be told from that letter
          and not any(re.fullmatch(r"[A-H]", str(o).strip()) and str(o).strip() != chr(65 + i)
                      for i, o in enumerate(m["options"]))]
    for name, style in CHOICE_STYLES.items():
        recs, truth, bare_text, golds = [], [], [], []
        for m in mc:
            opts = [str(o) for o in m["options"]]
            gold = m["gold_answer"].strip()
            other = chr(65 + (ord(gold) - 65 + 1) % len(opts))
            for letter, t in ((gold, "correct"), (other, "wrong")):
                text = (f"<think>\nLooking at the figure, I compare the options one by one.\n</think>\n\n"
                        f"Comparing the figure with each option gives the result.\n\n"
                        f"{style(letter, _choice_text(letter, opts))}")
                recs.append({"id": f"{m['id']}-{letter}", "problem": m["problem"], "gold_answer": gold,
                             "options": opts, "trace": text})
                truth.append(t)
                bare_text.append(text)
                golds.append(gold)
        out[f"choice:{name}"] = Variant(recs, truth, bare_text, golds,
                                        columns={**BASE_COLS, "choices": "options"})
    free = [m for m in mathv if not m.get("options")]
    recs, truth, bare_text, golds = [], [], [], []
    for m in free:  # the gold verbatim in a box is right; another number (or the gold with a suffix) wrong
        gold = str(m["gold_answer"]).strip()
        num = re.fullmatch(r"-?\d+(?:\.\d+)?", gold)
        other = str(int(float(gold)) + 1) if num else "0" if gold != "0" else "1"
        for pred, t in ((gold, "correct"), (other, "wrong")):
            text = f"<think>\nReading the figure.\n</think>\n\nThe answer is $\\boxed{{{pred}}}$."
            recs.append({"id": f"{m['id']}-{t}", "problem": m["problem"], "gold_answer": gold, "trace": text})
            truth.append(t)
            bare_text.append(text)
            golds.append(gold)
    out["mathv:free_form_boxed"] = Variant(recs, truth, bare_text, golds)
    return out


# gold answers in the forms other datasets write them, each with a right and a wrong boxed prediction:
# (name, gold, right prediction, wrong prediction)
GOLD_FORMS = [
    ("dfrac_vs_frac", "\\dfrac{3}{4}", "\\frac{3}{4}", "\\frac{4}{3}"),
    ("frac_short", "\\frac12", "0.5", "\\frac{1}{3}"),
    ("frac_short_pred", "\\frac{1}{2}", "\\frac12", "\\frac13"),
    ("tfrac", "\\tfrac{2}{3}", "\\frac{2}{3}", "\\frac{3}{2}"),
    ("dollar_gold", "$\\frac{5}{2}$", "2.5", "2.4"),
    ("boxed_gold", "\\boxed{12}", "12", "13"),
    ("thousands_gold", "1,000,000", "1000000", "100000"),
    ("thousands_pred", "2500", "2,500", "2,400"),
    ("thin_space_gold", "10\\,000", "10000", "1000"),
    ("percent_gold", "25\\%", "25", "20"),
    ("percent_pred", "40", "40\\%", "45\\%"),
    ("degrees_gold", "30^\\circ", "30", "60"),
    ("degrees_word", "120", "120^{\\circ}", "60^{\\circ}"),
    ("unit_gold", "5 \\text{ cm}", "5", "6"),
    ("unit_pred", "18", "18\\text{ cm}^2", "19\\text{ cm}^2"),
    ("money_gold", "\\$4.50", "4.50", "4.05"),
    ("unicode_minus_gold", "−7", "-7", "7"),
    ("unicode_minus_pred", "-7", "−7", "7"),
    ("fullwidth_gold", "１２", "12", "21"),
    ("interval", "[2, 5)", "[2,5)", "(2,5]"),
    ("interval_infty", "(-\\infty, 3]", "(-\\infty,3]", "(-\\infty,3)"),
    ("set", "\\{1, 2, 3\\}", "\\{3,2,1\\}", "\\{1,2\\}"),
    ("tuple", "(1, -2)", "(1,-2)", "(-2,1)"),
    ("sqrt", "2\\sqrt{3}", "\\sqrt{12}", "3\\sqrt{2}"),
    ("pi", "\\frac{\\pi}{3}", "\\pi/3", "\\pi/6"),
    ("nested_text", "\\text{(B)}", "B", "C"),
    ("decimal_comma_pred", "3.5", "3{,}5", "3{,}4"),
    ("sci", "3\\times10^{5}", "300000", "30000"),
    ("equation_gold", "x=4", "4", "5"),
    ("mixed_number", "2\\frac{1}{2}", "\\frac{5}{2}", "\\frac{3}{2}"),
]


def gold_form_class() -> Variant:
    recs, truth, bare_text, golds = [], [], [], []
    for i, (name, gold, right, wrong) in enumerate(GOLD_FORMS):
        for pred, t in ((right, "correct"), (wrong, "wrong")):
            text = f"<think>\nWorking it out.\n</think>\n\nSo the result follows.\n\nThe answer is $\\boxed{{{pred}}}$."
            recs.append({"id": f"{name}-{t}", "problem": f"Problem {i} ({name})", "gold_answer": gold, "trace": text})
            truth.append(t)
            bare_text.append(text)
            golds.append(gold)
    return Variant(recs, truth, bare_text, golds)


def variant_classes(clean: list[dict], mathv: list[dict] | None) -> dict[str, Variant]:
    out = trace_classes(clean)
    if mathv:
        out.update(mathv_classes(mathv))
    out["gold:forms"] = gold_form_class()
    return out


def bare_math_verify(gold: str, text: str) -> str:
    """Bare math-verify's verdict: `parse(gold)` ($-wrapped), `parse(text)`, `verify(gold, pred)`."""
    from math_verify import parse, verify

    g = parse(f"${gold}$", parsing_timeout=None)
    p = parse(text, parsing_timeout=None)
    return "correct" if g and p and verify(g, p, timeout_seconds=None) else "wrong"
