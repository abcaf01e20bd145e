"""vLLM as a teacher, in-process on GPU workers (install the `.[vllm]` extra; imported lazily).

Two entry points:

- `vllm_processor(gen_cfg)`: what the generate stage uses. Ray's `ray.data.llm` processor (chat
  template → tokenize → vLLM engine → detokenize) over the request dataset, `workers` replicas of
  tensor_parallel_size x pipeline_parallel_size GPUs each. It keeps only `outputs[0]`, which is why
  the stage sends one row per sample with its own seed; it reports no finish reason, so truncation is
  `num_generated_tokens >= max_tokens`. Failed rows come back with `__inference_error__` and become
  error chains (`should_continue_on_error`); a dead engine stays fatal.
- `VLLMEngine`: the `Engine` API over `vllm.LLM.chat`, for callers holding one GPU process (the
  assess judge, evaluate's student generation). It has real finish reasons.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial
from typing import Any

from teachers.engines import GenRequest, GenResult, VLLMEngineConfig, sampling_value, split_think

log = logging.getLogger(__name__)


def _engine_kwargs(cfg: VLLMEngineConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "dtype": cfg.dtype,
    }
    if cfg.revision:
        kw["revision"] = cfg.revision
    if cfg.max_model_len:
        kw["max_model_len"] = cfg.max_model_len
    kw.update(cfg.engine_kwargs)
    return kw


def _sampling_params(s: dict[str, Any]) -> dict[str, Any]:
    return {
        "temperature": float(sampling_value(s, "temperature", 1.0)),
        "top_p": float(sampling_value(s, "top_p", 1.0)),
        "max_tokens": int(sampling_value(s, "max_tokens", 4096)),
        "repetition_penalty": float(sampling_value(s, "repetition_penalty", 1.0)),
        "seed": int(sampling_value(s, "seed", 0)),
    }


def _parts(messages: list[dict]) -> list[dict]:
    # One content type per column: Arrow cannot hold str in one row and a list of parts in the next.
    return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]
             if isinstance(m["content"], str) else m["content"]} for m in messages]


def preprocess(row: dict[str, Any]) -> dict[str, Any]:
    """Request row → ray.data.llm input. Our prompt record moves aside: the processor writes `prompt`."""
    out = {k: row[k] for k in ("chain_id", "problem_id", "round", "teacher", "sample_idx", "seed", "sampling")}
    out["r1v_prompt"] = row["prompt"]
    out["messages"] = _parts(json.loads(row["messages"]))
    out["sampling_params"] = _sampling_params(row["sampling"])
    return out


def postprocess(row: dict[str, Any], think_start: str, think_end: str) -> dict[str, Any]:
    """ray.data.llm output row → a chain row (with the stage's accounting columns)."""
    err = row.get("__inference_error__") or None
    max_tokens = int(row["sampling"]["max_tokens"])
    n_gen = int(row.get("num_generated_tokens") or 0)
    text = row.get("generated_text") or ""
    finish = "error" if err else ("length" if n_gen >= max_tokens else "stop")
    reasoning, response = (None, None) if err else split_think(text, think_start, think_end, finish)
    return {
        "chain_id": row["chain_id"], "problem_id": row["problem_id"], "round": row["round"],
        "teacher": row["teacher"], "sample_idx": row["sample_idx"], "seed": row["seed"],
        "prompt": row["r1v_prompt"], "completion": None if err else text, "reasoning": reasoning,
        "response": response, "finish_reason": finish, "prompt_tokens": int(row.get("num_input_tokens") or 0),
        "completion_tokens": n_gen, "sampling": row["sampling"],
        "latency_s": float(row.get("time_taken_llm") or 0.0),
        "error": f"inference_error: {err}" if err else None, "simulated": False,
        "_retries": 0, "_error_kind": "inference_error" if err else None,
    }


def processor_config(gen_cfg: Any) -> Any:
    from ray.data.llm import vLLMEngineProcessorConfig

    e: VLLMEngineConfig = gen_cfg.engine
    return vLLMEngineProcessorConfig(
        model_source=e.model,
        engine_kwargs=_engine_kwargs(e),
        concurrency=max(1, gen_cfg.workers),
        batch_size=gen_cfg.batch_size,
        max_concurrent_batches=e.max_concurrent_batches,
        should_continue_on_error=True,
        prepare_multimodal_stage={"enabled": e.multimodal},
        chat_template_stage=True,
        tokenize_stage=True,
        detokenize_stage=True,
    )


def vllm_processor(gen_cfg: Any) -> Any:
    from ray.data.llm import build_processor

    e: VLLMEngineConfig = gen_cfg.engine
    return build_processor(processor_config(gen_cfg), preprocess=preprocess,
                           postprocess=partial(postprocess, think_start=e.think_start, think_end=e.think_end))


class VLLMEngine:
    def __init__(self, cfg: VLLMEngineConfig) -> None:
        from vllm import LLM

        self.cfg = cfg
        self.llm = LLM(model=cfg.model, **_engine_kwargs(cfg))

    def close(self) -> None:
        pass

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        from vllm import SamplingParams

        t0 = time.perf_counter()
        params = [SamplingParams(**_sampling_params(r.sampling)) for r in requests]
        outs = self.llm.chat([_parts(r.messages) for r in requests], sampling_params=params, use_tqdm=False)
        dt = time.perf_counter() - t0
        results = []
        for o in outs:
            c = o.outputs[0]
            finish = "length" if c.finish_reason == "length" else "stop"
            reasoning, response = split_think(c.text, self.cfg.think_start, self.cfg.think_end, finish)
            results.append(GenResult(text=c.text, reasoning=reasoning, response=response, finish_reason=finish,
                                     prompt_tokens=len(o.prompt_token_ids or []), completion_tokens=len(c.token_ids),
                                     latency_s=dt))
        return results
