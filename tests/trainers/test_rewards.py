"""The rl stage's rule rewards: format, length against the budget, verifier accuracy under a hard deadline."""

from __future__ import annotations

import time

import pytest

from trainers.rewards import (
    AccuracyReward,
    FormatReward,
    LengthReward,
    RewardsConfig,
    format_score,
    length_penalty,
    make_reward_funcs,
    stop_ids,
)


def tower(chars: int = 10_000) -> str:
    """Nested exponent towers: sympy tries to evaluate 9^(9^(9^(9^9))) and never finishes."""
    one = "9^{9^{9^{9^{9}}}}"
    return "+".join([one] * (chars // (len(one) + 1) + 1))


@pytest.fixture(scope="module")
def tokenizer(tiny_student):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_student)


@pytest.mark.parametrize(("text", "score"), [
    ("<think>a b</think>The answer is $\\boxed{3}$.", 1.0),
    ("reasoning that the template opened</think>\\boxed{12}", 1.0),   # the prompt carried <think>
    ("<think>a b</think>", 0.5),                                     # closed span, no answer
    ("<think>a b</think> and then", 0.5),
    ("<think>never closed \\boxed{3}", 0.0),
    ("\\boxed{3}", 0.0),                                              # an answer but no think span
    ("", 0.0),
    ("<|begin_of_thought|>x<|end_of_thought|>\\boxed{3}", 0.0),      # another trace format is not ours
])
def test_format_score(text, score):
    assert format_score(text, partial=0.5) == score


def test_format_partial_credit_is_configurable():
    assert format_score("<think>x</think>", partial=0.0) == 0.0
    assert format_score("all inside the template's think span", partial=0.5, starts_in_think=True) == 0.0


@pytest.mark.parametrize(("n", "budget", "want"), [
    (10, 100, 0.0), (100, 100, 0.0), (125, 100, -0.5), (150, 100, -1.0), (900, 100, -1.0), (500, None, 0.0),
])
def test_length_penalty_is_soft_past_the_budget_and_zero_within(n, budget, want):
    assert length_penalty(n, budget, tolerance=0.5) == pytest.approx(want)


def test_rewards_decode_the_think_tokens_a_special_token_decode_drops(tokenizer):
    text = "<think>so x</think>The answer is $\\boxed{4}$."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "<think>" not in tokenizer.decode(ids, skip_special_tokens=True)  # what TRL's completions carry
    drop = stop_ids(tokenizer)
    pad = [tokenizer.convert_tokens_to_ids("<|im_end|>")] + [tokenizer.pad_token_id] * 3
    fmt = FormatReward(RewardsConfig(), tokenizer, drop)
    assert fmt(prompts=[None], completions=[None], completion_ids=[ids + pad]) == [1.0]
    length = LengthReward(RewardsConfig(length={"weight": 1.0, "tolerance": 4.0}), tokenizer, drop)
    budget = len(ids) // 2
    got = length(prompts=[None] * 2, completions=[None] * 2, completion_ids=[ids + pad, ids[:budget]],
                 max_tokens=[budget, budget])
    assert got[0] == pytest.approx(-(len(ids) - budget) / (4.0 * budget)) and got[1] == 0.0


def test_weights_leave_out_the_components_that_are_off(tokenizer):
    funcs, weights = make_reward_funcs(RewardsConfig(length={"weight": 0.0}), tokenizer)
    assert [f.__name__ for f in funcs] == ["accuracy", "format"] and weights == [1.0, 1.0]
    with pytest.raises(ValueError, match="every reward weight is 0"):
        make_reward_funcs(RewardsConfig(accuracy_weight=0, format_weight=0, length={"weight": 0}), tokenizer)


def test_accuracy_uses_the_verifier_and_a_pathological_answer_times_out_inside_the_call(tokenizer):
    cfg = RewardsConfig(verify={"timeout_s": 1.5}, workers=2)
    acc = AccuracyReward(cfg, tokenizer, stop_ids(tokenizer))
    texts = [
        "<think>x</think>The answer is $\\boxed{\\frac{1}{2}}$.",   # correct: 0.5 as a fraction
        "<think>x</think>The answer is $\\boxed{3}$.",              # wrong
        f"<think>x</think>$\\boxed{{{tower()}}}$",                   # sympy never finishes on it
        "<think>x</think>",                                          # no answer
        "<think>cut off mid-way",                                   # truncated
        "<think>x</think>\\boxed{B}",                                # a choice letter
    ]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    golds = {"answer": ["0.5", "4", "1", "2", "2", "B"],
             "answer_type": ["number", "number", "number", "number", "number", "choice"],
             "choices": [None, None, None, None, None, ["red", "blue"]]}
    metrics = {}
    try:
        acc(prompts=[None], completions=[None], completion_ids=ids[:1], **{k: v[:1] for k, v in golds.items()})
        t0 = time.monotonic()
        got = acc(prompts=[None] * 6, completions=[None] * 6, completion_ids=ids,
                  log_metric=lambda k, v: metrics.__setitem__(k, v), **golds)
        took = time.monotonic() - t0
    finally:
        acc.close()
    assert got == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert took < cfg.verify.timeout_s + 3.0  # the hung check cost its deadline, not the step
    assert metrics == {"accuracy_timeouts": 1.0} and acc.timeouts == 1
    assert acc.verdicts["timeout"] == 1 and acc.verdicts["truncated"] == 1 and acc.verdicts["no_answer"] == 1
