"""A chain is judged against the budget it was generated under, so widened later rounds keep long chains."""

from __future__ import annotations

from filters.filter import _budget


def test_generation_budget_wins_over_assessed_budget():
    assert _budget({"_budget": 1000, "sampling": {"max_tokens": 1500}}) == 1500


def test_assessed_budget_when_no_sampling():
    assert _budget({"_budget": 1000, "sampling": None}) == 1000
    assert _budget({}) is None
