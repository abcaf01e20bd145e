"""The student model: vision encoder -> MLP projector -> LLM, in a standard transformers layout.

    from trainers.model import AssembleConfig, assemble_student, reassemble, load_student, apply_freeze
    student = assemble_student(AssembleConfig(vision_path=..., llm_path=...), "ckpt/student")
    model, processor = load_student(student)          # AutoModelForImageTextToText, no remote code
    trainable = apply_freeze(model, "projector")      # align: projector only

Layouts (both load with `AutoModelForImageTextToText.from_pretrained` without trust_remote_code and are
architectures vLLM serves):
- `llava` (`LlavaForConditionalGeneration`): any HF vision encoder transformers builds with `AutoModel`
  (SigLIP, CLIP, ...) -> Linear(d_vision, d_llm) -> act -> Linear(d_llm, d_llm) -> any HF causal LM.
- `internvl` (`InternVLForConditionalGeneration`): an InternViT-style encoder (`internvl_vision`) ->
  pixel shuffle (`downsample_ratio`) -> LayerNorm -> Linear -> act -> Linear (InternVL's `mlp1`, as in
  Skywork R1V) -> causal LM, with dynamic tiling in the image processor.
The standard classes fix the projector at two linear layers whose hidden width is the LLM's hidden size;
`projector_depth` / `projector_width` are checked against that and a different request is a config error
(a deeper projector would need a custom class, i.e. remote code, which vLLM and AutoModel would refuse).
LayerNorm and pixel shuffle exist only in the InternVL layout, which transformers only builds around its
own InternViT encoder; `layout: auto` picks it for such encoders and LLaVA for everything else.

Efficient transfer (Skywork R1V): `assemble_student` with the *substitute* LLM, align with
`apply_freeze(model, "projector")`, then `reassemble(aligned, reasoning_llm, out)` keeps encoder +
projector and swaps the LLM, refusing (ReassemblyError) on a different architecture, hidden size or
vocabulary. Every checkpoint holds `r1v_assembly.json` (where its parts came from).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.config import StageConfig
from trainers.chat import TEMPLATES, read_template, student_template  # noqa: F401  (part of this module's API)
from trainers.tiny import build_tiny_checkpoints  # noqa: F401  (part of this module's API)

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"  # the literal placeholder in SFT user turns (one per image)
ASSEMBLY_FILE = "r1v_assembly.json"
PROJECTOR_KEY = "multi_modal_projector"
FREEZE_POLICIES = ("projector", "projector_llm", "lora", "full")


class AssembleConfig(StageConfig):
    """How to build the student; also the `assemble` stage's config section."""

    init: Literal["pretrained", "tiny_random"] = Field(
        "pretrained",
        description="pretrained: load vision_path and llm_path; tiny_random: build tiny random SigLIP + Qwen2 "
        "checkpoints first (offline demos and tests only; vision_path/llm_path must be unset)",
    )
    vision_path: str | None = Field(None, description="HF vision encoder checkpoint dir (SigLIP, CLIP, InternViT)")
    llm_path: str | None = Field(None, description="HF causal LM checkpoint dir, with its tokenizer")
    reassemble_from: str | None = Field(
        None,
        description="an assembled/aligned student dir: keep its encoder + projector, swap in llm_path "
        "(the stage also takes it from a 'student' input step)",
    )
    layout: Literal["auto", "llava", "internvl"] = Field(
        "auto", description="auto: internvl for internvl_vision encoders, llava otherwise"
    )
    projector_depth: int = Field(2, description="linear layers in the projector; the standard layouts have 2")
    projector_width: int | None = Field(
        None, description="projector hidden width; None = the LLM hidden size (the only width both layouts have)"
    )
    projector_act: str = Field("gelu", description="projector activation (transformers ACT2FN name)")
    projector_layernorm: bool | None = Field(
        None, description="LayerNorm before the projector; None = the layout's own (internvl: yes, llava: no)"
    )
    pixel_shuffle: float | None = Field(
        None, description="token reduction ratio (0.5 = 4x fewer tokens); internvl only; None = 0.5 there"
    )
    image_size: int | None = Field(None, description="if set, must equal the encoder's input size (checked)")
    vision_feature_layer: int = Field(-1, description="encoder hidden layer fed to the projector")
    chat_template: str = Field(
        "auto",
        description="auto: the LLM tokenizer's own chat template, made to take images (ChatML with <think> when "
        "it has none); llm: the same, an error without one; else a template in trainers/templates (without "
        ".jinja) or a path to a .jinja file (trainers/chat.py)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the checkpoint is saved in (bf16 for real GPU runs; fp32 for CPU tests)"
    )
    seed: int = Field(0, description="seed of the projector's initialisation (and of tiny_random checkpoints)")

    @model_validator(mode="after")
    def _check(self) -> AssembleConfig:
        if self.init == "tiny_random" and (self.vision_path or self.llm_path):
            raise ValueError("init=tiny_random builds its own checkpoints: leave vision_path and llm_path unset")
        if self.init == "pretrained" and not self.llm_path:
            raise ValueError("init=pretrained needs llm_path (and vision_path, unless re-assembling a student)")
        if self.projector_depth != 2:
            raise ValueError(
                f"projector_depth={self.projector_depth}: the standard LLaVA/InternVL projectors have exactly 2 "
                "linear layers; other depths would need remote code, which AutoModel and vLLM cannot load"
            )
        if self.layout == "llava" and (self.projector_layernorm or self.pixel_shuffle not in (None, 1.0)):
            raise ValueError(
                "layout=llava has no projector LayerNorm or pixel shuffle: use an InternViT-style encoder "
                "with layout internvl (or auto) for projector_layernorm/pixel_shuffle"
            )
        if self.layout == "internvl" and self.projector_layernorm is False:
            raise ValueError("layout=internvl always has the projector LayerNorm (InternVL's mlp1)")
        if self.pixel_shuffle is not None and not 0 < self.pixel_shuffle <= 1:
            raise ValueError(f"pixel_shuffle={self.pixel_shuffle}: must be in (0, 1], e.g. 0.5")
        return self


class ReassemblyError(ValueError):
    """The new LLM does not fit the student's projector (architecture, hidden size or vocabulary)."""


# ---------------------------------------------------------------------------------------------- helpers


def torch_dtype(dtype: Any):
    """torch dtype from a name or dtype; None = bf16 on CUDA, fp32 on CPU (stated, never implicit)."""
    import torch

    if dtype is None:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(dtype)]


def _check_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{what} {p}: no config.json there (not a saved HF checkpoint)")
    return p


def _load_vision(path: Path, dtype):
    """The vision tower from an encoder-only or a full dual-encoder (CLIP/SigLIP) checkpoint."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    cfg = AutoConfig.from_pretrained(path)
    vcfg = getattr(cfg, "vision_config", None)
    if vcfg is None:
        return AutoModel.from_pretrained(path, dtype=dtype)
    # A dual encoder (CLIP, SigLIP): load only its vision tower class, which takes the vision weights.
    return MODEL_MAPPING[type(vcfg)].from_pretrained(path, dtype=dtype)


def _resolve_layout(cfg: AssembleConfig, vision_type: str) -> str:
    layout = cfg.layout
    if layout == "auto":
        layout = "internvl" if vision_type == "internvl_vision" else "llava"
    if layout == "internvl" and vision_type != "internvl_vision":
        raise ValueError(
            f"layout=internvl needs an InternViT-style encoder (model_type internvl_vision), got {vision_type!r}: "
            "transformers' InternVL class rebuilds any other encoder as InternViT on reload; use layout llava"
        )
    if layout == "llava" and (cfg.projector_layernorm or cfg.pixel_shuffle not in (None, 1.0)):
        raise ValueError(f"projector_layernorm/pixel_shuffle need layout internvl; encoder {vision_type!r} gives llava")
    return layout


def _ensure_tokens(tokenizer, tokens: list[str]) -> None:
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)


def _image_token_count(vcfg, layout: str, ratio: float) -> int:
    size = vcfg.image_size[0] if isinstance(vcfg.image_size, (list, tuple)) else vcfg.image_size
    patch = vcfg.patch_size[0] if isinstance(vcfg.patch_size, (list, tuple)) else vcfg.patch_size
    n = (size // patch) ** 2
    return int(n * ratio * ratio) if layout == "internvl" else n


def _build_processor(layout: str, image_processor, tokenizer, vcfg, ratio: float, template: str, strategy: str):
    """The processor saved beside the model: expands each image placeholder to the image-token count."""
    from transformers import InternVLProcessor, LlavaProcessor

    tokenizer.chat_template = template
    # Inference pads batched prompts on the left (generation appends on the right); training pads itself.
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # what save_pretrained writes to tokenizer_config.json
    if layout == "llava":
        _ensure_tokens(tokenizer, [IMAGE_PLACEHOLDER])
        patch = vcfg.patch_size[0] if isinstance(vcfg.patch_size, (list, tuple)) else vcfg.patch_size
        has_cls = vcfg.model_type in ("clip_vision_model",)
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch,
            vision_feature_select_strategy=strategy,
            chat_template=template,
            image_token=IMAGE_PLACEHOLDER,
            num_additional_image_tokens=1 if has_cls else 0,
        )
    if importlib.util.find_spec("torchvision") is None:
        # InternVLProcessor insists on its video processor, which transformers only builds with torchvision.
        raise RuntimeError("layout internvl needs torchvision installed (InternVL's processor requires it)")
    special = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
               "video_token": "<video>"}
    _ensure_tokens(tokenizer, list(special.values()))
    # Named special tokens are what InternVLProcessor reads (tokenizer.start_image_token, ..._id); this is
    # how transformers' own InternVL tokenizers declare them, and they are saved in tokenizer_config.json.
    tokenizer._set_model_specific_special_tokens(special)
    from transformers import InternVLVideoProcessor

    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(),
        image_seq_length=_image_token_count(vcfg, "internvl", ratio),
        chat_template=template,
    )


def _make_config(layout: str, vcfg, tcfg, image_token_id: int, cfg: AssembleConfig):
    from transformers import InternVLConfig, LlavaConfig

    ratio = cfg.pixel_shuffle or 0.5
    common = dict(
        vision_config=vcfg.to_dict(),
        text_config=tcfg.to_dict(),
        projector_hidden_act=cfg.projector_act,
        vision_feature_layer=cfg.vision_feature_layer,
        tie_word_embeddings=bool(getattr(tcfg, "tie_word_embeddings", False)),
    )
    if layout == "llava":
        strategy = "default" if vcfg.model_type == "clip_vision_model" else "full"  # SigLIP has no CLS token
        return LlavaConfig(
            image_token_index=image_token_id,
            image_seq_length=_image_token_count(vcfg, layout, ratio),
            vision_feature_select_strategy=strategy,
            **common,
        ), strategy
    return InternVLConfig(
        image_token_id=image_token_id,
        image_seq_length=_image_token_count(vcfg, layout, ratio),
        downsample_ratio=ratio,
        vision_feature_select_strategy="default",  # InternViT has a CLS token
        **common,
    ), "default"


def _combine(config, vision, language_model, lm_head, projector_state, seed: int, dtype):
    """Build the image-text-to-text model around already-loaded parts without a second random copy."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    model.model.vision_tower = vision
    model.model.language_model = language_model
    model.lm_head = lm_head
    proj_cls = type(model.model.multi_modal_projector)
    torch.manual_seed(seed)
    projector = proj_cls(config)
    if projector_state is not None:
        projector.load_state_dict(projector_state)
    model.model.multi_modal_projector = projector.to(dtype)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype)


# Vision towers that transformers 5 builds without their `vision_model` wrapper module, and so saves as
# `vision_tower.embeddings...`, where every published LLaVA checkpoint (and vLLM's loader, which fails
# with "no module or parameter named 'vision_tower.embeddings'") has `vision_tower.vision_model....`.
_WRAPPED_TOWERS = ("siglip_vision_model", "clip_vision_model")
_TOWER = "vision_tower."


def standard_weight_names(out_dir: str | Path) -> int:
    """Rewrite a saved LLaVA student's vision-tower weight names to the published layout; returns the
    number renamed. transformers loads both layouts into the same weights; vLLM only the published one."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    if cfg.get("model_type") != "llava" or (cfg.get("vision_config") or {}).get("model_type") not in _WRAPPED_TOWERS:
        return 0
    renamed = 0
    mapping: dict[str, str] = {}
    for shard in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            meta = f.metadata()
            keys = list(f.keys())
            if not any(k.startswith(_TOWER) and not k.startswith(_TOWER + "vision_model.") for k in keys):
                continue
            tensors = {}
            for k in keys:
                new = _TOWER + "vision_model." + k[len(_TOWER):] if (
                    k.startswith(_TOWER) and not k.startswith(_TOWER + "vision_model.")) else k
                tensors[new] = f.get_tensor(k)
                mapping[k] = new
                renamed += new != k
        tmp = shard.with_name(shard.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(shard)
    index = out_dir / "model.safetensors.index.json"
    if renamed and index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {mapping.get(k, k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True))
    return renamed


def _save(model, processor, out_dir: Path, record: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    standard_weight_names(out_dir)
    processor.save_pretrained(str(out_dir))
    (out_dir / ASSEMBLY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return out_dir


# ------------------------------------------------------------------------------------------- assembly


def assemble_student(cfg: AssembleConfig, out_dir: str | Path, tiny_dir: str | Path | None = None) -> Path:
    """Build encoder + fresh projector + LLM, save model + processor + chat template to `out_dir`.

    With `cfg.init == "tiny_random"`, tiny checkpoints are built in `tiny_dir` (default `out_dir/../tiny`).
    With `cfg.reassemble_from`, delegates to `reassemble`.
    """
    out_dir = Path(out_dir)
    vision_path, llm_path = cfg.vision_path, cfg.llm_path
    if cfg.init == "tiny_random":
        paths = build_tiny_checkpoints(Path(tiny_dir or out_dir.parent / "tiny"), cfg.seed)
        vision_path, llm_path = str(paths["vision"]), str(paths["llm"])
    if cfg.reassemble_from:
        return reassemble(cfg.reassemble_from, llm_path, out_dir, chat_template=cfg.chat_template)
    model, processor, record = build_student(cfg.model_copy(update={"vision_path": vision_path, "llm_path": llm_path}))
    return _save(model, processor, out_dir, record)


def build_student(cfg: AssembleConfig):
    """(model, processor, provenance record) in memory, from `cfg.vision_path` and `cfg.llm_path`."""
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

    if not cfg.vision_path:
        raise ValueError("assemble: vision_path is required (or reassemble_from, to keep a student's encoder)")
    vpath, lpath = _check_dir(cfg.vision_path, "vision_path"), _check_dir(cfg.llm_path, "llm_path")
    dtype = torch_dtype(cfg.dtype)
    vision = _load_vision(vpath, dtype)
    vcfg = vision.config
    if cfg.image_size is not None:
        size = vcfg.image_size[0] if isinstance(vcfg.image_size, (list, tuple)) else vcfg.image_size
        if size != cfg.image_size:
            raise ValueError(f"image_size={cfg.image_size} but the encoder at {vpath} takes {size}x{size} inputs")
    layout = _resolve_layout(cfg, vcfg.model_type)
    llm = AutoModelForCausalLM.from_pretrained(lpath, dtype=dtype)
    tcfg = llm.config
    if cfg.projector_width not in (None, tcfg.hidden_size):
        raise ValueError(
            f"projector_width={cfg.projector_width}: the {layout} projector's width is the LLM hidden size "
            f"({tcfg.hidden_size}); leave it unset"
        )
    tokenizer = AutoTokenizer.from_pretrained(lpath)
    image_processor = AutoImageProcessor.from_pretrained(vpath)
    config, strategy = _make_config(layout, vcfg, tcfg, 0, cfg)
    ratio = getattr(config, "downsample_ratio", 1.0)
    image_token = IMAGE_PLACEHOLDER if layout == "llava" else "<IMG_CONTEXT>"
    template, template_from = student_template(tokenizer, image_token, cfg.chat_template)
    processor = _build_processor(layout, image_processor, tokenizer, vcfg, ratio, template, strategy)
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    source_rows = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > source_rows:
        # Adding the image token outgrew the embedding matrix (LLMs without padded vocabularies).
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        tcfg = llm.config
    config, _ = _make_config(layout, vcfg, tcfg, image_token_id, cfg)
    model = _combine(config, vision, llm.model, llm.lm_head, None, cfg.seed, dtype)
    record = {
        "layout": layout,
        "vision_path": str(vpath),
        "llm_path": str(lpath),
        "llm_model_type": tcfg.model_type,
        "llm_hidden_size": tcfg.hidden_size,
        "source_vocab_rows": source_rows,
        "chat_template": template_from,
        "image_token": image_token,
        "assemble_config": cfg.model_dump(mode="json"),
        "history": [{"op": "assemble", "llm_path": str(lpath)}],
    }
    log.info("assembled %s student: %s + %s", layout, vcfg.model_type, tcfg.model_type)
    return model, processor, record


def check_llm_fits(student_dir: str | Path, llm_dir: str | Path) -> dict:
    """Raise ReassemblyError unless the LLM at `llm_dir` can take the student's projector; returns its record."""
    from transformers import AutoConfig, AutoTokenizer

    sdir, ldir = _check_dir(student_dir, "student"), _check_dir(llm_dir, "LLM")
    scfg = AutoConfig.from_pretrained(sdir).text_config
    lcfg = AutoConfig.from_pretrained(ldir)
    rec_path = sdir / ASSEMBLY_FILE
    record = json.loads(rec_path.read_text()) if rec_path.exists() else {}
    head = f"cannot re-assemble {sdir} onto {ldir}:"
    if lcfg.model_type != scfg.model_type:
        raise ReassemblyError(
            f"{head} architecture mismatch: the student's LLM is {scfg.model_type!r}, the new LLM is "
            f"{lcfg.model_type!r} ({(lcfg.architectures or ['?'])[0]}); the projector was aligned to "
            f"{scfg.model_type} hidden states, so both must share the architecture"
        )
    if lcfg.hidden_size != scfg.hidden_size:
        raise ReassemblyError(
            f"{head} hidden size mismatch: the projector outputs {scfg.hidden_size}-d embeddings, the new LLM "
            f"expects {lcfg.hidden_size}-d"
        )
    rows_ok = {scfg.vocab_size, record.get("source_vocab_rows", scfg.vocab_size)}
    if lcfg.vocab_size not in rows_ok:
        raise ReassemblyError(
            f"{head} vocabulary mismatch: the new LLM has {lcfg.vocab_size} embedding rows, the student's "
            f"LLM had {sorted(rows_ok)}"
        )
    if (ldir / "tokenizer_config.json").exists() or (ldir / "tokenizer.json").exists():
        old, new = AutoTokenizer.from_pretrained(sdir), AutoTokenizer.from_pretrained(ldir)

        def base(tok) -> dict[str, int]:
            added = tok.get_added_vocab()
            return {t: i for t, i in tok.get_vocab().items() if t not in added}

        b_old, b_new = base(old), base(new)
        diff = sorted(t for t in b_old.keys() | b_new.keys() if b_old.get(t) != b_new.get(t))
        if diff:
            examples = ", ".join(f"{t!r}: {b_old.get(t)} vs {b_new.get(t)}" for t in diff[:5])
            raise ReassemblyError(
                f"{head} vocabulary mismatch: {len(diff)} of {len(b_old)} base tokens differ in id "
                f"(student vs new LLM: {examples})"
            )
    return record


def reassemble(student_dir: str | Path, llm_dir: str | Path, out_dir: str | Path, chat_template: str = "auto") -> Path:
    """Keep the student's encoder + projector, swap in the LLM at `llm_dir` (and its tokenizer).

    Raises ReassemblyError, before loading any weights, when architecture, hidden size or vocabulary
    don't fit. The image processor stays the student's; the chat template becomes the new LLM's own
    (`chat_template` as in AssembleConfig), or stays the student's when `llm_dir` has no tokenizer.
    Memory: the student is loaded whole once (its old LLM included) next to the new LLM, on CPU, so plan
    ~2x the model size in RAM.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    record = check_llm_fits(student_dir, llm_dir)
    sdir, ldir, out_dir = Path(student_dir), Path(llm_dir), Path(out_dir)
    scfg = AutoConfig.from_pretrained(sdir)
    dtype = getattr(scfg.text_config, "dtype", None) or getattr(scfg, "dtype", None) or "float32"
    dtype = torch_dtype(str(dtype).replace("torch.", ""))
    student = AutoModelForImageTextToText.from_pretrained(sdir, dtype=dtype)
    old_proc = AutoProcessor.from_pretrained(sdir)
    llm = AutoModelForCausalLM.from_pretrained(ldir, dtype=dtype)
    own_tokenizer = (ldir / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(ldir) if own_tokenizer else old_proc.tokenizer
    layout = "internvl" if scfg.model_type == "internvl" else "llava"
    template, template_from = old_proc.chat_template, record.get("chat_template")
    if own_tokenizer:
        template, template_from = student_template(
            tokenizer, IMAGE_PLACEHOLDER if layout == "llava" else "<IMG_CONTEXT>", chat_template)
    vcfg = student.config.vision_config
    ratio = getattr(scfg, "downsample_ratio", 1.0)
    strategy = scfg.vision_feature_select_strategy
    processor = _build_processor(layout, old_proc.image_processor, tokenizer, vcfg, ratio, template, strategy)
    image_token = processor.image_token
    source_rows = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > source_rows:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    config = type(scfg)(**{**scfg.to_dict(), "text_config": llm.config.to_dict()})
    id_key = "image_token_index" if layout == "llava" else "image_token_id"
    setattr(config, id_key, tokenizer.convert_tokens_to_ids(image_token))
    config.tie_word_embeddings = bool(getattr(llm.config, "tie_word_embeddings", False))
    proj_state = student.model.multi_modal_projector.state_dict()
    model = _combine(config, student.model.vision_tower, llm.model, llm.lm_head, proj_state, 0, dtype)
    record = {**record, "llm_path": str(ldir), "llm_model_type": llm.config.model_type,
              "source_vocab_rows": source_rows, "chat_template": template_from}
    record["history"] = [*record.get("history", []), {"op": "reassemble", "from": str(sdir), "llm_path": str(ldir)}]
    log.info("re-assembled %s: projector from %s, LLM from %s -> %s", layout, sdir, ldir, out_dir)
    return _save(model, processor, out_dir, record)


# ------------------------------------------------------------------------------------ load and freeze


def load_student(path: str | Path, dtype: Any = None):
    """(model, processor) of a saved student through the standard Auto classes (no remote code).

    dtype: None = bf16 on CUDA, fp32 on CPU; or "float32" / "bfloat16" / a torch dtype.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    p = _check_dir(path, "student")
    model = AutoModelForImageTextToText.from_pretrained(str(p), dtype=torch_dtype(dtype))
    processor = AutoProcessor.from_pretrained(str(p))
    return model, processor


def projector_parameter_names(model) -> list[str]:
    """Names of the projector's parameters (what `align` trains)."""
    return [n for n, _ in model.named_parameters() if PROJECTOR_KEY in n]


class LoraOptions(StageConfig):
    """LoRA on the LLM's linear layers (peft), for the `lora` freeze policy."""

    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA branch")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="LLM linear layer names that get adapters",
    )


def apply_freeze(model, policy: str, lora_cfg: LoraOptions | dict | None = None) -> list[str]:
    """Set requires_grad by policy; returns the trainable parameter names.

    projector: projector only (align; Skywork's choice after re-assembly) | projector_llm: projector + LLM
    (+ lm_head) | lora: projector + LoRA adapters injected in place on the LLM (merge with `merge_lora`
    before saving) | full: everything, vision encoder included (Skywork reports this diverges easily).
    """
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"freeze policy {policy!r}: expected one of {FREEZE_POLICIES}")
    if policy == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        opts = LoraOptions.model_validate(lora_cfg or {})
        targets = "|".join(opts.target_modules)
        peft_cfg = LoraConfig(
            r=opts.r,
            lora_alpha=opts.alpha,
            lora_dropout=opts.dropout,
            target_modules=rf".*language_model.*\.({targets})",
        )
        inject_adapter_in_model(peft_cfg, model)
    elif lora_cfg is not None:
        raise ValueError(f"lora_cfg given but freeze policy is {policy!r}, not 'lora'")
    if policy == "full":
        log.warning("freeze policy 'full' trains the vision encoder too; Skywork R1V reports it diverges easily")

    def trainable(name: str) -> bool:
        if policy == "full":
            return True
        if PROJECTOR_KEY in name:
            return True
        if policy == "projector_llm":
            return "language_model" in name or name.startswith("lm_head")
        if policy == "lora":
            return "lora_" in name
        return False

    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(trainable(name))
        if param.requires_grad:
            names.append(name)
    return names


def merge_lora(model):
    """Fold injected LoRA adapters into their base layers, in place: the model saves in standard layout."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
