"""The SFT data path: curated `sft` shards -> tokenized, masked, packed or length-grouped batches.

    from trainers.data import SFTDataConfig, make_sft_data
    dataset, collate = make_sft_data([run_dir / "curate"], processor, SFTDataConfig(max_len=16384))
    batch = collate([dataset[0], dataset[1]])      # -> model(**{k: v for k in batch if k not in LOSS_KEYS})

Rows follow pipeline.schema.SFT: `messages` [system, user, assistant] with one literal `<image>` per image in
the user turn, `images` as stored bytes. Per sample:
- the processor's chat template (the reasoning LLM's own, trainers/chat.py) renders the conversation: the
  prompt exactly as at inference, then the assistant turn; each `<image>` becomes the processor's own
  expansion (`replace_image_token`: 16 image tokens for the tiny SigLIP, `<img>` + 256 x tiles +
  `</img>` for InternVL), so training sees exactly what `processor(...)` produces at inference;
- `labels` = token ids inside the assistant turn (content and end-of-turn token), -100 elsewhere; the
  span is found by rendering with and without the assistant turn (trainers.chat.conversation), so any
  template's markup is masked correctly;
  `loss_weights` = 1.0 on assistant tokens, `think_weight` inside `<think>...</think>`, 0 elsewhere.
  Both are aligned with `input_ids` (weight i belongs to predicting token i; the loss shifts);
- `pixel_values` from the image processor (dynamic tiling where it tiles: `max_tiles`), decoded from the
  shard bytes; None for text-only samples.
Rows that cannot be used are dropped and counted (`dataset.dropped`: overlong, image_count_mismatch,
no_assistant_turn, empty_message, template_error, bad_image_record), never silently.

Items (what the training loop permutes with its seed, so resume is exact at an item index):
- `packing: false, group_by_length: false`: one sample per item;
- `packing: true`: one *bin* per item: samples concatenated up to `max_len`, `position_ids` restarting at
  0 for each sample and no attention mask, so transformers' sdpa/eager masks are block-diagonal and
  flash-attn runs varlen: attention never crosses samples (run the forward with `use_cache=False`, as
  training does: transformers derives the per-sample mask from position_ids only without a KV cache);
- `group_by_length: true`: one *group* per item: `group_size` samples of similar length, padded together.
Bins and groups are fixed by `seed`, so every rank and every restart sees the same items.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from pipeline.config import StageConfig

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
LOSS_KEYS = ("labels", "loss_weights")
SFT_COLUMNS = ["sample_id", "messages", "images"]


class SFTDataConfig(StageConfig):
    """Tokenization, masking and batching of SFT rows."""

    max_len: int = Field(16384, ge=16, description="tokens per sample (and per packed bin); longer samples are dropped")
    think_weight: float = Field(1.0, ge=0, description="loss weight of tokens inside <think>...</think> (answer: 1.0)")
    packing: bool = Field(False, description="pack samples into max_len bins; attention stays within each sample")
    group_by_length: bool = Field(False, description="items are groups of similar-length samples (less padding)")
    group_size: int = Field(4, ge=1, description="samples per length group")
    window: int = Field(
        512, ge=1, description="bins/groups are formed within shuffled windows of this many samples (randomness "
        "across the epoch vs tighter packing)"
    )
    max_tiles: int = Field(12, ge=1, description="most image tiles for encoders that tile (InternVL: 1-12 + thumbnail)")
    min_tiles: int = Field(1, ge=1, description="fewest image tiles for encoders that tile")
    seed: int = Field(0, description="seed of the bin / group assignment")

    @model_validator(mode="after")
    def _check(self) -> SFTDataConfig:
        if self.packing and self.group_by_length:
            raise ValueError("packing and group_by_length are alternatives: set one")
        if self.min_tiles > self.max_tiles:
            raise ValueError(f"min_tiles={self.min_tiles} > max_tiles={self.max_tiles}")
        return self


class DataError(ValueError):
    """SFT input that cannot be read; the message names the directory, row or sample id."""


# ------------------------------------------------------------------------------------------- reading


def read_sft(source: Any):
    """An Arrow table of SFT rows from a table, a shard directory, or a list of directories."""
    import pyarrow as pa

    from pipeline.rundir import read_table

    if isinstance(source, pa.Table):
        table = source
    else:
        dirs = [source] if isinstance(source, (str, Path)) else list(source)
        parts = []
        for d in dirs:
            try:
                parts.append(read_table(Path(d)))
            except FileNotFoundError as e:
                raise DataError(f"SFT input {d}: {e}") from e
        if not parts:
            raise DataError("no SFT input directories given")
        table = pa.concat_tables(parts, promote_options="default")
    missing = [c for c in SFT_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"SFT rows lack column(s) {missing} (have {table.column_names})")
    return table


# ---------------------------------------------------------------------------------------------- encoding


class _Encoder:
    """Renders and tokenizes one conversation; knows the processor's image expansion."""

    def __init__(self, processor: Any, cfg: SFTDataConfig) -> None:
        self.processor = processor
        self.tok = processor.tokenizer
        self.cfg = cfg
        if not getattr(processor, "chat_template", None):
            raise DataError("the processor has no chat template: assemble the student with trainers.model")
        ip = processor.image_processor
        self.image_kwargs: dict[str, Any] = {}
        self._count_cache: dict[tuple[int, int], int] = {}
        self._expansion_cache: dict[str, list[int]] = {}
        if hasattr(ip, "crop_to_patches"):  # tiling processors (InternVL / GOT-OCR2)
            self.image_kwargs = {"crop_to_patches": True, "min_patches": cfg.min_tiles, "max_patches": cfg.max_tiles}

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def image_token_count(self, width: int, height: int) -> int:
        """Tokens one image expands to, from its stored size (no decoding)."""
        key = (width, height)
        if key not in self._count_cache:
            # Run the real image processor on a blank image of that size: exact for resizing and
            # tiling processors alike, and cached per size so it costs one call per distinct size.
            from PIL import Image

            inputs = self.processor.image_processor(
                images=[Image.new("RGB", (width, height))], return_tensors="pt", **self.image_kwargs
            )
            text = self.processor.replace_image_token(inputs, 0)
            self._count_cache[key] = len(self.tok(text, add_special_tokens=False)["input_ids"])
        return self._count_cache[key]

    def text_lengths(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def conversation(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
        """The row's text through the student's chat template, with the character spans of its trained
        assistant turn(s) and of their think blocks (trainers.chat.conversation: robust to templates that
        rewrite the assistant turn or pre-fill the generation prompt)."""
        from trainers.chat import conversation

        try:
            return conversation(self.render, messages)
        except ValueError as e:
            raise DataError(str(e)) from e

    def encode(self, messages: list[dict], images: list[Any], generation_prompt: bool = False) -> dict:
        """input_ids / labels / loss_weights / pixel_values of one conversation (`images`: PIL)."""
        import torch

        if generation_prompt:
            full, turns, thinks = self.render(messages, True), [], []
        else:
            full, turns, thinks = self.conversation(messages)
        pieces = full.split(IMAGE_PLACEHOLDER)
        if len(pieces) - 1 != len(images):
            raise DataError(f"{len(pieces) - 1} image placeholders but {len(images)} images")
        pixel_values, expansions = None, []
        if images:
            inputs = self.processor.image_processor(images=images, return_tensors="pt", **self.image_kwargs)
            pixel_values = inputs["pixel_values"]
            for i in range(len(images)):
                text = self.processor.replace_image_token(inputs, i)
                if text not in self._expansion_cache:
                    self._expansion_cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
                expansions.append(self._expansion_cache[text])
        ids, starts = [], []
        pos = 0
        for j, piece in enumerate(pieces):
            enc = self.tok(piece, add_special_tokens=False, return_offsets_mapping=True)
            ids.append(np.asarray(enc["input_ids"], dtype=np.int64))
            starts.append(np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64).reshape(-1) + pos)
            pos += len(piece)
            if j < len(expansions):
                ids.append(np.asarray(expansions[j], dtype=np.int64))
                starts.append(np.full(len(expansions[j]), -1, dtype=np.int64))  # image tokens: never trained
                pos += len(IMAGE_PLACEHOLDER)
        ids_np, starts_np = np.concatenate(ids), np.concatenate(starts)
        # A token belongs to the span its first character falls in.
        weights = np.zeros(len(ids_np), dtype=np.float32)
        for a, b in turns:
            weights[(starts_np >= a) & (starts_np < b)] = 1.0
        for a, b in thinks:
            weights[(starts_np >= a) & (starts_np < b) & (weights > 0)] = self.cfg.think_weight
        ids, weights = ids_np, weights
        input_ids = torch.from_numpy(ids)
        loss_weights = torch.from_numpy(weights)
        labels = torch.where(loss_weights > 0, input_ids, torch.full_like(input_ids, -100))
        return {"input_ids": input_ids, "labels": labels, "loss_weights": loss_weights, "pixel_values": pixel_values}


def prompt_inputs(processor: Any, messages: list[dict], images: list[Any], cfg: SFTDataConfig | None = None) -> dict:
    """Model inputs for generating the assistant turn, rendered and expanded exactly like training data.

    `messages`: the conversation without the assistant turn (system + user with `<image>` placeholders,
    e.g. from filters.curate.user_turn); `images`: PIL images or stored image structs. Returns batched
    `input_ids`, `attention_mask` and (when there are images) `pixel_values`, ready for `model.generate`.
    """
    from pipeline.images import decode

    pil = [decode(im) if isinstance(im, dict) else im for im in images]
    enc = _Encoder(processor, cfg or SFTDataConfig()).encode(messages, pil, generation_prompt=True)
    out = {"input_ids": enc["input_ids"][None], "attention_mask": enc["input_ids"].new_ones(1, enc["input_ids"].numel())}
    if enc["pixel_values"] is not None:
        out["pixel_values"] = enc["pixel_values"]
    return out


# ----------------------------------------------------------------------------------------------- dataset


class SFTDataset(Sequence):
    """Tokenized SFT samples: `ds[i]` -> {input_ids, labels, loss_weights, pixel_values, sample_id, length}.

    `source`: SFT shard dir(s) or an Arrow table. Lengths are computed up front (text tokenized once,
    image tokens from the stored sizes) so overlong rows are dropped and counted before training and
    packing/grouping know every length; images are decoded lazily in `__getitem__`.
    """

    def __init__(self, source: Any, processor: Any, cfg: SFTDataConfig | None = None) -> None:
        self.cfg = cfg or SFTDataConfig()
        self.enc = _Encoder(processor, self.cfg)
        table = read_sft(source)
        self.sample_ids: list[str] = table.column("sample_id").to_pylist()
        self.messages: list[list[dict]] = table.column("messages").to_pylist()
        self._images = table.column("images").combine_chunks()  # O(1) row access
        self.rows_in = table.num_rows
        self.dropped: dict[str, int] = {}
        self.dropped_ids: dict[str, list[str]] = {}
        self.index, self.lengths = self._measure()
        if self.dropped:
            log.warning("SFT data: %d of %d rows dropped: %s", self.rows_in - len(self.index), self.rows_in, self.dropped)

    def _drop(self, reason: str, row: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self.dropped_ids.setdefault(reason, []).append(self.sample_ids[row])

    def _measure(self) -> tuple[list[int], list[int]]:
        texts, owners, image_tokens = [], [], []
        from jinja2 import TemplateError

        for r, msgs in enumerate(self.messages):
            images = self._images[r].as_py() or []
            msgs = msgs or []
            if not any(m["role"] == "assistant" and m["content"] for m in msgs):
                self._drop("no_assistant_turn", r)
                continue
            if any(not isinstance(m["content"], str) or not m["role"] for m in msgs):
                self._drop("empty_message", r)
                continue
            try:
                full = self.enc.conversation(msgs)[0]
            except (TemplateError, DataError) as e:
                log.warning("SFT sample %r: chat template failed: %s", self.sample_ids[r], e)
                self._drop("template_error", r)
                continue
            pieces = full.split(IMAGE_PLACEHOLDER)
            if len(pieces) - 1 != len(images):
                self._drop("image_count_mismatch", r)
                continue
            if any(not im.get("bytes") or not im.get("width") or not im.get("height") for im in images):
                self._drop("bad_image_record", r)
                continue
            texts += pieces
            owners += [r] * len(pieces)
            image_tokens.append((r, sum(self.enc.image_token_count(im["width"], im["height"]) for im in images)))
        totals = dict(image_tokens)
        for r, n in zip(owners, self.enc.text_lengths(texts), strict=True):
            totals[r] += n
        index, lengths = [], []
        for r in sorted(totals):
            if totals[r] > self.cfg.max_len:
                self._drop("overlong", r)
                continue
            index.append(r)
            lengths.append(totals[r])
        return index, lengths

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        from pipeline.images import ImageError, decode

        r = self.index[i]
        images = []
        for k, rec in enumerate(self._images[r].as_py() or []):
            try:
                images.append(decode(rec))
            except (OSError, ValueError) as e:
                raise ImageError(f"SFT sample {self.sample_ids[r]!r}: image {k} cannot be decoded: {e}") from e
        try:
            item = self.enc.encode(self.messages[r], images)
        except DataError as e:
            raise DataError(f"SFT sample {self.sample_ids[r]!r}: {e}") from e
        n = int(item["input_ids"].numel())
        if n != self.lengths[i]:
            # Measured and encoded lengths come from the same processor; a gap would break packing.
            raise DataError(f"SFT sample {self.sample_ids[r]!r}: encoded {n} tokens, measured {self.lengths[i]}")
        item["sample_id"] = self.sample_ids[r]
        item["length"] = n
        return item


def _windows(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


class PackedSFTDataset(Sequence):
    """Bins of samples packed to `max_len` (first-fit decreasing within shuffled windows), one bin per item."""

    def __init__(self, base: SFTDataset, cfg: SFTDataConfig | None = None) -> None:
        self.base, self.cfg = base, cfg or base.cfg
        order = list(range(len(base)))
        random.Random(self.cfg.seed).shuffle(order)
        self.bins: list[list[int]] = []
        for win in _windows(order, self.cfg.window):
            open_bins: list[tuple[int, list[int]]] = []
            for i in sorted(win, key=lambda j: -base.lengths[j]):
                n = base.lengths[i]
                for b, (used, members) in enumerate(open_bins):
                    if used + n <= self.cfg.max_len:
                        open_bins[b] = (used + n, [*members, i])
                        break
                else:
                    open_bins.append((n, [i]))
            self.bins += [members for _, members in open_bins]

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, b: int) -> dict:
        """The bin's samples packed; a member that fails to load is left out and counted in the bin's
        `dropped` ({reason: n}); a bin none of whose members loads raises the first member's error."""
        from pipeline.images import ImageError

        members, dropped, first = [], {}, None
        for i in self.bins[b]:
            try:
                members.append(self.base[i])
            except (ImageError, DataError) as e:
                reason = "bad_image" if isinstance(e, ImageError) else "bad_sample"
                dropped[reason] = dropped.get(reason, 0) + 1
                log.warning("packed bin %d: dropping a member (%s): %s", b, reason, e)
                first = first or e
        if not members:
            raise first
        out = pack(members)
        if dropped:
            out["dropped"] = dropped
        return out


class LengthGroupedSFTDataset(Sequence):
    """Groups of `group_size` similar-length samples (sorted within shuffled windows), one group per item."""

    def __init__(self, base: SFTDataset, cfg: SFTDataConfig | None = None) -> None:
        self.base, self.cfg = base, cfg or base.cfg
        order = list(range(len(base)))
        random.Random(self.cfg.seed).shuffle(order)
        self.groups: list[list[int]] = []
        for win in _windows(order, max(self.cfg.window, self.cfg.group_size)):
            ranked = sorted(win, key=lambda j: -base.lengths[j])
            self.groups += _windows(ranked, self.cfg.group_size)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int) -> dict:
        return pad_batch([self.base[i] for i in self.groups[g]], self.base.enc.tok.pad_token_id or 0)


# ---------------------------------------------------------------------------------------------- collation


def _cat_pixels(items: list[dict]):
    import torch

    pix = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
    return torch.cat(pix, dim=0) if pix else None


def pack(samples: list[dict]) -> dict:
    """Concatenate samples into one row; `position_ids` restart at 0 for each sample."""
    import torch

    out = {k: torch.cat([s[k] for s in samples]) for k in ("input_ids", "labels", "loss_weights")}
    out["position_ids"] = torch.cat(
        [s["position_ids"] if "position_ids" in s else torch.arange(int(s["input_ids"].numel())) for s in samples]
    )
    out["pixel_values"] = _cat_pixels(samples)
    out["sample_ids"] = [sid for s in samples for sid in s.get("sample_ids", [s.get("sample_id")])]
    out["length"] = int(out["input_ids"].numel())
    return out


def pad_batch(items: list[dict], pad_id: int) -> dict:
    """Right-pad 1-D samples (or stack already-padded groups) into a batch with an attention mask."""
    import torch

    rows = []
    for it in items:
        if it["input_ids"].dim() == 2:  # a length group: split back into rows
            for k in range(it["input_ids"].shape[0]):
                keep = it["attention_mask"][k].bool()
                rows.append({key: it[key][k][keep] for key in ("input_ids", "labels", "loss_weights")})
        else:
            rows.append(it)
    width = max(int(r["input_ids"].numel()) for r in rows)

    def padded(key: str, fill: float, dtype) -> Any:
        out = torch.full((len(rows), width), fill, dtype=dtype)
        for i, r in enumerate(rows):
            out[i, : r[key].numel()] = r[key]
        return out

    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        mask[i, : r["input_ids"].numel()] = 1
    batch = {
        "input_ids": padded("input_ids", pad_id, torch.long),
        "attention_mask": mask,
        "labels": padded("labels", -100, torch.long),
        "loss_weights": padded("loss_weights", 0.0, torch.float32),
    }
    pix = _cat_pixels(items)
    if pix is not None:
        batch["pixel_values"] = pix
    return batch


def pad_packed(items: list[dict], pad_id: int) -> dict:
    """Stack packed rows; the padding of a short row is its own block (positions from 0), never attended."""
    import torch

    width = max(int(it["input_ids"].numel()) for it in items)
    rows = []
    for it in items:
        extra = width - int(it["input_ids"].numel())
        if extra:
            filler = {
                "input_ids": torch.full((extra,), pad_id, dtype=torch.long),
                "labels": torch.full((extra,), -100, dtype=torch.long),
                "loss_weights": torch.zeros(extra),
                "sample_id": None,
                "pixel_values": None,
            }
            it = pack([it, filler])
        rows.append(it)
    batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "position_ids", "labels", "loss_weights")}
    pix = _cat_pixels(items)
    if pix is not None:
        batch["pixel_values"] = pix
    return batch


class SFTCollator:
    """Turns items of any of the three datasets into one batch a LLaVA/InternVL forward accepts.

    Keys: input_ids, labels, loss_weights, (attention_mask | position_ids), pixel_values when any item
    has images. Pass everything but `LOSS_KEYS` to the model.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        if not items:
            raise ValueError("empty batch")
        if "position_ids" in items[0]:
            return pad_packed(items, self.pad_id)
        return pad_batch(items, self.pad_id)


def make_sft_data(source: Any, processor: Any, cfg: SFTDataConfig | None = None) -> tuple[Sequence, SFTCollator]:
    """(dataset, collate) per `cfg`: plain samples, packed bins or length groups; drops logged and counted."""
    cfg = cfg or SFTDataConfig()
    base = SFTDataset(source, processor, cfg)
    if cfg.packing:
        ds: Sequence = PackedSFTDataset(base, cfg)
    elif cfg.group_by_length:
        ds = LengthGroupedSFTDataset(base, cfg)
    else:
        ds = base
    pad = processor.tokenizer.pad_token_id
    return ds, SFTCollator(pad if pad is not None else 0)
