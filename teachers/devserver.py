"""A small OpenAI-compatible chat server for tests, benchmarks and offline trials of the openai engine.

    python -m teachers.devserver --port 8000 --latency-ms 10
    python -m teachers.devserver --port 8000 --fault-every 5     # every 5th request fails in turn

It implements POST /v1/chat/completions with deterministic answers (a `<think>` chain derived from
the messages and seed, with usage counts) and injects faults by request number, so tests know exactly
which requests fail: 429 with Retry-After, 500, a slow answer past the client's timeout, and a
connection dropped before any response. Image parts must be valid base64 data URIs of decodable
images (else 400); the answer reports how many it saw. It also splits out `reasoning_content` when
started with reasoning_content=True, as vLLM's reasoning parsers do.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

FAULTS = ("rate_limit", "server_error", "slow", "drop")


@dataclass
class ServerConfig:
    latency_s: float = 0.0
    fault_every: int = 0  # every n-th request (1-based) gets the next fault of `faults`, in turn
    faults: tuple[str, ...] = FAULTS
    slow_s: float = 3.0
    reasoning_content: bool = False
    words: int = 40
    slow_requests: tuple[int, ...] = ()  # these request numbers (1-based) are answered after slow_s
    reject_fields: tuple[str, ...] = ()  # 400 for a body carrying any of these, as hosted APIs answer
    require_key: str | None = None  # 401 (quoting the key sent back, as some APIs do) for any other key


@dataclass
class ServerStats:
    requests: int = 0
    ok: int = 0
    faults: Counter = field(default_factory=Counter)
    images: int = 0
    answered: Counter = field(default_factory=Counter)  # request digest -> 200 answers
    authorization: Counter = field(default_factory=Counter)  # Authorization header values seen
    finished: list = field(default_factory=list)  # request numbers in the order they were answered
    bodies: list = field(default_factory=list)  # request bodies, in arrival order


def _image_count(messages: list[dict]) -> int:
    from PIL import Image

    n = 0
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if part.get("type") != "image_url":
                continue
            url = part["image_url"]["url"]
            if not url.startswith("data:image/") or ";base64," not in url:
                raise ValueError("image_url must be a base64 data URI")
            with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
                im.load()
            n += 1
    return n


def answer(body: dict[str, Any], cfg: ServerConfig, images: int) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps([body.get("messages"), body.get("seed"), body.get("temperature")],
                                       sort_keys=True).encode()).hexdigest()
    words = [f"w{digest[i % 60:i % 60 + 4]}" for i in range(cfg.words)]
    max_tokens = int(body.get("max_tokens") or 10_000)
    reasoning = f"I see {images} image(s). " + " ".join(words)
    final = f"The answer is \\boxed{{{int(digest[:6], 16) % 100}}}."
    n_tokens = len(reasoning.split()) + len(final.split()) + 2
    finish = "stop"
    if n_tokens > max_tokens:
        reasoning = " ".join(reasoning.split()[:max_tokens])
        final, finish, n_tokens = "", "length", max_tokens
    msg: dict[str, Any] = {"role": "assistant"}
    if cfg.reasoning_content:
        msg["reasoning_content"], msg["content"] = reasoning, final
    else:
        msg["content"] = f"<think>{reasoning}</think>{final}" if finish == "stop" else f"<think>{reasoning}"
    prompt_tokens = sum(len(json.dumps(m.get("content")).split()) for m in body.get("messages", []))
    return {
        "id": f"chatcmpl-{digest[:12]}",
        "object": "chat.completion",
        "model": body.get("model", "dev"),
        "choices": [{"index": 0, "message": msg, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n_tokens,
                  "total_tokens": prompt_tokens + n_tokens},
        "_digest": digest,
    }


def make_app(cfg: ServerConfig, stats: ServerStats):
    from aiohttp import web

    lock = threading.Lock()

    async def chat(request: web.Request) -> web.StreamResponse:
        with lock:
            stats.requests += 1
            n = stats.requests
            stats.authorization[request.headers.get("Authorization", "")] += 1
        fault = None
        if cfg.fault_every and n % cfg.fault_every == 0:
            fault = cfg.faults[(n // cfg.fault_every - 1) % len(cfg.faults)]
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return web.json_response({"error": {"message": "invalid JSON"}}, status=400)
        with lock:
            stats.bodies.append(body)
        sent = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if cfg.require_key is not None and sent != cfg.require_key:
            return web.json_response({"error": {"message": f"Incorrect API key provided: {sent}",
                                                "type": "invalid_request_error"}}, status=401)
        bad = [k for k in cfg.reject_fields if k in body]
        if bad:
            return web.json_response({"error": {"message": f"Unrecognized request argument supplied: {bad[0]}",
                                                "type": "invalid_request_error", "param": None}}, status=400)
        if fault:
            stats.faults[fault] += 1
        if fault == "rate_limit":
            return web.json_response({"error": {"message": "rate limited"}}, status=429,
                                     headers={"Retry-After": "0.05"})
        if fault == "server_error":
            return web.json_response({"error": {"message": "internal error"}}, status=500)
        if fault == "drop":
            request.transport.abort()  # the client sees the connection reset with no response
            return web.Response(status=500)
        if fault == "slow" or n in cfg.slow_requests:
            await asyncio.sleep(cfg.slow_s)
        try:
            images = _image_count(body.get("messages", []))
        except (ValueError, OSError, KeyError) as e:
            return web.json_response({"error": {"message": f"bad image: {e}"}}, status=400)
        if cfg.latency_s:
            await asyncio.sleep(cfg.latency_s)
        data = answer(body, cfg, images)
        with lock:
            stats.ok += 1
            stats.images += images
            stats.answered[data.pop("_digest")] += 1
            stats.finished.append(n)
        return web.json_response(data)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    return app


class DevServer:
    """The server on 127.0.0.1 in a background thread; `url` is the API root (…/v1)."""

    def __init__(self, cfg: ServerConfig | None = None, port: int = 0) -> None:
        self.cfg = cfg or ServerConfig()
        self.stats = ServerStats()
        self._port = port
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self.port = 0

    def _serve(self) -> None:
        from aiohttp import web

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(make_app(self.cfg, self.stats), access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", self._port)
        loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # port 0: the OS picked a free one
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    def start(self) -> DevServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("dev server did not start")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--fault-every", type=int, default=0)
    ap.add_argument("--reasoning-content", action="store_true")
    args = ap.parse_args()
    srv = DevServer(ServerConfig(latency_s=args.latency_ms / 1000, fault_every=args.fault_every,
                                 reasoning_content=args.reasoning_content), port=args.port).start()
    print(f"serving {srv.url}/chat/completions", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.stop()


if __name__ == "__main__":
    _main()
