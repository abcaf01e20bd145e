"""The per-sample generation cache, shared by every run under one root (DESIGN.md, "Run directory").

Content-addressed: one JSON file per key under `<dir>/<key[:2]>/<key>.json`, written to a temporary
name and renamed, so any number of workers and runs may write at once and a reader sees a complete
entry or none. The key hashes the engine's identity (kind, model, revision, local weight stamps),
the rendered prompt and the sampling parameters including the seed; nothing else, so changing an
unrelated setting (batch size, workers, flush size) re-buys no chain. Only successful results are
stored: an error is retried next time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pipeline.rundir import atomic_write_bytes, stable_hash

log = logging.getLogger(__name__)


def cache_key(identity: dict[str, Any], messages_json: str, sampling: dict[str, Any]) -> str:
    return stable_hash("r1v-gen-cache/1", identity, messages_json, dict(sorted(sampling.items())), n=40)


class GenerationCache:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        p = self._path(key)
        try:
            return json.loads(p.read_bytes())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            # A damaged entry is a miss (it is rewritten), never a failed run.
            log.warning("generation cache: unreadable entry %s (%s); regenerating", p, e)
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        atomic_write_bytes(self._path(key), json.dumps(value, ensure_ascii=False).encode())
