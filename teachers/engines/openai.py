"""Any OpenAI-compatible chat endpoint as a teacher (`vllm serve`, SGLang, a hosted R1 API), on the
official `openai` client.

`AsyncOpenAI` does the transport: a pooled HTTP client, per-attempt timeouts (`timeout_s`), and retries
(`max_retries`) of 408/409/429/5xx answers, timeouts and dropped connections with exponential backoff
and jitter, honouring the server's Retry-After. On top of that this engine keeps:

- **continuous concurrency**: one event loop per engine (a background thread) and one semaphore of
  `max_concurrency` slots shared by every `generate()` call, so several batches in flight on one worker
  (generate.concurrent_batches) keep every slot busy: a long straggler holds one slot, not a batch;
- **a bounded total wait** per request (`deadline_s`: attempts, backoff and queueing for a slot together);
  past it the request is a counted `deadline` error, never a hung worker;
- **sampling extensions only where the endpoint takes them**: `repetition_penalty`, `top_k` and `seed`
  go in `extra_body` only if listed in `sampling_extensions`. An endpoint that rejects one of them (or the
  key, or the model) fails the engine once with a message saying what to change, instead of one failed
  request per chain;
- the API key read from the environment variable `api_key_env`, sent only as the request header, and
  scrubbed from any error text before it reaches a result, a manifest or a log.

Where the server splits out `reasoning_content` (vLLM/SGLang reasoning parsers, DeepSeek's API) it becomes
the reasoning part and the completion is rebuilt as `<think>reasoning</think>content`, so every engine's
completions look alike.
"""

from __future__ import annotations

import asyncio
import logging
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
EXTENSIONS = ("repetition_penalty", "top_k", "seed")


class EngineRejected(RuntimeError):
    """The endpoint refuses something every request carries (a sampling field, the key, the model)."""


class OpenAIEngine:
    def __init__(self, cfg: OpenAIEngineConfig) -> None:
        import openai

        self.cfg = cfg
        self._key = api_key(cfg.api_key_env)
        if cfg.api_key_env and self._key is None:
            log.info("openai engine: %s is not set; sending no Authorization header", cfg.api_key_env)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-engine", daemon=True)
        self._thread.start()
        # the client and the semaphore belong to the engine's loop: made there, used only there
        self.client: Any = self._call(self._make_client(openai))
        self._fatal: EngineRejected | None = None
        self._warned: set[str] = set()

    async def _make_client(self, openai: Any) -> Any:
        self._slots = asyncio.Semaphore(self.cfg.max_concurrency)
        # An empty key still builds a client; a server that needs one answers 401, reported once.
        return openai.AsyncOpenAI(base_url=self.cfg.base_url, api_key=self._key or "EMPTY",
                                  max_retries=self.cfg.max_retries, timeout=self.cfg.timeout_s)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self.client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Results in order. Safe to call from several threads at once (and from inside a running event
        loop): all calls share this engine's slots. Raises EngineRejected when the endpoint refuses a
        field, the key or the model."""
        if self._fatal is not None:
            raise self._fatal
        results = self._call(self._all(requests))
        if self._fatal is not None:
            raise self._fatal
        return results

    async def _all(self, requests: list[GenRequest]) -> list[GenResult]:
        tasks = [asyncio.ensure_future(self._one(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except EngineRejected as e:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._fatal = self._fatal or e
            return []

    def _body(self, req: GenRequest) -> tuple[dict[str, Any], dict[str, Any]]:
        """(standard arguments, extra_body) for one request."""
        s = req.sampling
        args: dict[str, Any] = {"model": self.cfg.model, "messages": req.messages}
        for key in ("temperature", "top_p", "max_tokens"):
            v = sampling_value(s, key, None)
            if v is not None:
                args[key] = v
        extra: dict[str, Any] = {}
        for key in EXTENSIONS:
            v = s.get(key)
            if v is None or (key == "repetition_penalty" and float(v) == 1.0):
                continue  # 1.0 is no penalty: nothing to send, to any endpoint
            if key in self.cfg.sampling_extensions:
                extra[key] = v
            elif key == "repetition_penalty":
                self._warn_dropped(key)
        extra.update(self.cfg.extra_body)
        return args, extra

    def _warn_dropped(self, key: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("openai engine: %s is set per problem but not sent (engine.sampling_extensions lacks it)", key)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    async def _one(self, req: GenRequest) -> GenResult:
        t0 = time.perf_counter()
        try:
            return await asyncio.wait_for(self._attempts(req, t0), timeout=self.cfg.deadline_s)
        except asyncio.TimeoutError:
            return error_result("deadline", f"no answer within deadline_s={self.cfg.deadline_s}s (attempts, backoff and "
                                "queueing together)", time.perf_counter() - t0, 0)

    async def _attempts(self, req: GenRequest, t0: float) -> GenResult:
        import openai

        args, extra = self._body(req)
        async with self._slots:
            if self._fatal is not None:  # another request found what every request fails on: send no more
                raise self._fatal
            try:
                raw = await self.client.chat.completions.with_raw_response.create(**args, extra_body=extra or None)
                res = self._parse(raw.parse())
                res.retries = int(getattr(raw, "retries_taken", 0) or 0)
            except openai.APITimeoutError as e:
                return self._error("timeout", f"no answer within {self.cfg.timeout_s}s per attempt: {e}", t0, True)
            except openai.APIConnectionError as e:
                return self._error("connection", f"{type(e).__name__}: {e}", t0, True)
            except openai.RateLimitError as e:
                return self._error("rate_limited", f"HTTP 429: {e.message}", t0, True)
            except openai.APIStatusError as e:
                try:
                    self._check_rejected(e, extra)
                except EngineRejected as fatal:
                    self._fatal = self._fatal or fatal
                    raise
                kind = "server_error" if e.status_code >= 500 else f"http_{e.status_code}"
                return self._error(kind, f"HTTP {e.status_code}: {e.message}", t0, e.status_code >= 500 or
                                   e.status_code in (408, 409))
            except _BadResponse as e:
                return self._error("bad_response", str(e), t0, False)
        res.latency_s = time.perf_counter() - t0
        return res

    def _error(self, kind: str, msg: str, t0: float, retried: bool) -> GenResult:
        retries = self.cfg.max_retries if retried else 0
        prefix = f"gave up after {retries + 1} attempts: " if retried else ""
        return error_result(kind, self._scrub(prefix + msg)[:500], time.perf_counter() - t0, retries)

    def _check_rejected(self, e: Any, extra: dict[str, Any]) -> None:
        """Raise EngineRejected for what would fail every request alike."""
        msg = self._scrub(str(e.message))
        where = f"{self.cfg.base_url} (model {self.cfg.model!r})"
        if e.status_code in (400, 422):
            named = [k for k in extra if k in msg]
            if named:
                ext = [k for k in named if k in self.cfg.sampling_extensions]
                fix = (f"remove {ext} from engine.sampling_extensions" if ext else f"remove {named} from engine.extra_body")
                raise EngineRejected(f"{where} rejects the request field(s) {named}: {msg[:300]}. The endpoint does "
                                     f"not take them: {fix}")
        elif e.status_code in (401, 403):
            raise EngineRejected(f"{where} refuses the credentials (HTTP {e.status_code}): {msg[:300]}. Check the "
                                 f"key in ${self.cfg.api_key_env or '<api_key_env unset>'}")
        elif e.status_code == 404:
            raise EngineRejected(f"{where}: not found (HTTP 404): {msg[:300]}. Check engine.base_url (it ends in /v1) "
                                 "and engine.model")

    def _parse(self, completion: Any) -> GenResult:
        try:
            choice = completion.choices[0]
            msg = choice.message
        except (AttributeError, IndexError, TypeError) as e:
            raise _BadResponse(f"no choices in response: {str(completion)[:200]}") from e
        content = msg.content or ""
        finish = _FINISH.get(choice.finish_reason or "stop", "stop")
        extra = getattr(msg, "model_extra", None) or {}
        rc = extra.get("reasoning_content") or extra.get("reasoning") or getattr(msg, "reasoning_content", None)
        if rc:
            text = f"{self.cfg.think_start}\n{rc}\n{self.cfg.think_end}\n\n{content}"
            reasoning, response = rc.strip(), content.strip()
        else:
            text = content
            reasoning, response = split_think(content, self.cfg.think_start, self.cfg.think_end, finish)
        usage = completion.usage
        return GenResult(text=text, reasoning=reasoning, response=response, finish_reason=finish,
                         prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                         completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0))


class _BadResponse(Exception):
    pass
