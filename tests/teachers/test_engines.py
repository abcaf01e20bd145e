"""Engines without Ray: the scripted simulator, think splitting, prompt rendering, per-row sampling in hf."""

from __future__ import annotations

import re
import statistics

import pytest

from teachers.engines import (
    ENGINES,
    GenRequest,
    HFEngineConfig,
    ScriptedEngineConfig,
    engine_config,
    make_engine,
    split_think,
)
from teachers.render import PromptConfig, RenderError, prompt_record, render_messages

from .conftest import synthetic_problems


def _req(p, seed, max_tokens=4096, penalty=1.0):
    msgs = render_messages(p, PromptConfig(), text_only=False)
    return GenRequest(messages=msgs, sampling={"seed": seed, "max_tokens": max_tokens, "repetition_penalty": penalty,
                                               "temperature": 0.6, "top_p": 0.95}, problem=p)


def _boxed(text: str) -> str | None:
    m = re.search(r"\\boxed\{(.*)\}\$", text)
    return m.group(1) if m else None


def test_engine_dict_is_explicit_and_unknown_kind_is_named():
    assert set(ENGINES) == {"scripted", "hf", "openai", "vllm"}
    with pytest.raises(ValueError, match="unknown engine 'gpt'"):
        engine_config({"kind": "gpt"})


def test_scripted_is_deterministic_and_labelled_simulated():
    eng = make_engine(ScriptedEngineConfig())
    problems = synthetic_problems(10)
    a = eng.generate([_req(p, 7) for p in problems])
    b = eng.generate([_req(p, 7) for p in problems])
    c = eng.generate([_req(p, 8) for p in problems])
    assert [r.text for r in a] == [r.text for r in b]
    assert [r.text for r in a] != [r.text for r in c]
    assert all(r.simulated for r in a)


def test_scripted_outcome_rates_and_plausible_wrong_answers():
    cfg = ScriptedEngineConfig(p_correct=0.6, p_loop=0.15, p_truncate=0.1)
    eng = make_engine(cfg)
    problems = synthetic_problems(30)
    reqs = [_req(p, s, max_tokens=1500) for p in problems for s in range(12)]
    res = eng.generate(reqs)
    n = len(res)
    finished = [(q, r) for q, r in zip(reqs, res, strict=True) if r.finish_reason == "stop"]
    truncated = [r for r in res if r.finish_reason == "length"]
    loops = [r for r in res if r.text.count("Wait, let me re-check") >= 6]
    correct = [1 for q, r in finished if _boxed(r.text) == q.problem["answer"]]
    assert 0.05 < len(truncated) / n < 0.25
    assert 0.08 < len(loops) / n < 0.25
    assert 0.5 < len(correct) / len(finished) < 0.7
    for r in truncated:
        assert r.completion_tokens == 1500 and "</think>" not in r.text and r.response == ""
    for q, r in finished:
        pred, gold = _boxed(r.text), q.problem["answer"]
        assert r.reasoning and r.response.startswith("The final answer")
        if pred != gold and q.problem["answer_type"] == "choice":
            assert pred in "ABCDE" and pred != gold
        elif pred != gold and q.problem["answer_type"] == "number":
            assert re.fullmatch(r"-?\d+(\.\d+)?", pred) and float(pred) != float(gold)


def test_scripted_length_grows_with_difficulty_and_shrinks_with_penalty():
    eng = make_engine(ScriptedEngineConfig(p_loop=0, p_truncate=0))
    problems = synthetic_problems(40)

    def mean_len(ps, penalty):
        return statistics.mean(r.completion_tokens for r in eng.generate([_req(p, s, penalty=penalty)
                                                                            for p in ps for s in range(4)]))

    easy = [p for p in problems if p["difficulty"] == 1]
    hard = [p for p in problems if p["difficulty"] == 3]
    assert mean_len(hard, 1.0) > 1.8 * mean_len(easy, 1.0)
    assert mean_len(problems, 1.8) < 0.6 * mean_len(problems, 1.0)


def test_split_think_variants():
    assert split_think("<think>a b</think> ans", "<think>", "</think>", "stop") == ("a b", "ans")
    assert split_think("a b</think>ans", "<think>", "</think>", "stop") == ("a b", "ans")  # R1: opener in prompt
    assert split_think("<think>a b c", "<think>", "</think>", "length") == ("a b c", "")
    assert split_think("just an answer", "<think>", "</think>", "stop") == ("", "just an answer")
    assert split_think("<|begin_of_thought|>x<|end_of_thought|>y", "<|begin_of_thought|>", "<|end_of_thought|>",
                       "stop") == ("x", "y")


def test_render_images_descriptions_and_bad_rows():
    p = synthetic_problems(1)[0]
    mm = render_messages(p, PromptConfig(), text_only=False)
    parts = mm[-1]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "\\boxed{}" in parts[-1]["text"]
    rec = prompt_record(mm)
    assert "base64" not in rec and "image:" in rec
    with pytest.raises(RenderError, match="image_description"):
        render_messages({**p, "needs_image": True}, PromptConfig(), text_only=True)
    txt = render_messages({**p, "image_description": "a right triangle with legs 3 and 4"}, PromptConfig(), True)
    assert isinstance(txt[-1]["content"], str) and "legs 3 and 4" in txt[-1]["content"]
    with pytest.raises(RenderError, match="empty question"):
        render_messages({**p, "question": " "}, PromptConfig(), False)
    choice = render_messages({**p, "choices": ["apples", "pears"]}, PromptConfig(), True | False)
    assert "(B) pears" in str(choice)


def test_row_sampler_applies_each_rows_penalty():
    import torch

    from teachers.engines.hf import RowSampler

    rows = [{"temperature": 0, "top_p": 1.0, "max_tokens": 10, "repetition_penalty": p, "seed": 0} for p in (1.0, 2.0)]
    sampler = RowSampler(rows, prompt_len=2, eos_id=0, device="cpu")
    ids = torch.tensor([[3, 4], [3, 4]])
    scores = torch.tensor([[1.0, 1.0, 1.0, 2.0, -2.0], [1.0, 1.0, 1.0, 2.0, -2.0]])
    out = sampler(ids, scores.clone())
    assert out[0].tolist() == [1.0, 1.0, 1.0, 2.0, -2.0]  # penalty 1: unchanged
    assert out[1].tolist() == [1.0, 1.0, 1.0, 1.0, -4.0]  # seen tokens: positive / 2, negative * 2
    # at a row's max_tokens only EOS remains
    forced = RowSampler([{**rows[0], "max_tokens": 1}], prompt_len=1, eos_id=2, device="cpu")(ids[:1], scores[:1])
    assert forced.argmax().item() == 2 and torch.isinf(forced[0, 0])


def test_hf_rows_do_not_depend_on_batch_neighbours(tiny_chat_model, one_torch_thread):
    eng = make_engine(HFEngineConfig(model=str(tiny_chat_model), text_only=True, batch_size=4))
    problems = [{**p, "images": None} for p in synthetic_problems(5)]
    reqs = [GenRequest(messages=render_messages(p, PromptConfig(), True),
                       sampling={"temperature": 0.9, "top_p": 0.9, "max_tokens": 12 + 3 * i, "seed": i,
                                 "repetition_penalty": 1.0 + 0.3 * i}) for i, p in enumerate(problems)]
    together = eng.generate(reqs)
    alone = [eng.generate([r])[0] for r in reqs]
    assert [r.text for r in together] == [r.text for r in alone]
    # greedy: the penalty is what breaks the random model's repeats
    greedy = {"temperature": 0, "top_p": 1.0, "max_tokens": 40, "seed": 0}
    plain, penalised = eng.generate([GenRequest(messages=reqs[0].messages, sampling={**greedy, "repetition_penalty": p})
                                     for p in (1.0, 5.0)])
    tok = eng.tokenizer
    distinct = [len(set(tok(r.text, add_special_tokens=False)["input_ids"])) for r in (plain, penalised)]
    assert plain.text != penalised.text and distinct[1] > distinct[0]
    # images sent to a text-only checkpoint: that row fails as bad_input, its neighbour is served
    mm = render_messages(synthetic_problems(1)[0], PromptConfig(), text_only=False)
    bad, good = eng.generate([GenRequest(messages=mm, sampling=greedy), reqs[0]])
    assert bad.error_kind == "bad_input" and bad.finish_reason == "error" and good.text == together[0].text


def test_row_sampler_does_not_penalise_left_padding():
    """pad = EOS (as R1-distill tokenizers ship): the padding must not count as a seen EOS."""
    import torch

    from teachers.engines.hf import RowSampler

    row = {"temperature": 0, "top_p": 1.0, "max_tokens": 10, "repetition_penalty": 2.0, "seed": 0}
    scores = torch.tensor([[1.0, 3.0, 1.0, 2.0, -2.0]])
    alone = RowSampler([row], prompt_len=2, eos_id=1, device="cpu", pad_lens=[0])(torch.tensor([[3, 4]]), scores.clone())
    # the same row left-padded with two EOS (id 1) in a batch whose longest prompt has 4 tokens
    padded = RowSampler([row], prompt_len=4, eos_id=1, device="cpu", pad_lens=[2])(torch.tensor([[1, 1, 3, 4]]), scores.clone())
    assert padded.tolist() == alone.tolist() == [[1.0, 3.0, 1.0, 1.0, -4.0]]
    # an EOS the row really holds is penalised
    real = RowSampler([row], prompt_len=4, eos_id=1, device="cpu", pad_lens=[1])(torch.tensor([[1, 1, 3, 4]]), scores.clone())
    assert real[0, 1].item() == 1.5


def test_hf_output_does_not_depend_on_batch_neighbours_when_pad_is_eos(tiny_chat_model, tmp_path, one_torch_thread):
    import shutil

    from transformers import AutoTokenizer

    d = tmp_path / "pad-eos"
    shutil.copytree(tiny_chat_model, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(d)
    eng = make_engine(HFEngineConfig(model=str(d), text_only=True, batch_size=8))
    assert eng.tokenizer.pad_token_id == eng.eos_id
    problems = [{**p, "images": None} for p in synthetic_problems(6)]
    long = {**problems[0], "question": problems[0]["question"] * 6}
    greedy = {"temperature": 0, "top_p": 1.0, "max_tokens": 48, "seed": 0, "repetition_penalty": 1.8}
    reqs = [GenRequest(messages=render_messages(p, PromptConfig(), True), sampling=greedy) for p in problems]
    neighbour = GenRequest(messages=render_messages(long, PromptConfig(), True), sampling=greedy)
    alone = [eng.generate([r])[0] for r in reqs]
    batched = eng.generate([neighbour, *reqs])[1:]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.completion_tokens for r in batched] == [r.completion_tokens for r in alone]
