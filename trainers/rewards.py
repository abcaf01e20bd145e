"""Rule rewards for the `rl` stage (GRPO): verifier accuracy, think/answer format, difficulty-scaled length.

    from trainers.rewards import RewardsConfig, make_reward_funcs
    funcs = make_reward_funcs(RewardsConfig(), tokenizer)   # TRL reward functions, one per component

Each function takes TRL's reward call (`prompts`, `completions`, `completion_ids`, plus the dataset's
columns as lists: `answer`, `answer_type`, `choices`, `max_tokens`) and returns one float per completion.

- `accuracy`: 1.0 when the filters' verifier (filters.verify: math-verify + type-aware checks) finds the
  final answer equal to the gold, else 0.0. Every check runs in a `filters.deadline.DeadlinePool` worker
  process with a hard deadline, so a pathological answer (a sympy expression that never finishes, a
  runaway allocation) costs at most `verify.timeout_s` and scores 0; the step goes on. Timeouts are
  counted in the step log (`accuracy_timeouts`).
- `format`: 1.0 for a closed think span followed by an extractable final answer (filters.formats,
  filters.extract); `partial_credit` for a closed span without one; 0.0 otherwise.
- `length`: 0 within the problem's token budget (`max_tokens`, written by `assess` from the problem's
  difficulty: AL-CoTD's budget carried into RL), then a soft linear penalty growing to -1 at
  `(1 + tolerance) x budget` tokens. Problems without a budget use `default_budget` (or none).

Completions are decoded here from their token ids, keeping added tokens such as `<think>` that a
`skip_special_tokens` decode would drop (a tokenizer may mark them special), and dropping only padding
and end-of-sequence tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import Field

from filters.verify import VerifyConfig
from pipeline.config import StageConfig

log = logging.getLogger(__name__)

COMPONENTS = ("accuracy", "format", "length")


class LengthRewardConfig(StageConfig):
    weight: float = Field(0.5, ge=0, description="weight of the length penalty in the summed reward (0 = off)")
    tolerance: float = Field(
        0.5, gt=0, description="the penalty reaches -1 at (1 + tolerance) x budget tokens (linear from the budget)"
    )
    default_budget: int | None = Field(
        None, ge=1, description="budget of a problem without `max_tokens` (None: no length penalty for it)"
    )


class RewardsConfig(StageConfig):
    """Rule rewards of the `rl` stage (section `rl.rewards`). Skywork R1V: accuracy + format."""

    accuracy_weight: float = Field(1.0, ge=0, description="weight of the verifier's accuracy reward (0 = off)")
    format_weight: float = Field(1.0, ge=0, description="weight of the format reward (0 = off)")
    partial_credit: float = Field(
        0.5, ge=0, le=1, description="format reward of a closed think span without an extractable final answer"
    )
    length: LengthRewardConfig = Field(default_factory=LengthRewardConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig, description="verifier settings (deadline per check)")
    workers: int = Field(2, ge=1, description="verifier worker processes (checks of one step run in parallel)")

    def weights(self) -> dict[str, float]:
        """{component: weight} of the components that are on (weight > 0), in COMPONENTS order."""
        w = {"accuracy": self.accuracy_weight, "format": self.format_weight, "length": self.length.weight}
        on = {k: v for k, v in w.items() if v > 0}
        if not on:
            raise ValueError("rl.rewards: every reward weight is 0 (set accuracy_weight, format_weight or length.weight)")
        return on


# ---------------------------------------------------------------------------------------------------------
# per-completion logic (plain Python)


def decode(tokenizer: Any, ids: Sequence[int], drop: set[int]) -> str:
    """The completion text with its added tokens (`<think>`), without padding / end-of-sequence tokens."""
    return tokenizer.decode([int(t) for t in ids if int(t) not in drop], skip_special_tokens=False)


def stop_ids(tokenizer: Any, extra: Sequence[int] = ()) -> set[int]:
    """Token ids a completion may end or be padded with (never part of its text)."""
    out = {int(t) for t in extra if t is not None}
    for name in ("pad_token_id", "eos_token_id"):
        t = getattr(tokenizer, name, None)
        if t is not None:
            out.add(int(t))
    for tok in ("<|im_end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>"):
        t = tokenizer.convert_tokens_to_ids(tok)
        if t is not None and t != getattr(tokenizer, "unk_token_id", None):
            out.add(int(t))
    return out


def format_score(text: str, partial: float, starts_in_think: bool = False) -> float:
    """1.0: a closed think span and an extractable final answer after it; `partial`: the span only; else 0."""
    from filters.extract import extract
    from filters.formats import split_chain

    split = split_chain(text, starts_in_think)
    if split.fmt != "think" or not split.closed:
        return 0.0
    return 1.0 if extract(split.response) is not None else partial


def length_penalty(n_tokens: int, budget: int | None, tolerance: float) -> float:
    """0 within `budget` tokens, then linear down to -1 at (1 + tolerance) x budget (and -1 beyond)."""
    if not budget or n_tokens <= budget:
        return 0.0
    return -min(1.0, (n_tokens - budget) / (tolerance * budget))


def _n_tokens(ids: Sequence[int], drop: set[int]) -> int:
    return sum(1 for t in ids if int(t) not in drop)


def _problem(i: int, kwargs: dict) -> dict:
    choices = (kwargs.get("choices") or [None] * (i + 1))[i]
    return {"answer": kwargs["answer"][i], "answer_type": (kwargs.get("answer_type") or [None] * (i + 1))[i],
            "choices": list(choices) if choices else None}


# ---------------------------------------------------------------------------------------------------------
# TRL reward functions


class AccuracyReward:
    """The verifier's verdict as a reward: 1.0 correct, 0.0 otherwise (wrong, no answer, truncated, timeout).

    Holds its own DeadlinePool: `workers` persistent check processes, each check under a hard deadline."""

    __name__ = "accuracy"

    def __init__(self, cfg: RewardsConfig, tokenizer: Any, drop: set[int]) -> None:
        self.cfg, self.tokenizer, self.drop = cfg, tokenizer, drop
        self._pool = None
        self.timeouts = 0
        self.verdicts: dict[str, int] = {}

    @property
    def pool(self) -> Any:
        if self._pool is None:
            from filters.deadline import DeadlinePool
            from filters.verify import check_answer

            v = self.cfg.verify
            self._pool = DeadlinePool(check_answer, workers=self.cfg.workers, timeout_s=v.timeout_s,
                                      memory_mb=v.memory_mb)
        return self._pool

    def score(self, texts: list[str], problems: list[dict]) -> tuple[list[float], list[str]]:
        """(reward, verdict) per completion."""
        from filters.extract import extract, truncation
        from filters.formats import split_chain
        from filters.verify import check_many

        v = self.cfg.verify
        verdicts: list[str | None] = [None] * len(texts)
        items, where = [], []
        for i, (text, p) in enumerate(zip(texts, problems, strict=True)):
            split = split_chain(text, v.starts_in_think)
            found = extract(split.response, p.get("answer_type"), str(p.get("answer") or ""))
            if truncation(split, found):
                verdicts[i] = "truncated"
            elif found is None:
                verdicts[i] = "no_answer"
            else:
                items.append((found.answer, p))
                where.append(i)
        if items:
            for i, (verdict, _detail, _s, _used) in zip(where, check_many(items, v, self.pool), strict=True):
                verdicts[i] = verdict
        out = [str(x) for x in verdicts]
        for x in out:
            self.verdicts[x] = self.verdicts.get(x, 0) + 1
        return [1.0 if x == "correct" else 0.0 for x in out], out

    def __call__(self, prompts: list, completions: list, completion_ids: list, **kwargs: Any) -> list[float]:
        texts = [decode(self.tokenizer, ids, self.drop) for ids in completion_ids]
        rewards, verdicts = self.score(texts, [_problem(i, kwargs) for i in range(len(texts))])
        timeouts = sum(v == "timeout" for v in verdicts)
        self.timeouts += timeouts
        if timeouts:
            log.warning("accuracy reward: %d check(s) hit the %.1fs deadline (scored 0)", timeouts,
                        self.cfg.verify.timeout_s)
        if "log_metric" in kwargs:
            kwargs["log_metric"]("accuracy_timeouts", float(timeouts))
        return rewards

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


class FormatReward:
    __name__ = "format"

    def __init__(self, cfg: RewardsConfig, tokenizer: Any, drop: set[int]) -> None:
        self.cfg, self.tokenizer, self.drop = cfg, tokenizer, drop

    def __call__(self, prompts: list, completions: list, completion_ids: list, **kwargs: Any) -> list[float]:
        starts = self.cfg.verify.starts_in_think
        return [format_score(decode(self.tokenizer, ids, self.drop), self.cfg.partial_credit, starts)
                for ids in completion_ids]


class LengthReward:
    __name__ = "length"

    def __init__(self, cfg: RewardsConfig, tokenizer: Any, drop: set[int]) -> None:
        self.cfg, self.drop = cfg, drop

    def __call__(self, prompts: list, completions: list, completion_ids: list, **kwargs: Any) -> list[float]:
        lc = self.cfg.length
        budgets = kwargs.get("max_tokens") or [None] * len(completion_ids)
        return [length_penalty(_n_tokens(ids, self.drop), int(b) if b else lc.default_budget, lc.tolerance)
                for ids, b in zip(completion_ids, budgets, strict=True)]


REWARDS: dict[str, Callable[..., Any]] = {"accuracy": AccuracyReward, "format": FormatReward, "length": LengthReward}


def make_reward_funcs(cfg: RewardsConfig, tokenizer: Any, extra_stop: Sequence[int] = ()) -> tuple[list, list[float]]:
    """(reward functions, their weights) for the components that are on."""
    drop = stop_ids(tokenizer, extra_stop)
    weights = cfg.weights()
    return [REWARDS[name](cfg, tokenizer, drop) for name in weights], list(weights.values())
