"""transformers `generate` as a teacher: CPU or GPU, batched, with the model's chat template.

Sampling is per row inside one batch: `RowSampler` applies each row's repetition penalty,
temperature and top-p, then samples with the Gumbel-max trick from a `torch.Generator` seeded with the
row's seed. A row's tokens therefore depend on its own seed, not on which rows share its batch, so a
resumed run or a cache miss reproduces the same chain. Each row stops at its own max_tokens (the
sampler forces EOS there); finish_reason is `stop` when the model ended on its own, else `length`.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from typing import Any

from teachers.engines import GenRequest, GenResult, HFEngineConfig, error_result, sampling_value, split_think

log = logging.getLogger(__name__)


class RowSampler:
    """A LogitsProcessor doing per-row repetition penalty, temperature, top-p and seeded sampling.

    `generate` runs greedy (do_sample=False) on the scores this returns: Gumbel noise added to the
    warped log-probabilities makes the argmax an exact sample of the warped distribution.
    """

    def __init__(self, rows: list[dict[str, Any]], prompt_len: int, eos_id: int, device: Any,
                 pad_lens: list[int] | None = None) -> None:
        import torch

        self.prompt_len = prompt_len
        # Left-padding positions of each row: not text the row has seen, so never penalised (where pad = EOS,
        # as R1-distill tokenizers ship, penalising them would lower EOS only in padded rows).
        self.pad_lens = torch.tensor(pad_lens or [0] * len(rows), device=device).unsqueeze(1)
        self.any_pad = bool(pad_lens) and max(pad_lens) > 0
        self.eos_id = eos_id
        self.penalty = torch.tensor([float(r["repetition_penalty"]) for r in rows], device=device).unsqueeze(1)
        self.temperature = [float(r["temperature"]) for r in rows]
        self.top_p = [float(r["top_p"]) for r in rows]
        self.max_tokens = [int(r["max_tokens"]) for r in rows]
        self.temperature_t = torch.tensor(self.temperature, device=device).unsqueeze(1)
        self.top_p_t = torch.tensor(self.top_p, device=device).unsqueeze(1)
        self.any_top_p = any(p < 1.0 for p in self.top_p)
        self.max_tokens_t = torch.tensor(self.max_tokens, device=device)
        self.min_max_tokens = min(self.max_tokens)
        self.generators = []
        for r in rows:
            g = torch.Generator(device=device)
            g.manual_seed(int(r["seed"]))
            self.generators.append(g)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        scores = scores.float()
        # Repetition penalty as in CTRL / transformers' RepetitionPenaltyLogitsProcessor, one value per row,
        # over the tokens each row holds (its padding excluded).
        penalty = self.penalty.to(scores.device)
        penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
        if self.any_pad:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            real = (pos >= self.pad_lens.to(input_ids.device)).to(scores.dtype)
            seen = torch.zeros_like(scores).scatter_add_(1, input_ids, real) > 0
        else:
            seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, input_ids, True)
        scores = torch.where(seen, penalised, scores)
        temp = self.temperature_t.to(scores.device)
        logp = torch.log_softmax(scores / temp.clamp_min(1e-6), dim=-1)
        if self.any_top_p:
            sorted_lp, idx = torch.sort(logp, dim=-1, descending=True)
            p = sorted_lp.exp()
            drop = (torch.cumsum(p, dim=-1) - p) > self.top_p_t.to(scores.device)  # keep the prefix reaching top_p
            logp = logp.scatter(1, idx, sorted_lp.masked_fill(drop, float("-inf")))
        # One draw per row per step from the row's own generator: independent of batch neighbours.
        u = torch.stack([torch.rand(scores.shape[1], generator=g, device=scores.device) for g in self.generators])
        sampled = logp - torch.log(-torch.log(u.clamp_(1e-10, 1.0)))
        out = torch.where((temp > 0), sampled, scores)
        step = input_ids.shape[1] - self.prompt_len
        if step >= self.min_max_tokens:  # checked on the host: no device sync on most steps
            done = self.max_tokens_t.to(scores.device) <= step
            forced = torch.full_like(out, float("-inf"))
            forced[:, self.eos_id] = 0.0
            out = torch.where(done.unsqueeze(1), forced, out)
        return out


def _decode_image(url: str) -> Any:
    from PIL import Image

    if not url.startswith("data:"):
        raise ValueError("the hf engine takes images as data URIs")
    data = base64.b64decode(url.split(",", 1)[1])
    return Image.open(io.BytesIO(data)).convert("RGB")


def _bad_image(messages: list[dict]) -> str | None:
    """Why an image of these messages does not decode, or None when every one does."""
    for m in messages:
        if not isinstance(m.get("content"), list):
            continue
        for k, part in enumerate(m["content"]):
            if part.get("type") != "image_url":
                continue
            try:
                _decode_image(part["image_url"]["url"])
            except (OSError, ValueError, KeyError, TypeError) as e:  # PIL's UnidentifiedImageError is an OSError
                return f"image {k} of the {m.get('role')} turn does not decode: {type(e).__name__}: {e}"
    return None


class HFEngine:
    def __init__(self, cfg: HFEngineConfig) -> None:
        import torch
        import transformers

        self.cfg = cfg
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            cfg.dtype, torch.bfloat16 if use_cuda else torch.float32
        )
        kw: dict[str, Any] = {"revision": cfg.revision, "dtype": dtype}
        if cfg.attn_implementation:
            kw["attn_implementation"] = cfg.attn_implementation
        if cfg.multimodal:
            self.processor = transformers.AutoProcessor.from_pretrained(cfg.model, revision=cfg.revision)
            self.tokenizer = self.processor.tokenizer
            self.model = transformers.AutoModelForImageTextToText.from_pretrained(cfg.model, **kw)
        else:
            self.processor = None
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model, revision=cfg.revision)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model, **kw)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(self.device).eval()
        self.eos_id = self.tokenizer.eos_token_id
        log.info("hf engine: %s on %s (%s)", cfg.model, self.device, dtype)

    def close(self) -> None:
        pass

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        results: list[GenResult | None] = [None] * len(requests)
        ok: list[int] = []
        for i, r in enumerate(requests):
            if not self.cfg.multimodal and any(isinstance(m["content"], list) and any(
                    p.get("type") != "text" for p in m["content"]) for m in r.messages):
                results[i] = error_result("bad_input", "images sent to a text-only hf engine (set multimodal or text_only)")
                continue
            bad = _bad_image(r.messages) if self.cfg.multimodal else None
            if bad:  # one undecodable figure fails its own row, never the batch or the run
                results[i] = error_result("bad_image", bad)
            else:
                ok.append(i)
        # Similar lengths share a batch: less padding.
        ok.sort(key=lambda i: len(str(requests[i].messages)))
        bs = self.cfg.batch_size
        for k in range(0, len(ok), bs):
            idx = ok[k : k + bs]
            for i, res in zip(idx, self._batch_or_split([requests[i] for i in idx]), strict=True):
                results[i] = res
        return results  # type: ignore[return-value]

    def _batch_or_split(self, reqs: list[GenRequest]) -> list[GenResult]:
        """Generate a batch; on CUDA out-of-memory retry it as two halves, down to single rows."""
        import torch

        try:
            return self._batch(reqs, catch=len(reqs) == 1)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            half = len(reqs) // 2
            log.warning("hf engine: out of memory at batch %d; splitting", len(reqs))
            return self._batch_or_split(reqs[:half]) + self._batch_or_split(reqs[half:])

    def _inputs(self, reqs: list[GenRequest]) -> Any:
        if self.processor is None:
            msgs = [[{"role": m["role"], "content": _text(m["content"])} for m in r.messages] for r in reqs]
            texts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
            return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        msgs = [[{"role": m["role"], "content": _parts(m["content"])} for m in r.messages] for r in reqs]
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                  return_tensors="pt", processor_kwargs={"padding": True})

    def _batch(self, reqs: list[GenRequest], catch: bool = True) -> list[GenResult]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        t0 = time.perf_counter()
        rows = [{"temperature": sampling_value(r.sampling, "temperature", 1.0),
                 "top_p": sampling_value(r.sampling, "top_p", 1.0),
                 "max_tokens": sampling_value(r.sampling, "max_tokens", 256),
                 "repetition_penalty": sampling_value(r.sampling, "repetition_penalty", 1.0),
                 "seed": sampling_value(r.sampling, "seed", 0)} for r in reqs]
        try:
            enc = self._inputs(reqs).to(self.device)
            prompt_len = enc["input_ids"].shape[1]
            pad_lens = (prompt_len - enc["attention_mask"].sum(dim=1)).tolist()  # left padding per row
            sampler = RowSampler(rows, prompt_len, self.eos_id, self.device, pad_lens)
            gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max(r["max_tokens"] for r in rows) + 1,
                                       pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_id)
            with torch.inference_mode():
                out = self.model.generate(**enc, generation_config=gen_cfg,
                                          logits_processor=LogitsProcessorList([sampler]))
        except (RuntimeError, ValueError) as e:  # bad template, bad image, OOM of one row: this batch only
            if isinstance(e, torch.cuda.OutOfMemoryError) and not catch:
                raise
            log.exception("hf engine: batch of %d failed", len(reqs))
            dt = time.perf_counter() - t0
            return [error_result("engine_exception", f"{type(e).__name__}: {e}", dt) for _ in reqs]
        dt = time.perf_counter() - t0
        gen = out[:, prompt_len:].tolist()
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        results = []
        for i, ids in enumerate(gen):
            limit = rows[i]["max_tokens"]
            ids = ids[:limit]
            if self.eos_id in ids:
                ids = ids[: ids.index(self.eos_id) + 1]
                finish, n = "stop", len(ids)
                ids = ids[:-1]
            else:
                finish, n = "length", len(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            reasoning, response = split_think(text, self.cfg.think_start, self.cfg.think_end, finish)
            results.append(GenResult(text=text, reasoning=reasoning, response=response, finish_reason=finish,
                                     prompt_tokens=int(prompt_tokens[i]), completion_tokens=n, latency_s=dt))
        return results


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    out = []
    for p in content:
        if p.get("type") == "image_url":
            out.append({"type": "image", "image": _decode_image(p["image_url"]["url"])})
        else:
            out.append(p)
    return out
