"""Generate-stage throughput against a bare loop over the same engine, and the openai engine's request rate.

    python benchmarks/generate.py                     # CPU: hf stage vs bare, openai at concurrency 1/16/64
    python benchmarks/generate.py --only hf --out /tmp/gen.json
    python benchmarks/generate.py --gpu --out gen-gpu.json   # GPU box; needs torch + transformers, not Ray

hf (CPU): a small random Qwen2 (hidden 256, 4 layers; tokenizer trained on the fly) saved and loaded
with from_pretrained. Bare: build the engine, call `engine.generate` over the same requests in
batches. Stage: the whole generate stage (`run(cfg, ctx)`: requests, Ray Data actor pool of one
1-CPU worker, shard writing, manifest), cache off; one torch thread on both sides. Interleaved
repeats, best of each. Printed: end-to-end tokens/s (model load and, for the stage, worker
start-up included) and steady tokens/s after the first batch, with the ratios stage/bare.

openai: the dev server (teachers/devserver.py) in a subprocess with 10 ms latency per request; the
engine sends N requests at concurrency 1, 16 and 64; requests/s for each.

--gpu: a ~0.5B random-init Qwen2-shaped model (Qwen2-0.5B dimensions, built from a config, no hub),
prompt 512 / completion 2048 tokens. Stage side = the stage's per-batch worker (`GenerateWorker`)
driven directly over the stage's request rows (no Ray); bare = `engine.generate` on the same
requests. Tokens/s for both and their ratio, written as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _problems(n: int) -> list[dict]:
    from tests.teachers.conftest import synthetic_problems

    return [{**p, "images": None, "needs_image": False} for p in synthetic_problems(n)]


def _ctx(run_dir: Path, problems_dir: Path):
    from pipeline.runner import StageContext

    out = run_dir / "generate"
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(run_dir=run_dir, step="generate", stage="generate", round=0, out_dir=out,
                        inputs={"problems": [problems_dir]},
                        run_config=SimpleNamespace(run=SimpleNamespace(seed=0, root=str(run_dir.parent))),
                        fingerprint="bench")


def bench_hf_cpu(args: argparse.Namespace) -> dict:
    import ray

    from teachers.engines import GenRequest, HFEngineConfig, make_engine
    from teachers.generate import GenerateConfig, build_requests, expand, run
    from tests.teachers.conftest import build_tiny_chat_model, write_problems

    tmp = Path(tempfile.mkdtemp(prefix="r1v-bench-gen-"))
    model = build_tiny_chat_model(tmp / "model", hidden=256, layers=4)
    problems = _problems(args.problems)
    write_problems(tmp / "problems", problems)
    engine_cfg = HFEngineConfig(model=str(model), text_only=True, batch_size=args.batch_size)
    cfg = GenerateConfig(engine=engine_cfg, samples_per_problem=args.k, max_tokens=args.max_tokens,
                         temperature=0.8, workers=1, cpus_per_worker=1, batch_size=args.batch_size,
                         flush_rows=64, cache=False)
    work, _ = build_requests(problems, cfg, 0, 0)
    reqs = [r for w in work for r in expand(w)]
    gen_reqs = [GenRequest(messages=json.loads(r["messages"]), sampling=r["sampling"], problem=None) for r in reqs]

    # One intra-op thread on both sides (Ray gives a 1-CPU actor OMP_NUM_THREADS=1): on a shared 2-core
    # box, two spinning OpenMP threads stall for seconds whenever another process takes a core.
    import torch

    torch.set_num_threads(1)

    def bare() -> dict:
        t0 = time.perf_counter()
        engine = make_engine(engine_cfg)
        tokens, first = 0, None
        for i in range(0, len(gen_reqs), args.batch_size):
            tokens += sum(r.completion_tokens for r in engine.generate(gen_reqs[i : i + args.batch_size]))
            if first is None:
                first = (time.perf_counter(), tokens)
        end = time.perf_counter()
        return {"s": end - t0, "tokens": tokens, "steady": (tokens - first[1]) / (end - first[0])}

    def stage(rep: int) -> dict:
        t0 = time.perf_counter()
        m = run(cfg, _ctx(tmp / "runs" / f"bench{rep}", tmp / "problems"))
        return {"s": time.perf_counter() - t0, "tokens": m.metrics["completion_tokens"],
                "steady": m.metrics["steady_tokens_per_s"], "startup_s": m.metrics["startup_s"]}

    load_before = os.getloadavg()[0]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    bare_runs, stage_runs = [], []
    for rep in range(args.repeat):  # interleaved, best of each: other load on the machine hits both alike
        bare_runs.append(bare())
        stage_runs.append(stage(rep))
    ray.shutdown()
    b = min(bare_runs, key=lambda r: r["s"])
    st = min(stage_runs, key=lambda r: r["s"])
    b_steady = max(r["steady"] for r in bare_runs)
    st_steady = max(r["steady"] for r in stage_runs)
    tokens = b["tokens"]
    assert st["tokens"] == tokens, "stage and bare loop generated different chains"
    out = {"requests": len(reqs), "completion_tokens": tokens, "bare_s": round(b["s"], 2),
           "stage_s": round(st["s"], 2), "stage_startup_s": st["startup_s"],
           "bare_tok_s": round(tokens / b["s"], 1), "stage_tok_s": round(tokens / st["s"], 1),
           "ratio_end_to_end": round(b["s"] / st["s"], 3),
           # What the stage costs on top of the bare loop: worker process, imports, Ray Data, writes.
           "stage_overhead_s": round(st["s"] - b["s"], 2),
           "bare_steady_tok_s": round(b_steady, 1), "stage_steady_tok_s": round(st_steady, 1),
           "ratio_steady": round(st_steady / b_steady, 3),
           # 1-minute load average before and after: another process on the 2 cores skews both sides.
           "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    print(f"hf cpu | {len(reqs)} requests | {tokens} tokens | end to end: bare {out['bare_tok_s']} tok/s, stage "
          f"{out['stage_tok_s']} tok/s (start-up {st['startup_s']:.1f}s, overhead {out['stage_overhead_s']:.1f}s), "
          f"ratio {out['ratio_end_to_end']} | "
          f"steady: bare {out['bare_steady_tok_s']} tok/s, stage {out['stage_steady_tok_s']} tok/s, "
          f"ratio {out['ratio_steady']} | load {out['loadavg'][0]} -> {out['loadavg'][1]}")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_openai(args: argparse.Namespace) -> dict:
    from teachers.engines import GenRequest, OpenAIEngineConfig, make_engine

    port = _free_port()
    srv = subprocess.Popen([sys.executable, "-m", "teachers.devserver", "--port", str(port), "--latency-ms", "10"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        srv.stdout.readline()  # "serving ..." once it listens
        out = {}
        for conc, n in ((1, 100), (16, 800), (64, 2000)):
            eng = make_engine(OpenAIEngineConfig(base_url=f"http://127.0.0.1:{port}/v1", model="dev",
                                                 api_key_env=None, max_concurrency=conc))
            reqs = [GenRequest(messages=[{"role": "user", "content": f"question {i}"}],
                               sampling={"seed": i, "max_tokens": 256}, request_id=str(i)) for i in range(n)]
            t0 = time.perf_counter()
            res = eng.generate(reqs)
            dt = time.perf_counter() - t0
            assert not any(r.error for r in res)
            out[f"concurrency_{conc}"] = round(n / dt, 1)
            print(f"openai | concurrency {conc:>2} | {n} requests | {n / dt:,.1f} requests/s")
        return out
    finally:
        srv.terminate()
        srv.wait(10)


def _gpu_model(directory: Path) -> Path:
    """Qwen2-0.5B dimensions with random weights; a small byte-level BPE trained here.

    The embedding keeps Qwen2's 151,936 rows; ids past the trained vocabulary decode to nothing,
    which is all a random model needs. No pytest or test helpers: the GPU box may lack them.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"What is {i} plus {i * 7 % 97}? Please reason step by step." for i in range(500)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
        chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(directory)
    cfg = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(directory)
    return directory


def _question_of(tokens: int, model: Path, seed: int) -> str:
    """A question whose chat prompt is about `tokens` tokens long."""
    from transformers import AutoTokenizer

    tk = AutoTokenizer.from_pretrained(model)
    words: list[str] = []
    while True:
        words += [f"{(seed * 7919 + len(words) * 31) % 1000} plus" for _ in range(2)]
        msgs = [{"role": "user", "content": " ".join(words)}]
        if len(tk.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]) >= tokens:
            return " ".join(words)


def bench_gpu(args: argparse.Namespace) -> dict:
    import pyarrow as pa
    import torch

    from teachers.engines import GenRequest, HFEngineConfig
    from teachers.generate import WORK, GenerateConfig, GenerateWorker, build_requests, expand

    tmp = Path(tempfile.mkdtemp(prefix="r1v-bench-gpu-"))
    model = _gpu_model(tmp / "model")
    n, prompt_len = args.gpu_requests, 512
    problems = [{"problem_id": f"p{i}", "question": _question_of(prompt_len, model, i), "answer": "1",
                 "answer_type": "number", "images": None} for i in range(n)]
    engine_cfg = HFEngineConfig(model=str(model), text_only=True, batch_size=args.gpu_batch, dtype="bfloat16",
                                device="cuda" if torch.cuda.is_available() else "cpu")
    cfg = GenerateConfig(engine=engine_cfg, samples_per_problem=1, max_tokens=args.gpu_completion, temperature=0.8,
                         workers=0, batch_size=args.gpu_batch, cache=False, prompt={"instruction": ""})
    work, _ = build_requests(problems, cfg, 0, 0)
    rows = [r for w in work for r in expand(w)]  # one sample per problem here
    worker = GenerateWorker(engine_cfg.model_dump())
    engine = worker.engine  # one loaded model serves both sides
    warm = [GenRequest(messages=json.loads(rows[0]["messages"]), sampling={**rows[0]["sampling"], "max_tokens": 8})]
    engine.generate(warm)

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    bare_tokens = 0
    for i in range(0, n, args.gpu_batch):
        chunk = [GenRequest(messages=json.loads(r["messages"]), sampling=r["sampling"]) for r in rows[i : i + args.gpu_batch]]
        bare_tokens += sum(r.completion_tokens for r in engine.generate(chunk))
    sync()
    bare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = pa.Table.from_pylist(work, schema=WORK)
    stage_tokens = 0
    for i in range(0, n, args.gpu_batch):
        out = worker(table.slice(i, args.gpu_batch))
        stage_tokens += sum(out.column("completion_tokens").to_pylist())
    sync()
    stage_s = time.perf_counter() - t0
    prompt_tokens = sum(out.column("prompt_tokens").to_pylist()) / out.num_rows
    res = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "params": sum(p.numel() for p in engine.model.parameters()), "requests": n, "batch": args.gpu_batch,
           "prompt_tokens_mean": prompt_tokens, "completion_tokens": args.gpu_completion,
           "bare_tok_s": round(bare_tokens / bare_s, 1), "stage_tok_s": round(stage_tokens / stage_s, 1),
           "ratio": round((stage_tokens / stage_s) / (bare_tokens / bare_s), 3)}
    print(json.dumps(res))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["hf", "openai"], default=None)
    ap.add_argument("--gpu", action="store_true", help="the GPU variant (no Ray needed)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved repeats; best of each side")
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gpu-requests", type=int, default=32)
    ap.add_argument("--gpu-batch", type=int, default=32)
    ap.add_argument("--gpu-completion", type=int, default=2048)
    args = ap.parse_args()
    results: dict = {}
    if args.gpu:
        results["hf_gpu"] = bench_gpu(args)
    else:
        if args.only in (None, "hf"):
            results["hf_cpu"] = bench_hf_cpu(args)
        if args.only in (None, "openai"):
            results["openai_rps"] = bench_openai(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
