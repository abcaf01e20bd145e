"""Caption → text-only teacher, retry rounds, the vLLM processor plumbing, and the cache under concurrency."""

from __future__ import annotations

import json
import multiprocessing as mp

import pyarrow as pa
import pytest

from pipeline.rundir import ShardWriter, read_table
from pipeline.schema import SCHEMA_VERSIONS
from teachers.cache import GenerationCache
from teachers.caption import CaptionConfig
from teachers.caption import run as run_caption
from teachers.devserver import DevServer
from teachers.engines import OpenAIEngineConfig, ScriptedEngineConfig, VLLMEngineConfig
from teachers.generate import GenerateConfig, build_requests, expand, run

from .conftest import chains_by_id, make_ctx, synthetic_problems


def test_caption_feeds_a_text_only_teacher(run_dir, problems12):
    with DevServer() as srv:
        cap = CaptionConfig(engine=OpenAIEngineConfig(base_url=srv.url, model="dev-vl", api_key_env=None),
                            workers=0)
        m = run_caption(cap, make_ctx(run_dir, step="caption", stage="caption"))
        assert srv.stats.images == 12  # every image went to the captioner as a data URI
    m.check_counts()
    problems = read_table(run_dir / "caption").to_pylist()
    assert len(problems) == 12 and m.metrics["captioned"] == 12
    assert all(p["image_description"].startswith("The answer is \\boxed{") for p in problems)

    gen = GenerateConfig(engine=ScriptedEngineConfig(text_only=True), workers=0, samples_per_problem=2)
    gm = run(gen, make_ctx(run_dir, inputs={"problems": [run_dir / "caption"]}))
    gm.check_counts()
    chains = chains_by_id(run_dir / "generate")
    assert gm.kept == 24
    for c in chains.values():
        prompt = json.loads(c["prompt"])
        assert isinstance(prompt[-1]["content"], str) and prompt[-1]["content"].startswith("Image description:")


def test_text_only_teacher_without_captions_counts_bad_input(run_dir, problems12):
    gen = GenerateConfig(engine=ScriptedEngineConfig(text_only=True), workers=0, samples_per_problem=2)
    m = run(gen, make_ctx(run_dir))
    m.check_counts()
    needs = sum(1 for p in problems12 if p["needs_image"])
    assert m.quarantined == {"engine_error:bad_input": 2 * needs}
    assert m.kept == 2 * (12 - needs) and m.metrics["requests"] == 2 * (12 - needs)


def test_scripted_captioner_in_demo_mode(run_dir, problems12):
    m = run_caption(CaptionConfig(engine=ScriptedEngineConfig(), workers=0), make_ctx(run_dir, step="caption", stage="caption"))
    descs = read_table(run_dir / "caption", ["image_description"]).column(0).to_pylist()
    assert m.kept == 12 and all(d.startswith("Image 1: a 320x240") for d in descs)


def _write_retry(step_dir, ids):
    schema = pa.schema([pa.field("problem_id", pa.string()), pa.field("round", pa.int32()),
                        pa.field("reason", pa.string())])
    with ShardWriter(step_dir / "retry", schema, "retry") as w:
        w.write([{"problem_id": i, "round": 0, "reason": "no_correct_chain"} for i in ids])
    (step_dir / "retry").mkdir(parents=True, exist_ok=True)


def test_round_one_generates_only_the_retry_list(run_dir, problems12):
    ids = [p["problem_id"] for p in problems12[:5]]
    _write_retry(run_dir / "curate", ids)
    gen = GenerateConfig(engine=ScriptedEngineConfig(), workers=0, samples_per_problem=3)
    ctx = make_ctx(run_dir, step="generate-r1", round_=1,
                   inputs={"problems": [run_dir / "ingest"], "retry": [run_dir / "curate"]})
    m = run(gen, ctx)
    m.check_counts()
    chains = chains_by_id(run_dir / "generate-r1")
    assert {c["problem_id"] for c in chains.values()} == set(ids) and len(chains) == 15
    assert all(c["round"] == 1 for c in chains.values())
    round0 = {s["chain_id"] for w in build_requests(problems12[:5], gen, 0, 0)[0] for s in w["samples"]}
    assert round0.isdisjoint(chains)  # new ids, hence new seeds, in a new round

    _write_retry(run_dir / "curate-r1", [])
    ctx = make_ctx(run_dir, step="generate-r2", round_=2,
                   inputs={"problems": [run_dir / "ingest"], "retry": [run_dir / "curate-r1"]})
    m = run(gen, ctx)
    m.check_counts()
    assert m.rows_in == m.kept == 0 and read_table(run_dir / "generate-r2").num_rows == 0


def test_vllm_processor_plumbing_without_vllm():
    """The ray.data.llm config validates and rows map to/from its columns (the engine itself needs a GPU)."""
    from teachers.engines.vllm import postprocess, preprocess, processor_config

    cfg = GenerateConfig(engine=VLLMEngineConfig(model="deepseek-ai/DeepSeek-R1", tensor_parallel_size=8,
                                                 text_only=True), workers=2, batch_size=32)
    pc = processor_config(cfg)
    assert pc.engine_kwargs["tensor_parallel_size"] == 8 and pc.concurrency == 2 and pc.should_continue_on_error
    p = {**synthetic_problems(1)[0], "image_description": "a triangle"}
    work = build_requests([p], cfg, 0, 0)[0][0]
    assert len(work["samples"]) == cfg.samples_per_problem
    req = expand(work)[1]
    assert req["sample_idx"] == 1 and req["messages"] == work["messages"]
    row = preprocess(req)
    # plain-string content stays a string: R1's template concatenates it
    assert row["sampling_params"]["seed"] == req["seed"] and isinstance(row["messages"][0]["content"], str)
    out = postprocess({**row, "generated_text": "a b</think>The answer is 3", "num_generated_tokens": 4096,
                       "num_input_tokens": 50, "time_taken_llm": 1.5, "__inference_error__": ""},
                      think_start="<think>", think_end="</think>")
    assert out["finish_reason"] == "length" and out["reasoning"] == "a b" and out["prompt"] == req["prompt"]
    failed = postprocess({**row, "generated_text": "", "num_generated_tokens": 0, "__inference_error__": "boom"},
                         think_start="<think>", think_end="</think>")
    assert failed["finish_reason"] == "error" and failed["_error_kind"] == "inference_error"


def _hammer(args):
    directory, worker = args
    cache = GenerationCache(directory)
    bad = 0
    for i in range(300):
        key = f"{i % 20:02d}" + "ab" * 19
        cache.put(key, {"text": f"value-{i % 20}-" + "x" * 5000, "worker": worker})
        got = cache.get(key)
        bad += got is None or not got["text"].startswith(f"value-{i % 20}-")
    return bad


def test_cache_is_safe_under_concurrent_writers(tmp_path):
    with mp.get_context("spawn").Pool(2) as pool:
        bad = pool.map(_hammer, [(str(tmp_path), w) for w in range(2)])
    assert bad == [0, 0]
    assert len(list(tmp_path.rglob("*.json"))) == 20 and not list(tmp_path.rglob(".tmp-*"))


def test_unusable_row_sampling_falls_back_to_config():
    from teachers.generate import _sampling

    cfg = GenerateConfig(engine=ScriptedEngineConfig(), max_tokens=500, repetition_penalty=1.1)
    s = _sampling(cfg, {"problem_id": "p", "max_tokens": float("nan"), "repetition_penalty": -2.0, "top_p": 0.5}, 7)
    assert s == {"temperature": cfg.temperature, "top_p": 0.5, "max_tokens": 500, "repetition_penalty": 1.1, "seed": 7}


def test_generate_needs_an_explicit_engine():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="engine"):
        GenerateConfig()
    assert "chains" in SCHEMA_VERSIONS


@pytest.mark.parametrize("path", ["configs/demo.yaml", "configs/r1v-38b.yaml"])
def test_teacher_configs_validate(path):
    from pathlib import Path

    from pipeline.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / path)
    assert cfg.generate is not None and cfg.caption is not None
    if "r1v" in path:
        assert cfg.generate.engine.kind == "vllm" and cfg.generate.engine.tensor_parallel_size == 8
        assert cfg.generate.engine.text_only and cfg.caption.engine.multimodal
