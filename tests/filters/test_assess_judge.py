"""The optional judge: reply validation, retries on malformed output, through real teacher engines.

The retry loop is driven through the real openai engine against a real local HTTP server (aiohttp)
that answers like a judge model would: a valid object for some problems, broken JSON first and a valid
object once the correction turn arrives for others, and never a usable object for the rest.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from filters import assess
from filters.assess import AssessConfig, JudgeConfig
from filters.judge import JudgeFormatError, judge_messages, judge_problems, load_rubric, parse_judge_reply
from pipeline.rundir import read_table
from pipeline.schema import PROBLEMS
from pipeline.synthetic import make_problem
from tests.filters.stagectx import run_stage, write_step

VALID = {"image_clarity": 8, "image_necessity": 9, "question_quality": 7, "difficulty": 6,
         "reasoning_demand": 5, "integration": 7, "rationale": "clear figure"}


# --- parsing -----------------------------------------------------------------------------------------


def test_parse_accepts_bare_fenced_and_after_think():
    assert parse_judge_reply(json.dumps(VALID)).difficulty == 6
    fenced = "Here you go:\n```json\n" + json.dumps(VALID) + "\n```\nthanks"
    assert parse_judge_reply(fenced).integration == 7
    think = "<think>the image has {braces} in it</think>" + json.dumps(VALID)
    assert parse_judge_reply(think).image_clarity == 8
    text_only = VALID | {"image_clarity": None, "image_necessity": None, "integration": None}
    s = parse_judge_reply(json.dumps(text_only)).as_subscores()
    assert s["s_v"] == 0.0 and s["s_i"] == 0.0 and s["s_t"] == pytest.approx((0.7 + 0.6 + 0.5) / 3)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ("", "empty reply"),
        ("The image is clear, difficulty 6.", "no JSON object"),
        ('{"image_clarity": 8, "difficulty": 6,}', "invalid JSON"),
        (json.dumps({k: v for k, v in VALID.items() if k != "difficulty"}), "difficulty: Field required"),
        (json.dumps(VALID | {"reasoning_demand": 14}), "reasoning_demand: Input should be less than or equal to 10"),
        (json.dumps(VALID | {"question_quality": "high"}), "question_quality"),
        ("[1, 2, 3] {oops}", "invalid JSON"),
    ],
)
def test_parse_rejects_with_a_precise_message(reply, message):
    with pytest.raises(JudgeFormatError, match=message):
        parse_judge_reply(reply)


def test_judge_prompt_carries_rubric_images_and_question():
    p = make_problem(0, 0) | {"problem_id": "x"}
    msgs = judge_messages(p, load_rubric(None))
    assert msgs[0]["role"] == "system" and "image_necessity" in msgs[0]["content"]
    parts = msgs[1]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[-1]["text"].startswith(p["question"].split("\n")[0][:20])
    blind = judge_messages(p, "rubric", text_only=True)
    assert isinstance(blind[1]["content"], str) and "1 image(s) that you cannot see" in blind[1]["content"]


# --- a judge behind a real HTTP server ----------------------------------------------------------------


class JudgeServer:
    """OpenAI-compatible /v1/chat/completions on 127.0.0.1; replies depend on the question's tag."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    def _reply(self, body: dict) -> str:
        user = body["messages"][1]["content"]
        text = user[-1]["text"] if isinstance(user, list) else user
        corrected = any("not usable" in str(m.get("content")) for m in body["messages"][2:])
        if "[good]" in text:
            return "```json\n" + json.dumps(VALID) + "\n```"
        if "[fixable]" in text:
            return json.dumps(VALID | {"difficulty": 9}) if corrected else '{"image_clarity": 8, difficulty: 9'
        return json.dumps(VALID | {"difficulty": 42})  # [hopeless]: always out of range

    def _serve(self) -> None:
        from aiohttp import web

        async def chat(request: web.Request) -> web.Response:
            body = await request.json()
            self.requests.append(body)
            content = self._reply(body)
            return web.json_response({
                "id": "judge", "object": "chat.completion", "model": body.get("model", "judge"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": len(content.split()), "total_tokens": 20},
            })

        loop = asyncio.new_event_loop()
        self._loop = loop
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> JudgeServer:
        self._thread.start()
        assert self._ready.wait(10), "judge server did not start"
        return self

    def __exit__(self, *_exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def _problems() -> list[dict]:
    rows = []
    for i, tag in enumerate(["good", "fixable", "hopeless", "good"]):
        p = make_problem(1, i)
        rows.append({
            "problem_id": f"{tag}{i}", "question": f"[{tag}] " + p["question"], "images": p["images"],
            "answer": p["answer"], "choices": p["choices"], "answer_type": p["answer_type"],
            "source": "synthetic", "difficulty": p["difficulty"], "needs_image": p["needs_image"],
        })
    return rows


def _judge_cfg(url: str, **kw) -> JudgeConfig:
    engine = {"kind": "openai", "model": "judge", "base_url": url, "api_key_env": None, "max_retries": 0}
    return JudgeConfig(engine=engine, max_retries=2, **kw)


def test_judge_retries_malformed_replies_over_http():
    from teachers.engines import make_engine

    with JudgeServer() as srv:
        cfg = _judge_cfg(srv.url)
        results = judge_problems(make_engine(cfg.engine), _problems(), cfg, seed=5)
        assert [r.attempts for r in results] == [1, 2, 3, 1]
        assert results[0].scores.difficulty == 6
        assert results[1].scores.difficulty == 9  # the corrected reply
        assert results[2].scores is None and "difficulty" in results[2].error
        # 4 first tries, 2 retries in round two (fixable, hopeless), 1 in round three (hopeless).
        assert len(srv.requests) == 7
        retry = [b for b in srv.requests if len(b["messages"]) > 2]
        assert all(b["messages"][-1]["content"].startswith("That reply was not usable") for b in retry)
        assert len({b["seed"] for b in srv.requests}) == 3  # a new seed per attempt
        assert srv.requests[0]["messages"][1]["content"][0]["type"] == "image_url"


def test_assess_stage_with_judge(tmp_path):
    run = tmp_path / "run"
    write_step(run, "ingest", PROBLEMS, "problems", _problems())
    with JudgeServer() as srv:
        m = run_stage(assess, AssessConfig(workers=0, judge=_judge_cfg(srv.url)), run, "assess",
                      {"problems": ["ingest"]})
        assert (m.rows_in, m.kept) == (4, 4)
        assert m.metrics["judge_ok"] == 3 and m.metrics["judge_failed"] == 1 and m.metrics["judge_attempts"] == 7
        out = {r["problem_id"]: r for r in read_table(run / "assess").to_pylist()}
        assert out["hopeless2"]["assess_source"] == "heuristic"
        assert out["fixable1"]["assess_source"] == "judge" and out["fixable1"]["qa_difficulty"] == pytest.approx(0.9)

        m = run_stage(assess, AssessConfig(workers=0, judge=_judge_cfg(srv.url, on_failure="quarantine")), run,
                      "assess", {"problems": ["ingest"]})
        assert m.kept == 3 and m.quarantined == {"judge_invalid": 1}
        q = read_table(run / "assess" / "quarantine").to_pylist()
        assert q[0]["source_ref"] == "hopeless2" and "after 3 attempts" in q[0]["error"]


def test_scripted_engine_as_judge_falls_back(tmp_path):
    """The scripted teacher writes math chains, never rubric JSON: every problem falls back, counted."""
    run = tmp_path / "run"
    write_step(run, "ingest", PROBLEMS, "problems", _problems()[:2])
    cfg = AssessConfig(workers=0, judge=JudgeConfig(engine={"kind": "scripted"}, max_retries=1))
    m = run_stage(assess, cfg, run, "assess", {"problems": ["ingest"]})
    assert m.kept == 2 and m.metrics["judge_failed"] == 2 and m.metrics["judge_attempts"] == 4
    assert {r["assess_source"] for r in read_table(run / "assess").to_pylist()} == {"heuristic"}


def test_judge_replies_are_cached_so_a_new_alpha_does_not_pay_the_judge_again(tmp_path):
    run = tmp_path / "run"
    write_step(run, "ingest", PROBLEMS, "problems", _problems())
    with JudgeServer() as srv:
        cfg = _judge_cfg(srv.url, cache_dir=str(tmp_path / "cache"))
        m1 = run_stage(assess, AssessConfig(workers=0, judge=cfg), run, "assess", {"problems": ["ingest"]})
        paid = len(srv.requests)
        assert paid == 7 and m1.metrics["judge_requests"] == 7
        m2 = run_stage(assess, AssessConfig(workers=0, alpha=0.9, judge=cfg), run, "assess", {"problems": ["ingest"]})
        assert len(srv.requests) == paid, "the same questions to the same judge must come from the cache"
        assert m2.metrics["judge_requests"] == 0 and m2.metrics["judge_cache_hits"] == 7
        assert (m2.metrics["judge_ok"], m2.metrics["judge_failed"]) == (3, 1)
        assert m2.metrics["penalty_max"] > m1.metrics["penalty_max"]


def test_judge_engine_is_typed_like_the_generate_engine():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="api_key"):
        JudgeConfig(engine={"kind": "openai", "model": "j", "api_key": "sk-live-123"})
    with pytest.raises(ValidationError, match="kind"):
        JudgeConfig(engine={"kind": "gpt4o"})
    assert JudgeConfig(engine={"kind": "openai", "model": "j"}).engine.max_retries == 6
