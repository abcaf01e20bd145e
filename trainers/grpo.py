"""TRL's GRPOTrainer with what the `rl` stage adds: zero-advantage groups, the Selective Sample Buffer,
the split of each step's time, and one log row per optimizer step.

`R1VGRPOTrainer` is `trl.GRPOTrainer` (generation through transformers or vLLM colocate/server, the loss
variants TRL ships, DeepSpeed through accelerate) plus:

- groups whose rewards are all equal carry no advantage (GRPO's advantage is reward minus the group
  mean); they are counted every step and, by `zero_std`:
  - `keep`: left in the batch (TRL's own behaviour: zero advantage, still in the loss normaliser and
    the KL term);
  - `skip`: their completion tokens leave the loss (mask 0: no policy term, no KL term, not counted by
    the token normaliser), so an all-equal group does not dilute the step;
  - `buffer`: R1V2's Selective Sample Buffer. Completions with a non-zero advantage are cached (up to
    `buffer_size`, oldest dropped) and every row of an all-equal group is replaced by a cached one drawn
    with probability proportional to |advantage| (a seeded generator); rows no cache can fill are skipped.
    A replayed row keeps its advantage and its per-token log-probs (old / reference), so it is an
    off-policy sample, as in R1V2.
- `timing`: seconds spent generating and scoring in each step (`gen_s`, `reward_s`); the rest of the step
  time is the update (`update_s`).

`StepLog` (a TrainerCallback) appends one JSON record per optimizer step to `<out>/steps.jsonl` (rank 0):
reward mean/std per component, KL, clipped fraction, completion length, tokens/s, the zero-std counts,
the time split. On resume the records after the checkpoint's step are dropped first, so the log
continues at the checkpoint's step without duplicates.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from trl import GRPOTrainer

from trainers.loop import read_steps

log = logging.getLogger(__name__)

ZERO_STD_MODES = ("keep", "skip", "buffer")
# per-row tensors over the completion (B, C) and the prompt (B, P)
_COMPLETION_KEYS = ("completion_ids", "completion_mask", "tool_mask", "old_per_token_logps", "ref_per_token_logps",
                    "sampling_per_token_logps", "importance_sampling_ratio")
_PROMPT_KEYS = ("prompt_ids", "prompt_mask")
_IMAGE_KEYS = ("pixel_values", "image_sizes")
_LIST_KEYS = ("num_images", "num_tiles")
_KNOWN = set(_COMPLETION_KEYS) | set(_PROMPT_KEYS) | set(_IMAGE_KEYS) | set(_LIST_KEYS) | {"advantages",
                                                                                            "num_items_in_batch"}


class R1VGRPOTrainer(GRPOTrainer):
    def __init__(self, *args: Any, zero_std: str = "skip", buffer_size: int = 256, **kwargs: Any) -> None:
        if zero_std not in ZERO_STD_MODES:
            raise ValueError(f"rl.zero_std={zero_std!r}: expected one of {ZERO_STD_MODES}")
        super().__init__(*args, **kwargs)
        import torch

        self.zero_std, self.buffer_size = zero_std, buffer_size
        self.buffer: list[dict] = []
        self._gen = torch.Generator().manual_seed(int(self.args.seed))
        self._last_rewards = None
        self.timing = {"gen_s": 0.0, "reward_s": 0.0}
        self.counts = {"groups": 0, "zero_std_groups": 0, "skipped_rows": 0, "replayed_rows": 0}

    # -- timing ------------------------------------------------------------------------------------------

    def _generate(self, prompts: list) -> Any:
        t0 = time.perf_counter()
        try:
            return super()._generate(prompts)
        finally:
            self.timing["gen_s"] += time.perf_counter() - t0

    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any, completion_ids_list: Any) -> Any:
        t0 = time.perf_counter()
        try:
            out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self.timing["reward_s"] += time.perf_counter() - t0
        self._last_rewards = out  # every process's rewards (gathered): groups may span processes
        return out

    # -- zero-advantage groups ---------------------------------------------------------------------------

    def _zero_std_rows(self, n_local: int) -> Any:
        """Bool (n_local,): this process's rows whose group's rewards are all equal."""
        import torch

        r = self._last_rewards
        w = self.reward_weights.to(r.device)
        total = (r * w.unsqueeze(0)).nansum(dim=1)
        total[torch.isnan(r).all(dim=1)] = torch.nan
        groups = total.view(-1, self.num_generations)
        filled = torch.nan_to_num(groups, nan=0.0)
        hi = torch.where(torch.isnan(groups), torch.full_like(groups, -torch.inf), filled).amax(dim=1)
        lo = torch.where(torch.isnan(groups), torch.full_like(groups, torch.inf), filled).amin(dim=1)
        zero = ~(hi - lo > 1e-6)  # also a group with one scorable completion, or none
        self.counts["groups"] += int(zero.numel())
        self.counts["zero_std_groups"] += int(zero.sum())
        rows = zero.repeat_interleave(self.num_generations)
        start = self.accelerator.process_index * n_local
        return rows[start : start + n_local].cpu()

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        zero = self._zero_std_rows(len(inputs))
        if self.zero_std == "keep":
            return out
        if self.zero_std == "buffer":
            out, zero = self._replay(out, zero)
        if zero.any():
            mask = out["completion_mask"].clone()
            mask[zero.to(mask.device)] = 0
            out["completion_mask"] = mask
            self.counts["skipped_rows"] += int(zero.sum())
        loss_mask = out["completion_mask"] if out.get("tool_mask") is None else out["completion_mask"] * out["tool_mask"]
        out["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        return out

    def _replay(self, batch: dict, zero: Any) -> tuple[dict, Any]:
        """Selective Sample Buffer: cache this batch's informative rows, refill the all-equal ones from the cache."""
        import torch

        unknown = [k for k, v in batch.items() if k not in _KNOWN and v is not None]
        if unknown:
            raise ValueError(f"rl.zero_std=buffer cannot split batches carrying {unknown} (this model's processor "
                             f"outputs); use rl.zero_std=skip")
        rows = split_rows(batch)
        for i, row in enumerate(rows):
            if not zero[i] and float(row["advantages"].abs()) > 0 and int(row["completion_mask"].sum()) > 0:
                self.buffer.append({k: (v.detach().cpu() if hasattr(v, "detach") else v) for k, v in row.items()})
        del self.buffer[: max(0, len(self.buffer) - self.buffer_size)]
        todo = [i for i in range(len(rows)) if zero[i]]
        if not todo or not self.buffer:
            return batch, zero
        weights = torch.tensor([float(r["advantages"].abs()) for r in self.buffer])
        picks = torch.multinomial(weights, len(todo), replacement=True, generator=self._gen).tolist()
        zero = zero.clone()
        for i, j in zip(todo, picks, strict=True):
            rows[i] = self.buffer[j]
            zero[i] = False
        self.counts["replayed_rows"] += len(todo)
        return join_rows(rows, batch, self._tokenizer.pad_token_id, self.accelerator.device), zero

    # -- logging -----------------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.model.training:
            logs = {**logs, **self.timing, **{k: float(v) for k, v in self.counts.items()}}
            self.timing = dict.fromkeys(self.timing, 0.0)
            self.counts = dict.fromkeys(self.counts, 0)
        super().log(logs, start_time)


# ---------------------------------------------------------------------------------------------------------
# batch rows (the Selective Sample Buffer moves single completions between batches)


def _image_spans(batch: dict, key: str, n: int) -> list[tuple[int, int]]:
    counts = batch.get("num_tiles") if key == "pixel_values" and batch.get("num_tiles") is not None else None
    counts = counts if counts is not None else (batch.get("num_images") or [0] * n)
    spans, at = [], 0
    for c in counts:
        spans.append((at, at + int(c)))
        at += int(c)
    return spans


def split_rows(batch: dict) -> list[dict]:
    """One dict per completion: its prompt and completion tokens without padding, its per-token tensors,
    advantage, and its images (pixel_values of its own images or tiles)."""
    n = batch["completion_ids"].shape[0]
    rows: list[dict] = [{} for _ in range(n)]
    pm, cm = batch["prompt_mask"], batch["completion_mask"]
    for i in range(n):
        p = int(pm[i].sum())
        nz = cm[i].nonzero()
        c = int(nz[-1]) + 1 if nz.numel() else cm.shape[1]
        for k in _PROMPT_KEYS:
            rows[i][k] = batch[k][i, pm.shape[1] - p :]
        for k in _COMPLETION_KEYS:
            v = batch.get(k)
            if v is not None:
                rows[i][k] = v[i, :c] if v.dim() == 2 and v.shape[1] == cm.shape[1] else v[i]
        rows[i]["advantages"] = batch["advantages"][i]
    for k in _IMAGE_KEYS:
        if batch.get(k) is not None:
            for i, (a, b) in enumerate(_image_spans(batch, k, n)):
                rows[i][k] = batch[k][a:b]
    for k in _LIST_KEYS:
        if batch.get(k) is not None:
            for i in range(n):
                rows[i][k] = batch[k][i]
    return rows


def join_rows(rows: list[dict], like: dict, pad_id: int, device: Any) -> dict:
    """The batch of `rows` (left-padded prompts, right-padded completions), with `like`'s keys."""
    import torch

    out: dict[str, Any] = {}
    p_len = max(int(r["prompt_ids"].shape[0]) for r in rows)
    c_len = max(int(r["completion_ids"].shape[0]) for r in rows)
    fill = {"prompt_ids": pad_id, "completion_ids": pad_id, "tool_mask": 1}
    for k in _PROMPT_KEYS:
        out[k] = torch.stack([torch.cat([r[k].new_full((p_len - r[k].shape[0],), fill.get(k, 0)), r[k].to(device)
                                         .to(r[k].dtype)]) if r[k].shape[0] < p_len else r[k] for r in rows]).to(device)
    for k in _COMPLETION_KEYS:
        if like.get(k) is None:
            continue
        per_token = like[k].dim() == 2 and like[k].shape[1] == like["completion_mask"].shape[1]
        if not per_token:
            out[k] = torch.stack([r[k].to(device) for r in rows])
            continue
        out[k] = torch.stack([torch.cat([r[k].to(device), r[k].new_full((c_len - r[k].shape[0],), fill.get(k, 0))
                                         .to(device)]) for r in rows])
    out["advantages"] = torch.stack([r["advantages"].to(device) for r in rows])
    for k in _IMAGE_KEYS:
        if like.get(k) is not None:
            out[k] = torch.cat([r[k].to(device) for r in rows])
    for k in _LIST_KEYS:
        if like.get(k) is not None:
            out[k] = [r[k] for r in rows]
    out["num_items_in_batch"] = like["num_items_in_batch"]
    return out


# ---------------------------------------------------------------------------------------------------------
# one log row per optimizer step


def step_record(logs: dict, step: int, components: list[str], tokens: float) -> dict:
    """The log row of one optimizer step from TRL's averaged metrics plus ours."""

    def g(k: str) -> float | None:
        v = logs.get(k)
        return float(v) if v is not None else None

    step_s = g("step_time") or 0.0
    rec: dict[str, Any] = {
        "step": step, "loss": g("loss"), "lr": g("learning_rate"), "grad_norm": g("grad_norm"),
        "reward": g("reward"), "reward_std": g("reward_std"),
    }
    for c in components:
        rec[f"{c}_mean"] = g(f"rewards/{c}/mean")
        rec[f"{c}_std"] = g(f"rewards/{c}/std")
    rec.update({
        "kl": g("kl"), "clip_ratio": g("clip_ratio/region_mean"), "entropy": g("entropy"),
        "completion_len": g("completions/mean_length"), "truncated_ratio": g("completions/clipped_ratio"),
        "groups": int(g("groups") or 0), "zero_std_groups": int(g("zero_std_groups") or 0),
        "skipped_rows": int(g("skipped_rows") or 0), "replayed_rows": int(g("replayed_rows") or 0),
        "accuracy_timeouts": int(g("accuracy_timeouts") or 0),
        "tokens": int(tokens), "tok_s": tokens / step_s if step_s > 0 else None,
        "gen_s": g("gen_s"), "reward_s": g("reward_s"),
        "update_s": max(0.0, step_s - (g("gen_s") or 0.0) - (g("reward_s") or 0.0)), "step_s": step_s,
    })
    return rec


class StepLog(TrainerCallback):
    """Appends one record per optimizer step to `path` (world process zero) and logs one line for it."""

    def __init__(self, path: Path, components: list[str], resume_step: int) -> None:
        self.path, self.components = Path(path), components
        self.records = [r for r in read_steps(self.path) if r["step"] <= resume_step]
        self.tokens_seen = None
        self._is_zero = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            tmp.replace(self.path)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if not logs or "reward" not in logs or not state.is_world_process_zero:
            return
        total = float(logs.get("num_tokens") or 0.0)
        if self.tokens_seen is None:
            # resumed: the trainer state restores num_input_tokens_seen; the first step after it counts alone
            prev = self.records[-1].get("tokens_total") if self.records else None
            self.tokens_seen = float(prev) if prev is not None else 0.0
        rec = step_record(logs, int(state.global_step), self.components, max(0.0, total - self.tokens_seen))
        rec["tokens_total"] = int(total)
        self.tokens_seen = total
        self.records.append(rec)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        parts = " | ".join(f"{c} {rec[f'{c}_mean']:.3f}" for c in self.components if rec.get(f"{c}_mean") is not None)
        log.info("step %d/%d | reward %.3f | %s | kl %s | len %.0f | zero-std %d/%d | tok/s %s | gen %.2fs reward %.2fs "
                 "update %.2fs", rec["step"], state.max_steps, rec["reward"] or 0.0, parts,
                 "-" if rec["kl"] is None else f"{rec['kl']:.4f}", rec["completion_len"] or 0.0,
                 rec["zero_std_groups"], rec["groups"], "-" if rec["tok_s"] is None else f"{rec['tok_s']:,.0f}",
                 rec["gen_s"] or 0.0, rec["reward_s"] or 0.0, rec["update_s"])
