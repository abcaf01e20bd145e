"""Training throughput: our trainer (trainers.loop) vs a plain transformers + DeepSpeed ZeRO-2 loop.

    python benchmarks/train.py                              # CPU smoke figure (tiny student, fp32, gloo)
    python benchmarks/train.py --tiny --gpu --out b.json    # the GPU code path on a tiny shape
    bash benchmarks/gpu_train.sh                            # one GPU: SigLIP-so400m + Qwen2-1.5B shape
    python benchmarks/train.py --real                       # the train stage on SFT shards vs pre-built tensors

Both loops train the same random-init student (LLaVA layout: SigLIP-so400m-shaped encoder 384px ->
2-layer MLP projector -> Qwen2-1.5B-shaped LLM, ~2.0B parameters; tiny: hidden 64) on the same samples
(one image per sample, `--seq` tokens, loss on the text tokens), ZeRO-2, bf16 on GPU, micro-batch 1,
the same gradient accumulation, in the same process, one after the other.

- baseline: `model(input_ids, pixel_values, labels)` with transformers' own loss (full logits upcast to
  fp32), gradient checkpointing on every layer, sdpa attention, fused AdamW passed to
  `deepspeed.initialize`.
- ours: `trainers.loop.train_loop`: fused lm_head + cross-entropy (no full logits, no recompute of the
  head), and recompute only where memory needs it: tried without recompute first, then every 2nd
  layer, then every layer (an out-of-memory attempt is dropped and the next one runs). Run as the
  configurations `--variants` lists (ZeRO stage, regional torch.compile, Liger kernels), while `--budget-s` allows;
  "ours" is the fastest that finished, every variant's figures are kept.

Reported per variant: tokens/s and MFU (model FLOPs per trainers/flops.py: 6 x LLM parameters per
text token, 6 x vision parameters per patch, attention 12 x layers x hidden x s per token of an
s-token sample, recompute not counted — over the card's dense bf16 peak), median over the steps after warm-up, peak memory, and the ratio to the baseline. On CPU the MFU
uses a nominal 1 TFLOP/s peak: a smoke figure only.
Imports nothing from ray, polars or math-verify (the GPU box has none of them).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench.train")

SHAPES = {
    # SigLIP-so400m-patch14-384 and Qwen2-1.5B dimensions
    "full": {
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=384, patch_size=14),
        "text": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                     num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                     tie_word_embeddings=True),
        "seq": 8192,
    },
    "tiny": {
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8),
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=False),
        "seq": 512,
    },
}


def build_student(shape: dict, device, dtype):
    """A random-init LLaVA-layout student, built directly on `device` in `dtype`."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    text = Qwen2Config(**shape["text"])
    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(**shape["vision"]),
        text_config=text,
        image_token_id=text.vocab_size - 1,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    if next(model.parameters()).dtype != dtype:  # transformers < 4.56 spells it torch_dtype
        model = model.to(dtype)
    return model


class Samples:
    """`n` samples: a few prompt tokens, one image's placeholder tokens, then text with loss."""

    def __init__(self, shape: dict, n: int, seed: int = 0) -> None:
        import torch

        v, t = shape["vision"], shape["text"]
        self.image_tokens = (v["image_size"] // v["patch_size"]) ** 2
        self.image_id = t["vocab_size"] - 1
        g = torch.Generator().manual_seed(seed)
        seq = shape["seq"]
        self.items = []
        for _ in range(n):
            ids = torch.randint(0, t["vocab_size"] - 2, (seq,), generator=g)
            ids[8 : 8 + self.image_tokens] = self.image_id
            labels = ids.clone()
            labels[: 8 + self.image_tokens] = -100
            pix = torch.randn(1, 3, v["image_size"], v["image_size"], generator=g)
            self.items.append({"input_ids": ids, "labels": labels, "pixel_values": pix})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    @staticmethod
    def collate(items: list[dict]) -> dict:
        import torch

        return {
            "input_ids": torch.stack([x["input_ids"] for x in items]),
            "labels": torch.stack([x["labels"] for x in items]),
            "pixel_values": torch.cat([x["pixel_values"] for x in items]),
        }


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def run_baseline(shape: dict, data: Samples, args, device, dtype) -> dict:
    """The plain loop: transformers loss, full recompute, sdpa, fused AdamW, DeepSpeed ZeRO-2."""
    import deepspeed
    import torch

    from trainers.flops import StepFlops, batch_stats, peak_flops
    from trainers.loop import init_distributed

    init_distributed()
    model = build_student(shape, device, dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05, fused=device.type == "cuda")
    ds_cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": args.grad_accum,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    engine.train()
    # every sample has the same shape: one step's model FLOPs are grad_accum times one sample's
    one = data.collate([data[0]])
    labelled = float((one["labels"] != -100).sum())
    step_flops = args.grad_accum * StepFlops.of(model).step(*batch_stats(one), labelled)
    peak = peak_flops(None, device)
    times, k = [], 0
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.grad_accum):
            b = {key: v.to(device) for key, v in data.collate([data[k % len(data)]]).items()}
            b["pixel_values"] = b["pixel_values"].to(dtype)
            k += 1
            loss = engine(**b).loss
            engine.backward(loss)
            engine.step()
        float(loss)  # a sync point, like our loop's loss read-back
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    engine.destroy()
    del engine, model, opt
    tokens = shape["seq"] * args.grad_accum
    tok_s = tokens / statistics.median(times)
    step_s = statistics.median(times)
    return {"tok_s": tok_s, "mfu": step_flops / step_s / peak, "step_s": step_s, "peak_gb": _peak_gb()}


def run_ours(shape: dict, data: Samples, args, device, dtype, recompute: int, variant: dict) -> dict:
    """trainers.loop.train_loop; recompute 0 = none, k = every k-th layer; variant: zero stage, compile."""
    from trainers.loop import LoopConfig, LoopData, train_loop

    model = build_student(shape, device, dtype)
    cfg = LoopConfig(
        zero_stage=variant["zero"], precision="bf16" if device.type == "cuda" else "fp32", lr=1e-5, warmup_ratio=0.0,
        # 'b': the step's samples in one micro-batch (same global batch, larger kernels, fewer micro-steps)
        micro_batch=args.grad_accum if variant["batched"] else 1, grad_accum=1 if variant["batched"] else args.grad_accum,
        max_steps=args.warmup + args.steps, save_every=0,
        gradient_checkpointing=recompute > 0, checkpoint_every=max(recompute, 1),
        loss_chunk=args.loss_chunk, tensorboard=False, export=False, compile=variant["compile"], log_every=5,
        kernels=variant["kernels"], overflow_check="global_norm" if variant["fast_check"] else "per_tensor",
    )
    prof = StepProfiler(args.warmup, args.profile, args.trace) if args.profile and not args.profiled else None
    with tempfile.TemporaryDirectory() as tmp:
        res = train_loop(model, LoopData(data, Samples.collate), cfg, Path(tmp), seed=0,
                         on_step=prof.on_step if prof else None)
    del model
    recs = res.records[args.warmup:]
    extra = {}
    if prof is not None and prof.table:
        args.profiled = True  # the first variant that finishes is profiled; the others run unobserved
        extra["profile"] = prof.table
        extra["cpu_profile"] = prof.cpu_table
    return {**extra,
        "tok_s": statistics.median(r["tok_s"] for r in recs),
        "mfu": statistics.median(r["mfu"] for r in recs),
        "step_s": statistics.median(r["step_s"] for r in recs),
        "peak_gb": _peak_gb(),
        "variant": variant["name"],
        "zero_stage": variant["zero"],
        "recompute_every": recompute,
        "compile": variant["compile"],
        "kernels": variant["kernels"],
        "micro_batch": cfg.micro_batch,
        "final_loss": res.losses[-1],
    }


class StepProfiler:
    """torch.profiler over `n` optimizer steps after `warmup`, started and stopped from the loop's
    per-step callback; `table` lists the ops with the most device time (CPU time off GPU)."""

    def __init__(self, warmup: int, n: int, trace: Path | None = None) -> None:
        self.first, self.last, self.table, self.prof = warmup, warmup + n, [], None
        self.trace, self.cpu_table = trace, []

    def on_step(self, step: int, rec: dict) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        if step == self.first:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.start()
        elif step == self.last and self.prof is not None:
            self.prof.stop()
            cuda = torch.cuda.is_available()
            key = "self_device_time_total" if cuda else "self_cpu_time_total"
            events = sorted(self.prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
            total = sum(getattr(e, key) for e in events) or 1.0
            steps = self.last - self.first
            self.table = [
                {"op": e.key[:120], "ms_per_step": round(getattr(e, key) / 1e3 / steps, 3),
                 "share": round(getattr(e, key) / total, 4), "calls_per_step": e.count // steps}
                for e in events[:30]
            ]
            if cuda:  # kernel time alone (no CPU-side op rows): against the step's wall time, the idle share
                from torch.autograd import DeviceType

                busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
                self.table.insert(0, {"op": "(all GPU kernels)", "ms_per_step": round(busy / 1e3 / steps, 3),
                                      "share": 1.0, "calls_per_step": 0})
                # where the host's time goes while the GPU waits: ops by their own CPU time
                by_cpu = sorted(self.prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
                self.cpu_table = [
                    {"op": e.key[:120], "cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
                     "calls_per_step": e.count // steps}
                    for e in by_cpu[:20]
                ]
            if self.trace is not None:  # the timeline (chrome://tracing, Perfetto), gzipped
                import gzip
                import shutil

                raw = self.trace.with_suffix("")
                self.prof.export_chrome_trace(str(raw))
                with open(raw, "rb") as src, gzip.open(self.trace, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                raw.unlink()
            for row in self.table[:21]:
                log.info("profile | %6.1f ms/step %5.1f%% %6d calls | %s", row["ms_per_step"], 100 * row["share"],
                         row["calls_per_step"], row["op"])
            self.prof = None


def _is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="CUDA, bf16, the full ~2B shape (unless --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny shape (hidden 64) on any device")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sample (default: 8192 full, 512 tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 15 GPU, 6 CPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--loss-chunk", type=int, default=4096)
    ap.add_argument("--variants", default=None,
                    help="our configurations, comma-separated z<stage>[c][l][b] (c = compiled, l = Liger kernels, "
                         "b = one micro-batch of grad-accum samples, f = overflow_check global_norm); "
                         "default GPU 'z2bf,z2lbf,z1bf,z0b,z2', CPU 'z2'")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no further variant past this")
    ap.add_argument("--profile", type=int, default=0,
                    help="profile this many steps of the first variant that finishes: top ops by device time")
    ap.add_argument("--trace", type=Path, default=None,
                    help="with --profile: write the profiled steps' timeline here (gzipped chrome trace, .json.gz)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--real", action="store_true",
                    help="the train stage on SFT shards (images, log-normal lengths) vs the same samples pre-built; "
                         "writes benchmarks/results/train_real_cpu.json unless --out")
    ap.add_argument("--samples", type=int, default=48, help="--real: SFT rows")
    ap.add_argument("--median-len", type=int, default=600, help="--real: median assistant tokens (log-normal)")
    ap.add_argument("--max-len", type=int, default=4096, help="--real: length cap")
    ap.add_argument("--micro-batch", type=int, default=2, help="--real: samples per micro-batch")
    ap.add_argument("--workers", type=int, default=None, help="--real: loader workers (default: the loop's)")
    ap.add_argument("--rounds", type=int, default=2, help="--real: alternating stage / pre-built runs")
    args = ap.parse_args(argv)
    if args.real:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s | %(message)s", datefmt="%H:%M:%S")
        args.steps = args.steps or 12
        args.warmup = max(args.warmup, 3)
        out = run_real(args)
        _write(args.out or Path(__file__).parent / "results" / "train_real_cpu.json", out)
        return out

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s | %(message)s", datefmt="%H:%M:%S")
    t_start = time.time()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device")
    device = torch.device("cuda") if args.gpu else torch.device("cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    shape = dict(SHAPES["tiny" if (args.tiny or not args.gpu) else "full"])
    if args.seq:
        shape["seq"] = args.seq
    args.steps = args.steps or (15 if args.gpu else 6)
    args.profiled = False
    args.variants = args.variants or ("z2bf,z2lbf,z1bf,z0b,z2" if args.gpu else "z2")
    data = Samples(shape, n=max(4, args.grad_accum * 2))
    out: dict = {
        "device": torch.cuda.get_device_name() if args.gpu else "cpu",
        "shape": "tiny" if (args.tiny or not args.gpu) else "siglip-so400m-384 + qwen2-1.5b",
        "seq": shape["seq"], "grad_accum": args.grad_accum, "steps": args.steps, "dtype": str(dtype),
        "torch": torch.__version__,
    }
    probe = build_student(shape, "meta", dtype)
    out["params"] = sum(p.numel() for p in probe.parameters())
    del probe
    log.info("shape %s: %.3fB parameters, seq %d, %s on %s", out["shape"], out["params"] / 1e9, shape["seq"],
             dtype, out["device"])

    out["baseline"] = run_baseline(shape, data, args, device, dtype)
    log.info("baseline: %s", out["baseline"])
    _free()
    attempts = [0, 2, 1] if args.gpu and not args.tiny else [0]
    variants = [parse_variant(v) for v in args.variants.split(",") if v.strip()]
    out["variants"] = {}
    for i, variant in enumerate(variants):
        if i > 0 and time.time() - t_start > args.budget_s:
            log.warning("time budget spent: variants from %s on not run", variant["name"])
            break
        out["variants"][variant["name"]] = run_variant(shape, data, args, device, dtype, attempts, variant)
        log.info("ours %s: %s", variant["name"], out["variants"][variant["name"]])
        _free()
        _summarise(out)
        _write(args.out, out)  # the figures so far survive a timeout in a later variant
    if "ours" not in out:
        raise SystemExit("ours: no variant finished (see the errors under 'variants')")
    out["wall_s"] = round(time.time() - t_start, 1)
    summary = (
        f"train bench ({out['device']}, {out['shape']}, seq {shape['seq']}): "
        f"baseline {out['baseline']['tok_s']:,.0f} tok/s mfu {out['baseline']['mfu']:.3f} | "
        f"ours {out['ours']['tok_s']:,.0f} tok/s mfu {out['ours']['mfu']:.3f} "
        f"(best variant {out['ours']['variant']}, recompute_every={out['ours']['recompute_every']}) | "
        f"ratio {out['ratio_tok_s']:.2f}x"
    )
    print(summary, flush=True)
    for name, v in out["variants"].items():
        print(f"  {name}: " + (f"{v['tok_s']:,.0f} tok/s mfu {v['mfu']:.3f} peak {v['peak_gb']:.1f} GB"
                               if "tok_s" in v else v["error"]), flush=True)
    _write(args.out, out)
    return out


def parse_variant(spec: str) -> dict:
    """'z2' = ZeRO-2; then flags: 'c' regional torch.compile, 'l' Liger kernels, 'b' all of a step's
    samples in one micro-batch, 'f' train.overflow_check=global_norm (no per-tensor host sync): 'z1lcb' =
    ZeRO-1, Liger, compiled, micro-batch = grad-accum samples."""
    spec = spec.strip()
    head, flags = spec[:2], spec[2:]
    if not (head[:1] == "z" and head[1:] in ("0", "1", "2", "3")) or set(flags) - {"c", "l", "b", "f"}:
        raise SystemExit(f"--variants: {spec!r} is not z<0-3>[c][l][b][f]")
    return {"name": spec, "zero": int(head[1]), "compile": "c" in flags, "kernels": "liger" if "l" in flags else "none",
            "batched": "b" in flags, "fast_check": "f" in flags}


def run_variant(shape: dict, data: Samples, args, device, dtype, attempts: list[int], variant: dict) -> dict:
    """One variant, with more recompute after each out-of-memory; its failure is reported, not raised."""
    for every in attempts:
        try:
            return run_ours(shape, data, args, device, dtype, every, variant)
        except Exception as e:  # noqa: BLE001 - out of memory: recompute more; any other failure is reported
            failure = f"{'out of memory' if _is_oom(e) else type(e).__name__}: {str(e)[:300]}"
        _free()  # outside the except block: the exception's frames (activations) are gone by now
        log.warning("ours %s with recompute_every=%d failed: %s", variant["name"], every, failure)
        if not failure.startswith("out of memory"):
            break
    return {"error": failure}


def _summarise(out: dict) -> None:
    """'ours' = the fastest finished variant; ratios against the baseline of the same run."""
    done = [v for v in out["variants"].values() if "tok_s" in v]
    if done:
        out["ours"] = max(done, key=lambda v: v["tok_s"])
        out["ratio_tok_s"] = out["ours"]["tok_s"] / out["baseline"]["tok_s"]
        out["ratio_mfu"] = out["ours"]["mfu"] / out["baseline"]["mfu"]


def _write(path: Path | None, out: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# --real: the `train` stage's worker on SFT shards vs the same samples as pre-built tensors


def realistic_rows(n: int, tokenizer, median_len: int, cap: int, seed: int = 0) -> list[dict]:
    """SFT rows as curate writes them: system + user (one `<image>`) + assistant `<think>...</think>` answer,
    assistant lengths log-normal around `median_len` tokens (sigma 0.8) capped at `cap`, one photo-like
    JPEG per row (smooth gradients plus sensor noise, 480x360 to 1280x960)."""
    import numpy as np
    from PIL import Image

    from pipeline.images import encode_pil

    rng = np.random.default_rng(seed)
    words = ["the", "side", "angle", "triangle", "area", "so", "let", "x", "equals", "then", "we", "have", "sum",
             "of", "radius", "circle", "hence", "=", "+", "2", "3", "7", "12", "therefore", "check", "again"]
    probe = " ".join(words * 20)
    per_word = len(tokenizer(probe, add_special_tokens=False)["input_ids"]) / (len(words) * 20)
    rows = []
    for i in range(n):
        target = int(min(cap, max(32, rng.lognormal(np.log(median_len), 0.8))))
        body = " ".join(rng.choice(words, size=max(8, int(target / per_word))).tolist())
        w, h = int(rng.integers(480, 1281)), int(rng.integers(360, 961))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (c + 1) / w + yy / h) * 120 + 40 * c for c in range(3)], axis=-1)
        arr = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype("uint8")
        rows.append({
            "sample_id": f"r{i:05d}", "problem_id": f"p{i:05d}", "chain_id": f"c{i:05d}", "round": 0,
            "messages": [
                {"role": "system", "content": "Think step by step inside <think></think>, then answer."},
                {"role": "user", "content": f"<image>\nWhat is the area of figure {i}?"},
                {"role": "assistant", "content": f"<think>{body}</think>The answer is $\\boxed{{{i}}}$."},
            ],
            "images": [encode_pil(Image.fromarray(arr), "jpeg")],
            "quality": 5.0,
        })
    return rows


def _steady(records: list[dict], warmup: int, device) -> dict:
    import torch

    recs = records[warmup:]
    step_s = statistics.median(r["step_s"] for r in recs)
    cuda = device.type == "cuda"
    return {
        "tok_s": statistics.median(r["tok_s"] for r in recs),
        "mfu": statistics.median(r["mfu"] for r in recs) if cuda else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "gpu_idle_frac": None,  # needs a device profile (--profile on the GPU bench); none on CPU
        "step_s": step_s,
        # the least disturbed step: on a machine shared with other work, noise only ever adds time
        "step_s_min": min(r["step_s"] for r in recs),
        "input_wait_frac": statistics.median(r["wait_s"] / r["step_s"] for r in recs),
        "steps_timed": len(recs),
    }


def run_real(args) -> dict:
    """The stage's training worker (trainers.launch, as `r1v run ... --stage train` calls it) on SFT shards:
    images decoded, tokenized, collated by the loop's loader workers; then, in the same process, the
    same samples decoded and tokenized up front (the ceiling: no input work in the step)."""
    import torch

    from pipeline.rundir import ShardWriter
    from pipeline.schema import SFT
    from trainers.data import SFTDataConfig, make_sft_data
    from trainers.launch import WorkerSpec, launch
    from trainers.loop import STEPS_LOG, LoopConfig, LoopData, train_loop
    from trainers.model import AssembleConfig, apply_freeze, assemble_student, load_student
    from trainers.tiny import build_tiny_checkpoints

    if args.gpu:
        raise SystemExit("--real runs the tiny student on CPU here; the ~2B GPU shape needs its own checkpoints")
    device = torch.device("cpu")
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parts = build_tiny_checkpoints(root / "parts", seed=0)
        student = assemble_student(AssembleConfig(vision_path=str(parts["vision"]), llm_path=str(parts["llm"])),
                                   root / "student")
        _, processor = load_student(student, dtype="float32")
        rows = realistic_rows(args.samples, processor.tokenizer, args.median_len, args.max_len)
        with ShardWriter(root / "sft", SFT, "sft", rows_per_shard=64) as w:
            w.write(rows)
        data_cfg = SFTDataConfig(max_len=args.max_len + 64)
        loop = dict(max_steps=args.warmup + args.steps, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
                    lr=1e-4, warmup_ratio=0.0, loss_chunk=args.loss_chunk, tensorboard=False, export=False,
                    save_interval_s=0, loader_workers=args.workers)
        spec = WorkerSpec(model_dir=str(student), sft_dirs=[str(root / "sft")], out_dir=str(root / "real0"),
                          data=data_cfg.model_dump(), loop=loop, seed=0)
        model, processor = load_student(student, dtype="float32")
        apply_freeze(model, "projector_llm")
        ds, collate = make_sft_data([root / "sft"], processor, data_cfg)
        t0 = time.perf_counter()
        built = [ds[i] for i in range(len(ds))]  # decoded + tokenized up front: the step only collates
        build_s = (time.perf_counter() - t0) / len(ds)
        del model
        # Alternating rounds, so load from other processes on a shared machine falls on both alike.
        real_recs, pre_recs, real_losses, pre_losses = [], [], [], []
        for r in range(args.rounds):
            spec = spec.model_copy(update={"out_dir": str(root / f"real{r}")})
            result = launch(spec, "local")
            real_recs += [json.loads(x) for x in (root / f"real{r}" / STEPS_LOG).read_text().splitlines()][args.warmup:]
            real_losses = result["losses"]
            model, processor = load_student(student, dtype="float32")
            apply_freeze(model, "projector_llm")
            pre = train_loop(model, LoopData(built, collate, processor),
                             LoopConfig(**{**loop, "loader_workers": 0}), root / f"prebuilt{r}", seed=0)
            pre_recs += pre.records[args.warmup:]
            pre_losses = pre.losses
            del model
    lengths = sorted(r["length"] for r in built)
    out = {
        "device": "cpu", "shape": "tiny (SigLIP + Qwen2, hidden 64)", "samples": len(built),
        "length_median": lengths[len(lengths) // 2], "length_max": lengths[-1],
        "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "loader_workers": args.workers,
        "rounds": args.rounds,
        "input_s_per_sample": build_s,  # decode + tile + tokenize of one sample, in this process
        "real_stage": _steady(real_recs, 0, device),
        "prebuilt": _steady(pre_recs, 0, device),
        # the plain transformers + DeepSpeed loop at its best and at naive settings for equal memory: a GPU
        # comparison (memory budget, recompute, micro-batch), not measured on CPU
        "baseline_best": {"tok_s": None, "mfu": None, "peak_mem_gb": None, "gpu_idle_frac": None},
        "baseline_naive": {"tok_s": None, "mfu": None, "peak_mem_gb": None, "gpu_idle_frac": None},
        "same_losses": max(abs(a - b) for a, b in zip(real_losses, pre_losses, strict=True)) < 1e-5,
        "torch": torch.__version__,
        "load_avg_1min": os.getloadavg()[0],
    }
    out["ratio_step_s"] = out["real_stage"]["step_s"] / out["prebuilt"]["step_s"]
    out["ratio_step_s_min"] = out["real_stage"]["step_s_min"] / out["prebuilt"]["step_s_min"]
    out["wall_s"] = round(time.time() - t_start, 1)
    print(f"train --real (cpu, {out['samples']} samples, median {out['length_median']} tokens): stage "
          f"{out['real_stage']['step_s'] * 1e3:.0f} ms/step (waits on input {out['real_stage']['input_wait_frac']:.1%})"
          f" vs pre-built {out['prebuilt']['step_s'] * 1e3:.0f} ms/step: {out['ratio_step_s']:.3f}x, fastest steps {out['ratio_step_s_min']:.3f}x "
          f"(input work {out['input_s_per_sample'] * 1e3:.1f} ms/sample); "
          f"same losses: {out['same_losses']}", flush=True)
    return out


if __name__ == "__main__":
    main()
