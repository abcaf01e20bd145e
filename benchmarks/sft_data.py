"""SFT data path: encoding cost vs the bare processor, and packing / length grouping vs plain padding.

    python benchmarks/sft_data.py                         # CPU, tiny random student, ~1 minute
    python benchmarks/sft_data.py --device cuda --hidden 512 --samples 256

1. encode: `SFTDataset[i]` (render, expand images, assistant mask, think weights, pixel values) against
   the baseline `processor(images=..., text=rendered)` on the same rows (no mask): samples/s and ratio.
2. batching: forward + backward + AdamW over the same samples, batched three ways: random order padded
   (baseline), length groups, packed bins (position_ids restart, no cross-sample attention). Reports
   real (non-pad) tokens/s, padding fraction, and the ratio to the baseline. Lengths are spread like
   curated chains (short answers to long reflections).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path


def _rows(n: int, seed: int) -> list[dict]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.trainers.conftest import make_sft_rows

    rng = random.Random(seed)
    rows = make_sft_rows(n)
    for r in rows:
        reps = int(rng.lognormvariate(3.0, 1.0)) + 2  # long-tailed, like reasoning chains
        r["messages"][2]["content"] = "<think>" + "Let x be the side, so 3 x = 12. " * min(reps, 220) + "</think>x = 4"
    return rows


def _student(tmp: Path, hidden: int) -> Path:
    from trainers.model import AssembleConfig, assemble_student
    from trainers.tiny import build_tiny_llm, build_tiny_siglip

    vision = build_tiny_siglip(tmp / "vision", 0)
    llm = build_tiny_llm(tmp / "llm", 0, hidden_size=hidden)
    return assemble_student(AssembleConfig(vision_path=str(vision), llm_path=str(llm)), tmp / "student")


def bench_encode(ds, processor, rows, repeat: int) -> tuple[float, float]:
    from pipeline.images import decode

    def ours() -> None:
        for i in range(len(ds)):
            ds[i]

    def baseline() -> None:
        for r in rows:
            text = processor.apply_chat_template(r["messages"], tokenize=False)
            images = [decode(im) for im in r["images"]] or None
            processor(images=images, text=[text], return_tensors="pt")

    def best(fn) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return len(rows) / best(ours), len(rows) / best(baseline)


def bench_batching(model, batches_by_mode: dict, device, repeat: int) -> dict[str, dict]:
    """Best-of-`repeat` seconds per mode; modes interleaved per repeat, after one warm-up batch each."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(b: dict) -> None:
        inputs = {k: v.to(device) for k, v in b.items() if k not in ("labels", "loss_weights")}
        logits = model(**inputs, use_cache=False).logits
        w = b["loss_weights"].to(device)[:, 1:].flatten()
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().flatten(0, 1), b["input_ids"].to(device)[:, 1:].flatten(), reduction="none"
        )
        ((ce * w).sum() / w.sum().clamp(min=1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for batches in batches_by_mode.values():
        step(batches[0])
    best = {mode: float("inf") for mode in batches_by_mode}
    for _ in range(repeat):
        for mode, batches in batches_by_mode.items():
            sync()
            t0 = time.perf_counter()
            for b in batches:
                step(b)
            sync()
            best[mode] = min(best[mode], time.perf_counter() - t0)
    return {m: {"seconds": best[m], "tokens": sum(int(b["input_ids"].numel()) for b in batches_by_mode[m])}
            for m in batches_by_mode}


def main() -> None:
    import torch

    from pipeline.schema import SFT
    from trainers.data import SFTDataConfig, SFTDataset, make_sft_data
    from trainers.model import apply_freeze, load_student

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="rows per batch (padded / grouped); packed: bins")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    import pyarrow as pa

    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp())
    student = _student(tmp, args.hidden)
    model, processor = load_student(student, dtype="bfloat16" if device.type == "cuda" else "float32")
    model.to(device).train()
    apply_freeze(model, "projector_llm")
    rows = _rows(args.samples, 0)
    table = pa.Table.from_pylist(rows, schema=SFT)
    cfg = SFTDataConfig(max_len=args.max_len, seed=0)
    base = SFTDataset(table, processor, cfg)
    ours, baseline = bench_encode(base, processor, rows, args.repeat)
    print(f"encode | ours {ours:,.1f} samples/s | baseline processor() {baseline:,.1f} samples/s | ratio {ours / baseline:.2f}")

    _, collate = make_sft_data(table, processor, cfg)
    order = list(range(len(base)))
    random.Random(0).shuffle(order)
    padded = [collate([base[i] for i in order[k : k + args.batch]]) for k in range(0, len(order), args.batch)]
    grouped_ds, _ = make_sft_data(table, processor, cfg.model_copy(update={"group_by_length": True,
                                                                          "group_size": args.batch}))
    grouped = [collate([grouped_ds[g]]) for g in range(len(grouped_ds))]
    packed_ds, _ = make_sft_data(table, processor, cfg.model_copy(update={"packing": True}))
    packed = [collate([packed_ds[b]]) for b in range(len(packed_ds))]
    lengths = sorted(base.lengths)
    print(f"data | {len(base)} samples | tokens min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]}"
          f" | {len(padded)} padded batches, {len(grouped)} groups, {len(packed)} packed bins")
    res = bench_batching(model, {"padded": padded, "grouped": grouped, "packed": packed}, device, args.repeat)
    real = sum(base.lengths)
    base_tps = real / res["padded"]["seconds"]
    for mode, r in res.items():
        tps = real / r["seconds"]
        pad = 1 - real / r["tokens"]
        print(f"batching {mode:7s} | {tps:,.0f} real tok/s | padding {pad:.1%} | ratio vs padded {tps / base_tps:.2f}"
              f" | device {device.type}")


if __name__ == "__main__":
    main()
