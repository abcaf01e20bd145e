"""A page loaded in a real headless Chromium, driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: JSON messages separated by NUL on file descriptors 3 and 4), so no
websocket client is needed. Tests skip when no Chromium is installed (Debian package `chromium`)."""

from __future__ import annotations

import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


@dataclass
class PageLoad:
    images: list[dict[str, Any]]
    console: list[dict[str, Any]] = field(default_factory=list)  # console messages of type error / warning
    exceptions: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)  # failed loads and other browser-side errors
    title: str = ""
    text: str = ""

    @property
    def errors(self) -> list[str]:
        return ([f"console.{c['type']}: {c['text']}" for c in self.console if c["type"] in ("error", "assert")]
                + self.exceptions + self.log_errors)


class _Pipe:
    def __init__(self, binary: str, profile: Path) -> None:
        r_cmd, self._w = os.pipe()
        self._r, w_out = os.pipe()
        # high descriptors first, so the dup2 to 3 and 4 in the child cannot overwrite one another
        hi_r, hi_w = fcntl.fcntl(r_cmd, fcntl.F_DUPFD, 100), fcntl.fcntl(w_out, fcntl.F_DUPFD, 100)
        os.close(r_cmd)
        os.close(w_out)

        def child() -> None:
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=child, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(hi_r)
        os.close(hi_w)
        self.messages: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self._id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._r, 1 << 16):
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self.messages.put(json.loads(msg))
        self.messages.put(None)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            got = self.messages.get(timeout=max(0.1, deadline - time.time()))
            if got is None:
                raise RuntimeError(f"chromium exited during {method}")
            if got.get("id") == self._id:
                if "error" in got:
                    raise RuntimeError(f"{method}: {got['error']}")
                return got.get("result", {})
            self.events.append(got)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        for e in self.events:
            if e.get("method") == method:
                return e
        while time.time() < deadline:
            got = self.messages.get(timeout=max(0.1, deadline - time.time()))
            if got is None:
                raise RuntimeError(f"chromium exited waiting for {method}")
            self.events.append(got)
            if got.get("method") == method:
                return got
        raise TimeoutError(method)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, OSError, queue.Empty):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)


_IMAGES = ("JSON.stringify(Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, "
           "width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width})))")


def load_page(path: Path, profile: Path, settle_s: float = 0.5) -> PageLoad:
    """Open `path` in headless Chromium; report its images (decoded sizes), console errors, exceptions
    and failed loads."""
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH")
    pipe = _Pipe(binary, profile)
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.call(f"{domain}.enable", session=session)
        pipe.call("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session)
        pipe.wait_event("Page.loadEventFired")
        time.sleep(settle_s)
        images = json.loads(pipe.call("Runtime.evaluate", {"expression": _IMAGES, "returnByValue": True},
                                      session=session)["result"]["value"])
        meta = pipe.call("Runtime.evaluate", {"expression": "JSON.stringify([document.title, document.body.innerText])",
                                              "returnByValue": True}, session=session)["result"]["value"]
        title, text = json.loads(meta)
        out = PageLoad(images=images, title=title, text=text)
        for e in pipe.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled":
                out.console.append({"type": p.get("type"),
                                    "text": " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", []))})
            elif e.get("method") == "Runtime.exceptionThrown":
                out.exceptions.append(json.dumps(p.get("exceptionDetails", {}))[:500])
            elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.log_errors.append(f"{p['entry'].get('source')}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out
    finally:
        pipe.close()
