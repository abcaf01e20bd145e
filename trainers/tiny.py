"""Tiny random checkpoints for offline demos and tests (never for real training).

    python -c "from trainers.tiny import build_tiny_checkpoints; print(build_tiny_checkpoints('/tmp/tiny'))"

Builds, with `save_pretrained`, so everything downstream goes through the real `from_pretrained` path:
- `vision/`: a SigLIP vision encoder (hidden 64, 32x32 images, 8x8 patches -> 16 image tokens) with
  its image processor;
- `llm/`: a Qwen2 causal LM (hidden 64, 2 layers) with a byte-level BPE tokenizer trained on the fly
  on a small built-in corpus (ChatML, `<think>`, `<image>` and InternVL's image tokens are special);
- `internvit/` (only with `internvit=True`): an InternViT-style encoder (`internvl_vision`) for the
  InternVL layout (LayerNorm + pixel-shuffle projector, dynamic tiling).

Variants for mismatch tests: `build_tiny_llm(out, seed, arch="llama" | hidden_size=96 | corpus_salt=...)`;
`chat_template=` gives the tokenizer another chat template (None: none at all). The default is a
Qwen2-Instruct-style ChatML template with its default system prompt, as real LLMs ship one.
Everything is seeded, so the same seed gives bit-identical checkpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<think>",
    "</think>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<video>",
]
# Qwen2-Instruct's template: ChatML, a default system prompt when the conversation has none.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen pads its embedding matrix past the tokenizer; the tiny LLM does the same so that adding a
# token (the image placeholder) is tested without a resize.
TINY_VOCAB_ROWS = 512
TINY_HIDDEN = 64
TINY_IMAGE = 32
TINY_PATCH = 8

_WORDS = (
    "the a an of to is are and or if then so we find let solve compute answer question image figure shows "
    "triangle circle square angle side length area perimeter radius diameter point line segment equal "
    "sum product difference ratio number value total each how many what which correct option choose "
    "therefore hence because since wait check again first second third next finally result final "
    "think reasoning step count add subtract multiply divide degrees units cm meters red blue green "
    "left right top bottom above below larger smaller greater less than x y z n k m"
).split()
_MATH = r"0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 30 45 60 90 100 180 360 + - * / = ( ) [ ] \{ \} ^ _ , . : ; ? ! $ \frac \sqrt \pi \cdot \times \boxed{ } A B C D E (A) (B) (C) (D)".split()


def _corpus(salt: int) -> list[str]:
    import random

    rng = random.Random(1234 + salt)
    lines = []
    for _ in range(600):
        words = [rng.choice(_WORDS if rng.random() < 0.7 else _MATH) for _ in range(rng.randint(4, 16))]
        lines.append(" ".join(words))
    return lines


def train_tokenizer(out_dir: str | Path, vocab_size: int = 400, salt: int = 0,
                    chat_template: str | None = TINY_CHAT_TEMPLATE, specials: list[str] | None = None):
    """Train a byte-level BPE tokenizer on the built-in corpus and save it as a fast HF tokenizer.

    Byte-level, so any text (LaTeX, unicode) encodes without unknown tokens. `specials`: extra special
    tokens (another template's control tokens); the end-of-turn token stays `<|im_end|>` unless the
    first of them ends turns (then it is the eos token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(salt), trainer=trainer)
    # a template's own control tokens come after the trained vocabulary: the base ids stay those of
    # every other tiny LLM of the same corpus, so re-assembly between them is allowed
    extra = [t for t in specials or [] if t not in SPECIAL_TOKENS]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=chat_template,
    )
    if extra:
        hf.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
        hf.eos_token = extra[0]
    hf.save_pretrained(str(out_dir))
    return hf


def build_tiny_llm(
    out_dir: str | Path,
    seed: int = 0,
    arch: str = "qwen2",
    hidden_size: int = TINY_HIDDEN,
    vocab_rows: int = TINY_VOCAB_ROWS,
    corpus_salt: int = 0,
    num_heads: int = 4,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
    specials: list[str] | None = None,
) -> Path:
    """A tiny random causal LM (`qwen2` or `llama`) plus its trained tokenizer, saved to `out_dir`.

    vLLM's CPU attention needs a head size of 64: `hidden_size=128, num_heads=2` builds such a model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    tok = train_tokenizer(out, salt=corpus_salt, chat_template=chat_template, specials=specials)
    if len(tok) > vocab_rows:
        raise ValueError(f"tokenizer has {len(tok)} tokens, more than vocab_rows={vocab_rows}")
    common = dict(
        vocab_size=vocab_rows,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=min(2, num_heads),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch={arch!r}: tiny LLMs exist for {sorted(classes)}")
    cfg_cls, model_cls = classes[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**common)).to(torch.float32)
    model.save_pretrained(str(out))
    return out


def _tiny_vision(out_dir: str | Path, config_cls, model_cls, processor, seed: int) -> Path:
    """A tiny random vision encoder of `model_cls` (hidden 64, 2 layers) saved with `processor`."""
    import torch

    out = Path(out_dir)
    cfg = config_cls(
        hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=TINY_IMAGE,
        patch_size=TINY_PATCH,
    )
    torch.manual_seed(seed)
    model_cls(cfg).to(torch.float32).save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


def build_tiny_siglip(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random SigLIP vision encoder with its image processor, saved to `out_dir`."""
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    processor = SiglipImageProcessorPil(size={"height": TINY_IMAGE, "width": TINY_IMAGE})
    return _tiny_vision(out_dir, SiglipVisionConfig, SiglipVisionModel, processor, seed)


def build_tiny_internvit(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random InternViT-style encoder (`internvl_vision`) with a tiling image processor."""
    from transformers import GotOcr2ImageProcessorPil, InternVLVisionConfig, InternVLVisionModel

    processor = GotOcr2ImageProcessorPil(
        size={"height": TINY_IMAGE, "width": TINY_IMAGE}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    return _tiny_vision(out_dir, InternVLVisionConfig, InternVLVisionModel, processor, seed)


def build_tiny_checkpoints(out_dir: str | Path, seed: int = 0, internvit: bool = False,
                           llm_hidden: int = TINY_HIDDEN, llm_heads: int = 4) -> dict[str, Path]:
    """Build the tiny encoder(s) and LLM under `out_dir`; returns {"vision", "llm"[, "internvit"]} paths.

    For offline demos and tests only: the weights are random.
    """
    out = Path(out_dir)
    paths = {
        "vision": build_tiny_siglip(out / "vision", seed),
        "llm": build_tiny_llm(out / "llm", seed, hidden_size=llm_hidden, num_heads=llm_heads),
    }
    if internvit:
        paths["internvit"] = build_tiny_internvit(out / "internvit", seed)
    log.info("tiny random checkpoints (offline demo/test only) in %s", out)
    return paths
