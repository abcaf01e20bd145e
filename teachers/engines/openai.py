"""Any OpenAI-compatible chat endpoint as a teacher (`vllm serve`, SGLang, a hosted R1 API).

Async (aiohttp) with at most `max_concurrency` requests in flight per worker. 429, 5xx, timeouts and
dropped connections are retried up to `max_retries` times with exponential backoff and full jitter
(a server's Retry-After is honoured as a floor); other 4xx answers fail the request at once. The API
key is read from the environment variable named by `api_key_env` and goes only into the request
header, never into results, manifests or logs. Where the server splits out `reasoning_content`
(vLLM/SGLang reasoning parsers, DeepSeek's API) it becomes the reasoning part and the completion is
rebuilt as `<think>reasoning</think>content`, so every engine's completions look alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from typing import Any

from teachers.engines import (
    GenRequest,
    GenResult,
    OpenAIEngineConfig,
    api_key,
    error_result,
    sampling_value,
    split_think,
)

log = logging.getLogger(__name__)

_FINISH = {"stop": "stop", "length": "length", "eos": "stop", "end_turn": "stop", "max_tokens": "length"}


class _Retryable(Exception):
    def __init__(self, kind: str, msg: str, retry_after: float | None = None) -> None:
        super().__init__(msg)
        self.kind = kind
        self.retry_after = retry_after


class _Fatal(Exception):
    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind


class OpenAIEngine:
    def __init__(self, cfg: OpenAIEngineConfig) -> None:
        import aiohttp  # noqa: F401  (fail at construction, not at the first request)

        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._key = api_key(cfg.api_key_env)
        if cfg.api_key_env and self._key is None:
            log.info("openai engine: %s is not set; sending no Authorization header", cfg.api_key_env)

    def close(self) -> None:
        pass

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._all(requests))
        # Called from inside a running loop (an async actor): run ours on a helper thread.
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["r"] = asyncio.run(self._all(requests))
            except BaseException as e:  # re-raised in the caller's thread below
                box["e"] = e

        t = threading.Thread(target=target)
        t.start()
        t.join()
        if "e" in box:
            raise box["e"]
        return box["r"]

    def _body(self, req: GenRequest) -> dict[str, Any]:
        s = req.sampling
        body: dict[str, Any] = {"model": self.cfg.model, "messages": req.messages}
        for key, default in (("temperature", None), ("top_p", None), ("max_tokens", None), ("seed", None)):
            v = sampling_value(s, key, default)
            if v is not None:
                body[key] = v
        rp = s.get("repetition_penalty")
        if rp is not None and float(rp) != 1.0:
            body["repetition_penalty"] = float(rp)  # vLLM / SGLang sampling extension
        body.update(self.cfg.extra_body)
        return body

    async def _all(self, requests: list[GenRequest]) -> list[GenResult]:
        import aiohttp

        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        conn = aiohttp.TCPConnector(limit=self.cfg.max_concurrency, force_close=False)
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout, headers=headers) as session:
            return list(await asyncio.gather(*(self._one(session, sem, r) for r in requests)))

    async def _one(self, session: Any, sem: asyncio.Semaphore, req: GenRequest) -> GenResult:
        body = json.dumps(self._body(req))
        t0 = time.perf_counter()
        rng = random.Random(req.request_id or None)
        last: _Retryable | None = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                delay = rng.uniform(0, min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1)))
                if last is not None and last.retry_after:
                    delay = max(delay, min(last.retry_after, self.cfg.backoff_max_s))
                await asyncio.sleep(delay)
            try:
                async with sem:
                    data = await self._post(session, body)
                res = self._parse(data)
                res.latency_s = time.perf_counter() - t0
                res.retries = attempt
                return res
            except _Retryable as e:
                last = e
                log.debug("openai engine: %s on attempt %d: %s", e.kind, attempt + 1, e)
            except _Fatal as e:
                return error_result(e.kind, str(e), time.perf_counter() - t0, attempt)
        assert last is not None
        return error_result(last.kind, f"gave up after {self.cfg.max_retries + 1} attempts: {last}",
                            time.perf_counter() - t0, self.cfg.max_retries)

    async def _post(self, session: Any, body: str) -> dict[str, Any]:
        import aiohttp

        try:
            async with session.post(self.url, data=body) as resp:
                text = await resp.text()
                if resp.status == 200:
                    try:
                        return json.loads(text)
                    except json.JSONDecodeError as e:
                        raise _Retryable("bad_response", f"invalid JSON from server: {e}") from e
                if resp.status == 429 or resp.status >= 500:
                    ra = resp.headers.get("Retry-After")
                    try:
                        retry_after = float(ra) if ra else None
                    except ValueError:
                        retry_after = None
                    kind = "rate_limited" if resp.status == 429 else "server_error"
                    raise _Retryable(kind, f"HTTP {resp.status}: {text[:200]}", retry_after)
                raise _Fatal(f"http_{resp.status}", f"HTTP {resp.status}: {text[:300]}")
        except asyncio.TimeoutError as e:
            raise _Retryable("timeout", f"no answer within {self.cfg.timeout_s}s") from e
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise _Retryable("connection", f"{type(e).__name__}: {e}") from e

    def _parse(self, data: dict[str, Any]) -> GenResult:
        try:
            choice = data["choices"][0]
            msg = choice.get("message") or {}
        except (KeyError, IndexError, TypeError) as e:
            raise _Retryable("bad_response", f"no choices in response: {str(data)[:200]}") from e
        content = msg.get("content") or ""
        finish = _FINISH.get(choice.get("finish_reason") or "stop", "stop")
        rc = msg.get("reasoning_content") or msg.get("reasoning")
        if rc:
            text = f"{self.cfg.think_start}\n{rc}\n{self.cfg.think_end}\n\n{content}"
            reasoning, response = rc.strip(), content.strip()
        else:
            text = content
            reasoning, response = split_think(content, self.cfg.think_start, self.cfg.think_end, finish)
        usage = data.get("usage") or {}
        return GenResult(text=text, reasoning=reasoning, response=response, finish_reason=finish,
                         prompt_tokens=int(usage.get("prompt_tokens") or 0),
                         completion_tokens=int(usage.get("completion_tokens") or 0))
