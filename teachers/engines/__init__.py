"""The teacher engine API, picked from one explicit dict.

    from teachers.engines import make_engine, GenRequest, ScriptedEngineConfig
    engine = make_engine(ScriptedEngineConfig())
    [res] = engine.generate([GenRequest(messages=[{"role": "user", "content": "1+1?"}],
                                        sampling={"max_tokens": 256, "seed": 1}, problem=row)])

Every engine takes OpenAI-style chat `messages` (image parts are `{"type": "image_url", "image_url":
{"url": "data:image/png;base64,..."}}`), a `sampling` dict (temperature, top_p, max_tokens, seed,
repetition_penalty) and returns one `GenResult` per request, in order. A failure of one request is a
result with `finish_reason="error"` and `error_kind`; a failure of the engine itself (model not found,
server unreachable at start) raises. Engines load their heavy dependencies only when constructed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import Field

from pipeline.config import StageConfig

SAMPLING_KEYS = ("temperature", "top_p", "max_tokens", "repetition_penalty", "seed")


class EngineBase(StageConfig):
    """Fields every engine shares."""

    model: str = Field("", description="model name (server model id, HF repo id or local directory)")
    revision: str | None = Field(None, description="model revision (part of the cache key)")
    teacher: str | None = Field(
        None, description="teacher name written to chains and hashed into chain ids (default: the model name)"
    )
    text_only: bool = Field(
        False,
        description="the model cannot see images: prompts carry the caption stage's image_description instead",
    )
    think_start: str = Field("<think>", description="marker opening the reasoning part of a completion")
    think_end: str = Field("</think>", description="marker closing the reasoning part of a completion")

    def teacher_name(self) -> str:
        return self.teacher or self.model or self.kind  # type: ignore[attr-defined]

    def cache_identity(self) -> dict[str, Any]:
        """What decides the engine's output besides prompt and sampling (the cache key's engine part)."""
        return {"kind": self.kind, "model": self.model, "revision": self.revision,  # type: ignore[attr-defined]
                "model_stamp": _local_model_stamp(self.model), "think": [self.think_start, self.think_end]}


class ScriptedEngineConfig(EngineBase):
    kind: Literal["scripted"] = "scripted"
    model: str = Field("scripted-teacher", description="name of the simulated teacher")
    p_correct: float = Field(0.6, ge=0, le=1, description="share of chains ending in the gold answer")
    p_loop: float = Field(0.1, ge=0, le=1, description="share of chains caught in a re-check loop (at penalty 1.0)")
    p_truncate: float = Field(0.05, ge=0, le=1, description="share of chains that ramble past max_tokens")
    tokens_per_level: int = Field(150, ge=10, description="typical reasoning tokens per difficulty level")
    latency_s: float = Field(0.0, ge=0, description="simulated seconds per request (benchmarks, kill tests)")

    def cache_identity(self) -> dict[str, Any]:
        # Every knob but latency changes the simulated text.
        return {"kind": self.kind, **self.model_dump(exclude={"latency_s", "kind", "teacher", "text_only"})}


class HFEngineConfig(EngineBase):
    kind: Literal["hf"] = "hf"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto = bfloat16 on GPU, float32 on CPU"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    batch_size: int = Field(8, ge=1, description="sequences per transformers generate() call")
    multimodal: bool = Field(False, description="load AutoProcessor + AutoModelForImageTextToText")
    attn_implementation: str | None = Field(None, description="e.g. sdpa, flash_attention_2 (default: transformers')")

    def cache_identity(self) -> dict[str, Any]:
        # logic 2: the repetition penalty skips left padding (chains cached before could differ by batch)
        return {**super().cache_identity(), "dtype": self.dtype, "multimodal": self.multimodal, "logic": 2}


class OpenAIEngineConfig(EngineBase):
    kind: Literal["openai"] = "openai"
    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible API root (ends in /v1)")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="name of the environment variable holding the API key (the key is never logged)"
    )
    max_concurrency: int = Field(16, ge=1, description="requests in flight per worker (shared by its batches)")
    max_retries: int = Field(
        6, ge=0, description="retries on 408/409/429/5xx, timeouts and dropped connections (the openai client's "
        "exponential backoff with jitter, 0.5 s doubling to 8 s; a server's Retry-After up to 2 min is honoured)"
    )
    timeout_s: float = Field(600.0, gt=0, description="timeout of one attempt (long chains take minutes)")
    deadline_s: float = Field(
        3600.0, gt=0, description="bound on one request's total wait: attempts, backoff and waiting for a slot"
    )
    sampling_extensions: list[Literal["repetition_penalty", "top_k", "seed"]] = Field(
        default_factory=lambda: ["repetition_penalty", "top_k", "seed"],
        description="sampling fields outside the OpenAI API that this endpoint takes (sent in extra_body): vLLM and "
        "SGLang take all three; a hosted API usually none (an endpoint rejecting one fails the run once, saying so)",
    )
    extra_body: dict[str, Any] = Field(default_factory=dict, description="extra JSON fields sent with each request")

    def cache_identity(self) -> dict[str, Any]:
        return {**super().cache_identity(), "extra_body": self.extra_body,
                "sampling_extensions": sorted(self.sampling_extensions)}


class VLLMEngineConfig(EngineBase):
    kind: Literal["vllm"] = "vllm"
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica (tensor parallel)")
    pipeline_parallel_size: int = Field(1, ge=1, description="pipeline stages per replica")
    max_model_len: int | None = Field(None, ge=256, description="context length (prompt + completion)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    dtype: str = Field("auto", description="vLLM dtype")
    multimodal: bool = Field(False, description="send images as multi_modal_data")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="more vllm.LLM / engine arguments")
    max_concurrent_batches: int = Field(8, ge=1, description="batches in flight per replica (ray.data.llm)")
    max_restarts: int = Field(
        2, ge=0,
        description="times a replica whose engine died (EngineDeadError) is restarted before the run fails "
        "naming the engine's error (ray.data.llm's default, forever, hangs on a crash that repeats)",
    )
    in_process: bool = Field(
        False,
        description="run vllm.LLM in this process (needs a GPU here); default: a ray.data.llm processor on "
        "Ray's GPU workers, one run per generate() call (the driver of `ray job submit` is often GPU-less)",
    )
    replicas: int = Field(
        1, ge=1, description="engine replicas for callers outside the generate stage (judge, evaluate); "
        "the generate stage uses its own `workers`"
    )
    batch_size: int = Field(16, ge=1, description="rows per ray.data.llm batch for those callers")
    stage_cpus: float = Field(
        1.0, gt=0, description="CPUs Ray reserves per actor of the processor's CPU stages (image preparation, "
        "chat template, tokenize, detokenize: each holds its share while the processor runs)"
    )

    def cache_identity(self) -> dict[str, Any]:
        # quantization, context length and image handling in engine_kwargs change the text generated
        return {**super().cache_identity(), "dtype": self.dtype, "max_model_len": self.max_model_len,
                "multimodal": self.multimodal, "engine_kwargs": self.engine_kwargs}


EngineConfig = Annotated[
    ScriptedEngineConfig | HFEngineConfig | OpenAIEngineConfig | VLLMEngineConfig, Field(discriminator="kind")
]


def _local_model_stamp(model: str) -> list | None:
    """Sizes and mtimes of a local model directory's files, so rebuilt weights miss the cache."""
    if not model:
        return None
    from pipeline.paths import tree_stats

    return tree_stats(model) if Path(model).is_dir() else None


@dataclass
class GenRequest:
    messages: list[dict[str, Any]]
    sampling: dict[str, Any] = field(default_factory=dict)
    problem: dict[str, Any] | None = None
    request_id: str = ""


@dataclass
class GenResult:
    text: str = ""
    reasoning: str | None = None
    response: str | None = None
    finish_reason: str = "stop"  # stop / length / error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None
    error_kind: str | None = None
    retries: int = 0
    simulated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def error_result(kind: str, msg: str, latency_s: float = 0.0, retries: int = 0) -> GenResult:
    return GenResult(finish_reason="error", error=f"{kind}: {msg}", error_kind=kind,
                     latency_s=latency_s, retries=retries)


class Engine(Protocol):
    cfg: Any

    def generate(self, requests: list[GenRequest]) -> list[GenResult]: ...

    def close(self) -> None: ...


def split_think(text: str, start: str, end: str, finish_reason: str) -> tuple[str, str]:
    """(reasoning, response) of a completion.

    R1-style templates put the opening marker in the prompt, so a completion may hold only the closing
    one. Without a closing marker a stopped completion is all response and a truncated one all reasoning.
    """
    if end and end in text:
        head, _, tail = text.partition(end)
        if start and start in head:
            head = head.split(start, 1)[1]
        return head.strip(), tail.strip()
    if start and start in text:
        before, _, after = text.partition(start)
        return after.strip(), before.strip()
    if finish_reason == "length":
        return text.strip(), ""
    return "", text.strip()


def sampling_value(sampling: dict[str, Any], key: str, default: Any) -> Any:
    v = sampling.get(key)
    return default if v is None else v


def api_key(env_name: str | None) -> str | None:
    return os.environ.get(env_name) if env_name else None


def _scripted(cfg: ScriptedEngineConfig) -> Engine:
    from teachers.engines.scripted import ScriptedEngine

    return ScriptedEngine(cfg)


def _hf(cfg: HFEngineConfig) -> Engine:
    from teachers.engines.hf import HFEngine

    return HFEngine(cfg)


def _openai(cfg: OpenAIEngineConfig) -> Engine:
    from teachers.engines.openai import OpenAIEngine

    return OpenAIEngine(cfg)


def _vllm(cfg: VLLMEngineConfig) -> Engine:
    from teachers.engines.vllm import VLLMEngine

    return VLLMEngine(cfg)


ENGINES: dict[str, Callable[[Any], Engine]] = {
    "scripted": _scripted,
    "hf": _hf,
    "openai": _openai,
    "vllm": _vllm,
}

_CONFIGS = {"scripted": ScriptedEngineConfig, "hf": HFEngineConfig, "openai": OpenAIEngineConfig,
            "vllm": VLLMEngineConfig}


def engine_config(data: dict[str, Any] | EngineBase) -> EngineBase:
    """An engine config from a plain dict (as shipped to Ray workers); raises on an unknown kind."""
    if isinstance(data, EngineBase):
        return data
    kind = data.get("kind")
    if kind not in _CONFIGS:
        raise ValueError(f"engine.kind: unknown engine {kind!r} (known: {sorted(_CONFIGS)})")
    return _CONFIGS[kind].model_validate(data)


def make_engine(cfg: EngineBase | dict[str, Any]) -> Engine:
    cfg = engine_config(cfg)
    return ENGINES[cfg.kind](cfg)  # type: ignore[attr-defined]
