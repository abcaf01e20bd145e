"""Later rounds loosen the assessed penalty and widen the budget without discarding per-row values."""

from __future__ import annotations

import pytest

from teachers.generate import GenerateConfig, _sampling


def _cfg(**kw) -> GenerateConfig:
    return GenerateConfig(engine={"kind": "scripted", "model": "m"}, **kw)


def test_row_values_pass_through_by_default():
    s = _sampling(_cfg(), {"repetition_penalty": 1.6, "max_tokens": 1000}, seed=3)
    assert (s["repetition_penalty"], s["max_tokens"], s["seed"]) == (1.6, 1000, 3)


@pytest.mark.parametrize("scale,expected", [(0.5, 1.3), (0.0, 1.0), (1.0, 1.6)])
def test_penalty_scale_moves_the_row_penalty_toward_one(scale, expected):
    s = _sampling(_cfg(penalty_scale=scale), {"repetition_penalty": 1.6}, seed=0)
    assert s["repetition_penalty"] == pytest.approx(expected)


def test_budget_scale_multiplies_the_row_budget_only():
    assert _sampling(_cfg(budget_scale=1.5), {"max_tokens": 1000}, seed=0)["max_tokens"] == 1500
    # the config's own default is not a per-row budget: untouched
    assert _sampling(_cfg(budget_scale=1.5, max_tokens=700), {}, seed=0)["max_tokens"] == 700


def test_bad_row_value_falls_back_to_config_unscaled():
    s = _sampling(_cfg(penalty_scale=0.5, repetition_penalty=1.2), {"repetition_penalty": float("nan")}, seed=0)
    assert s["repetition_penalty"] == 1.2
