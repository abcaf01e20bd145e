"""Student assembly: standard layout, reload without remote code, identical logits, freeze policies."""

from __future__ import annotations

import json

import pytest
import torch

from tests.trainers.conftest import make_image


def _inputs(processor, n_images: int = 1, text: str = "What is x?"):
    from pipeline.images import decode

    images = [decode(make_image(7 + k)) for k in range(n_images)]
    msgs = [{"role": "user", "content": "<image>\n" * n_images + text}]
    prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return processor(images=images or None, text=[prompt], return_tensors="pt")


def test_saved_as_standard_architecture_without_remote_code(tiny_student):
    cfg = json.loads((tiny_student / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert "auto_map" not in cfg  # nothing to trust: no custom code is referenced
    assert not list(tiny_student.glob("*.py"))
    proc_files = {p.name for p in tiny_student.iterdir()}
    assert {"tokenizer_config.json", "processor_config.json"} <= proc_files or "chat_template.jinja" in proc_files
    record = json.loads((tiny_student / "r1v_assembly.json").read_text())
    assert record["layout"] == "llava" and record["history"][0]["op"] == "assemble"


def test_reload_gives_same_logits_as_built_model(tiny_ckpts, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from trainers.model import AssembleConfig, _save, build_student

    cfg = AssembleConfig(vision_path=str(tiny_ckpts["vision"]), llm_path=str(tiny_ckpts["llm"]), seed=3)
    model, processor, record = build_student(cfg)
    model.eval()
    inputs = _inputs(processor, n_images=2)
    with torch.no_grad():
        before = model(**inputs).logits
    out = _save(model, processor, tmp_path / "student", record)
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    reproc = AutoProcessor.from_pretrained(out)
    inputs2 = _inputs(reproc, n_images=2)
    assert torch.equal(inputs["input_ids"], inputs2["input_ids"])
    with torch.no_grad():
        after = reloaded(**inputs2).logits
    assert torch.allclose(before, after, atol=1e-6), (before - after).abs().max()
    # The image changes the logits, i.e. the image tokens really go through encoder + projector.
    inputs2["pixel_values"] = torch.zeros_like(inputs2["pixel_values"])
    with torch.no_grad():
        other = reloaded(**inputs2).logits
    assert not torch.allclose(after, other, atol=1e-4)


def test_parts_are_the_source_checkpoints(tiny_ckpts, tiny_student):
    from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

    from trainers.model import load_student

    model, processor = load_student(tiny_student, dtype="float32")
    llm = AutoModelForCausalLM.from_pretrained(tiny_ckpts["llm"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_ckpts["llm"])
    ids = tok("the area of the triangle is 6", return_tensors="pt")["input_ids"]
    assert torch.equal(ids, processor.tokenizer("the area of the triangle is 6", return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=ids).logits, llm(input_ids=ids).logits, atol=1e-6)
        vision = SiglipVisionModel.from_pretrained(tiny_ckpts["vision"], dtype=torch.float32).eval()
        pix = torch.randn(1, 3, 32, 32)
        assert torch.allclose(model.model.vision_tower(pix).last_hidden_state, vision(pix).last_hidden_state)
    # 32px / 8px patches = 16 image tokens per image placeholder, no CLS for SigLIP.
    inputs = _inputs(processor, n_images=1)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"projector_depth": 3}, "exactly 2 linear layers"),
        ({"layout": "llava", "projector_layernorm": True}, "no projector LayerNorm"),
        ({"init": "tiny_random", "vision_path": "x"}, "leave vision_path and llm_path unset"),
        ({"llm_path": None}, "init=pretrained needs llm_path"),
        ({"pixel_shuffle": 1.5, "layout": "internvl"}, "must be in (0, 1]"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    from trainers.model import AssembleConfig

    base = {"vision_path": "v", "llm_path": "l"}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        AssembleConfig(**{**base, **kwargs})


def test_bad_paths_and_layout_errors(tiny_ckpts, tmp_path):
    from trainers.model import AssembleConfig, assemble_student

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        assemble_student(AssembleConfig(vision_path=str(tmp_path / "nope"), llm_path=str(tiny_ckpts["llm"])), tmp_path / "o")
    with pytest.raises(ValueError, match="vision_path is required"):
        assemble_student(AssembleConfig(llm_path=str(tiny_ckpts["llm"])), tmp_path / "o")
    cfg = AssembleConfig(vision_path=str(tiny_ckpts["vision"]), llm_path=str(tiny_ckpts["llm"]), pixel_shuffle=0.5)
    with pytest.raises(ValueError, match="need layout internvl"):
        assemble_student(cfg, tmp_path / "o")
    cfg = AssembleConfig(vision_path=str(tiny_ckpts["vision"]), llm_path=str(tiny_ckpts["llm"]), layout="internvl")
    with pytest.raises(ValueError, match="InternViT-style encoder"):
        assemble_student(cfg, tmp_path / "o")
    cfg = AssembleConfig(vision_path=str(tiny_ckpts["vision"]), llm_path=str(tiny_ckpts["llm"]), image_size=64)
    with pytest.raises(ValueError, match="takes 32x32"):
        assemble_student(cfg, tmp_path / "o")


def test_freeze_policies(tiny_student):
    from trainers.model import apply_freeze, load_student, projector_parameter_names

    model, _ = load_student(tiny_student, dtype="float32")
    proj = projector_parameter_names(model)
    assert proj and all("multi_modal_projector" in n for n in proj)
    assert apply_freeze(model, "projector") == proj
    llm = apply_freeze(model, "projector_llm")
    assert set(proj) < set(llm)
    assert not any("vision_tower" in n for n in llm) and any(n.startswith("lm_head") for n in llm)
    full = apply_freeze(model, "full")
    assert len(full) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="freeze policy 'everything'"):
        apply_freeze(model, "everything")


def test_projector_policy_step_changes_only_projector(tiny_student):
    from trainers.model import apply_freeze, load_student

    model, processor = load_student(tiny_student, dtype="float32")
    trainable = apply_freeze(model, "projector")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = _inputs(processor, n_images=1)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)


def test_lora_injects_in_place_and_merges_to_standard_layout(tiny_student, tmp_path):
    from transformers import AutoModelForImageTextToText

    from trainers.model import apply_freeze, load_student, merge_lora

    model, processor = load_student(tiny_student, dtype="float32")
    n_standard = set(model.state_dict())
    names = apply_freeze(model, "lora", {"r": 4, "alpha": 8, "dropout": 0.0})
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    lora = [n for n in names if "lora_" in n]
    assert lora and all("language_model" in n for n in lora)
    assert not any("vision_tower" in n for n in names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B starts at zero; make the adapter matter
    model.eval()
    inputs = _inputs(processor)
    with torch.no_grad():
        adapted = model(**inputs).logits
    merge_lora(model)
    assert set(model.state_dict()) == n_standard
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, adapted, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, adapted, atol=1e-5)


def test_full_clip_checkpoint_gives_vision_tower_without_cls_token(tiny_ckpts, tmp_path):
    """A dual-encoder CLIP checkpoint: only its vision tower is used, and CLIP's CLS token is dropped."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from trainers.model import AssembleConfig, assemble_student, load_student

    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    out = assemble_student(AssembleConfig(vision_path=str(tmp_path / "clip"), llm_path=str(tiny_ckpts["llm"])),
                           tmp_path / "student")
    model, processor = load_student(out, dtype="float32")
    assert type(model.model.vision_tower).__name__ == "CLIPVisionModel"
    assert model.config.vision_feature_select_strategy == "default"
    sd = clip.vision_model.state_dict()
    tower = model.model.vision_tower.state_dict()
    assert set(tower) == set(sd)
    for k, v in tower.items():
        assert torch.equal(v, sd[k]), k
    inputs = _inputs(processor, n_images=1)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16  # 17 positions minus CLS
    with torch.no_grad():
        assert model.eval()(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_batched_generation_with_image_parts_matches_single(tiny_student):
    """OpenAI/HF-style image parts render through the saved template; left padding keeps batches exact."""
    from pipeline.images import decode
    from trainers.model import load_student

    model, processor = load_student(tiny_student, dtype="float32")
    model.eval()
    assert processor.tokenizer.padding_side == "left"
    convs = [
        [{"role": "user", "content": [{"type": "image", "image": decode(make_image(1))},
                                      {"type": "text", "text": "What is the area?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Is 7 prime? Answer with one word only."}]}],
    ]

    def gen(batch):
        enc = processor.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt", processor_kwargs={"padding": True})
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=5, do_sample=False)
        return out[:, enc["input_ids"].shape[1]:]

    both = gen(convs)
    for i, conv in enumerate(convs):
        assert torch.equal(both[i], gen([conv])[0]), i
