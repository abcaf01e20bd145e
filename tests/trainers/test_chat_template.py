"""The student speaks its reasoning LLM's own chat template: assembled from LLMs whose tokenizers (trained
here) carry different templates, the SFT text, its loss mask, the evaluate prompt and the RL prompt all
come from that template, with the image placeholder where the template puts the user's content.

Run: .venv/bin/pytest -q tests/trainers/test_chat_template.py
"""

from __future__ import annotations

import pytest

from trainers.tiny import TINY_CHAT_TEMPLATE

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
# A template that only understands content parts (as multimodal-era templates do).
PARTS = (
    "{% for message in messages %}[{{ message['role'] }}]{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
# DeepSeek-R1-Distill's shape: system text first, the think part cut out of assistant turns, and a
# generation prompt that pre-fills `<think>\n`.
R1 = (
    "{% set ns = namespace(system='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.system = m['content'] %}{% endif %}{% endfor %}{{ bos_token }}{{ ns.system }}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|User|>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<|Assistant|>' + c + '<|end_of_sentence|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|Assistant|><think>\n' }}{% endif %}"
)
R1_SPECIALS = ["<|end_of_sentence|>", "<|begin_of_sentence|>", "<|User|>", "<|Assistant|>"]

TEMPLATES = {
    "qwen2": (TINY_CHAT_TEMPLATE, None, "<|im_end|>"),
    "llama3": (LLAMA3, LLAMA3_SPECIALS, "<|eot_id|>"),
    "parts": (PARTS, None, "<|im_end|>"),
    "r1": (R1, R1_SPECIALS, "<|end_of_sentence|>"),
    "none": (None, None, "<|im_end|>"),
}


@pytest.fixture(scope="module")
def students(tiny_ckpts, tmp_path_factory):
    """One student per LLM template: {name: (student dir, llm dir)}."""
    from trainers.model import AssembleConfig, assemble_student
    from trainers.tiny import build_tiny_llm

    root = tmp_path_factory.mktemp("templates")
    out = {}
    for name, (tpl, specials, _eot) in TEMPLATES.items():
        llm = build_tiny_llm(root / f"llm-{name}", seed=0, chat_template=tpl, specials=specials)
        cfg = AssembleConfig(vision_path=str(tiny_ckpts["vision"]), llm_path=str(llm))
        out[name] = (assemble_student(cfg, root / f"student-{name}"), llm)
    return out


def _problem(n_images: int = 1) -> dict:
    from tests.trainers.conftest import make_image

    return {"problem_id": "p1", "question": "What is the area of the triangle?", "answer": "6",
            "images": [make_image(k) for k in range(n_images)], "choices": None}


def _own_render(name: str, llm_dir, messages: list[dict], generation_prompt: bool) -> str:
    """The LLM's own template on string messages (parts for the parts-only template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_dir)
    if name == "parts":
        messages = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("name", [n for n in TEMPLATES if n != "none"])
def test_the_prompt_is_the_llms_own_template_with_the_placeholder_in_the_user_content(students, name):
    from trainers.chat import prompt_messages, student_prompt
    from trainers.evaluate import messages as engine_messages
    from trainers.model import load_student

    student, llm = students[name]
    _, processor = load_student(student, dtype="float32")
    p = _problem(2)
    prompt = student_prompt(p, processor)
    # exactly what the LLM's template writes, the image placeholders inside the user's text
    assert prompt == _own_render(name, llm, prompt_messages(p), True)
    assert prompt.count("<image>") == 2 and "<image>\n<image>\nWhat is the area" in prompt
    # the engines' OpenAI-style messages (image parts) render to the same text: evaluate prompts like SFT
    eng = engine_messages(p, prompt_messages(p)[0]["content"])
    parts = [{"type": "image"} if x["type"] == "image_url" else x for x in eng[1]["content"]]
    assert processor.apply_chat_template([eng[0], {"role": "user", "content": parts}], tokenize=False,
                                         add_generation_prompt=True) == prompt


def test_a_tokenizer_without_a_template_falls_back_to_chatml(students):
    import json

    from trainers.chat import student_prompt
    from trainers.model import ASSEMBLY_FILE, load_student

    student, _ = students["none"]
    _, processor = load_student(student, dtype="float32")
    assert student_prompt(_problem(), processor).endswith("<|im_start|>assistant\n")
    assert json.loads((student / ASSEMBLY_FILE).read_text())["chat_template"] == "fallback:chatml_think"
    assert json.loads((students["llama3"][0] / ASSEMBLY_FILE).read_text())["chat_template"] == "llm:string"
    assert json.loads((students["parts"][0] / ASSEMBLY_FILE).read_text())["chat_template"] == "llm:parts"


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_loss_mask_covers_exactly_the_assistant_turn(students, name):
    """Labels decode to the assistant's text and the template's end-of-turn token, nothing else; the
    tokens before them are the inference prompt's tokens; <think> weights fall on the reasoning."""
    from trainers.chat import student_prompt
    from trainers.data import SFTDataConfig, SFTDataset, prompt_inputs
    from trainers.model import load_student

    student, _ = students[name]
    _, processor = load_student(student, dtype="float32")
    tok = processor.tokenizer
    p = _problem(1)
    system = "Think, then answer."
    answer = "<think>\nThe base is 3 and the height is 4.\n</think>\n\nThe area is $\\boxed{6}$."
    rows = [{"sample_id": "s0", "messages": [{"role": "system", "content": system},
                                              {"role": "user", "content": "<image>\n" + p["question"]},
                                              {"role": "assistant", "content": answer}],
             "images": p["images"]}]
    ds = SFTDataset(_table(rows), processor, SFTDataConfig(think_weight=0.5))
    assert len(ds) == 1 and not ds.dropped
    item = ds[0]
    labels = item["labels"][item["labels"] != -100].tolist()
    eot = TEMPLATES[name][2]
    trained = tok.decode(labels, skip_special_tokens=False)
    if name == "r1":  # the generation prompt pre-filled "<think>\n": the student continues from there
        assert trained == answer[len("<think>\n"):] + eot
    else:
        assert trained == answer + eot
    # everything before the trained tokens is the prompt the student gets at inference
    prompt_ids = prompt_inputs(processor, rows[0]["messages"][:2], p["images"])["input_ids"][0].tolist()
    first = int((item["labels"] != -100).nonzero()[0])
    assert item["input_ids"][:first].tolist() == prompt_ids
    assert student_prompt(p, processor, system).count("<image>") == 1
    # think weights: reasoning tokens at 0.5, the answer after </think> at 1.0
    w = item["loss_weights"][item["labels"] != -100].tolist()
    assert 0.5 in w and w[-1] == 1.0 and w[0] == 0.5


def _table(rows: list[dict]):
    import pyarrow as pa

    from pipeline.schema import SFT

    full = [{**{k: None for k in SFT.names}, **r} for r in rows]
    return pa.Table.from_pylist(full, schema=SFT)


def test_a_default_system_prompt_is_in_training_and_inference_alike(students):
    """Qwen2's template adds "You are a helpful assistant." when a conversation has no system turn:
    the training text of such a row and the prompt for it agree."""
    from trainers.chat import conversation, student_prompt
    from trainers.model import load_student

    _, processor = load_student(students["qwen2"][0], dtype="float32")
    p = _problem(1)
    msgs = [{"role": "user", "content": "<image>\n" + p["question"]}, {"role": "assistant", "content": "6"}]
    text, turns, _ = conversation(
        lambda m, g: processor.apply_chat_template(m, tokenize=False, add_generation_prompt=g), msgs)
    prompt = student_prompt(p, processor, system="")
    assert "You are a helpful assistant." in prompt and text.startswith(prompt)
    assert text[turns[-1][0]:turns[-1][1]] == "6<|im_end|>"


def test_the_template_is_fingerprinted_by_content(tmp_path):
    from trainers.assemble import fingerprint_extra
    from trainers.model import AssembleConfig
    from trainers.tiny import train_tokenizer

    llm = tmp_path / "llm"
    train_tokenizer(llm, chat_template=TINY_CHAT_TEMPLATE)
    (llm / "config.json").write_text("{}")
    cfg = AssembleConfig(vision_path=str(tmp_path), llm_path=str(llm))
    before = fingerprint_extra(cfg)["chat_template"]
    train_tokenizer(llm, chat_template=LLAMA3)
    assert fingerprint_extra(cfg)["chat_template"] != before
    # same content written again: same fingerprint (not a file stamp)
    again = fingerprint_extra(cfg)["chat_template"]
    train_tokenizer(llm, chat_template=LLAMA3)
    assert fingerprint_extra(cfg)["chat_template"] == again
    assert fingerprint_extra(cfg.model_copy(update={"chat_template": "chatml_think"}))["chat_template"] != again


def test_reassembly_takes_the_reasoning_llms_template(students, tmp_path):
    """Aligned with one LLM (Qwen2 template), re-assembled onto the reasoning LLM (R1 template): the student
    now prompts with the R1 template."""
    from trainers.chat import student_prompt
    from trainers.model import load_student, reassemble

    out = reassemble(students["qwen2"][0], students["r1"][1], tmp_path / "re")
    _, processor = load_student(out, dtype="float32")
    assert student_prompt(_problem(), processor).endswith("<|Assistant|><think>\n")


def test_a_template_that_ignores_content_is_refused(tiny_ckpts, tmp_path):
    from trainers.chat import TemplateError
    from trainers.model import AssembleConfig, assemble_student
    from trainers.tiny import build_tiny_llm

    llm = build_tiny_llm(tmp_path / "llm", chat_template="{{ 'hello' }}")
    with pytest.raises(TemplateError, match="neither string nor text-part content"):
        assemble_student(AssembleConfig(vision_path=str(tiny_ckpts["vision"]), llm_path=str(llm)), tmp_path / "s")


def test_training_from_a_checkpoint_fingerprints_its_template(tmp_path):
    """Without an assemble step (train.init_from), the checkpoint's saved template joins train's fingerprint."""
    from trainers.train import TrainConfig, fingerprint_extra

    ck = tmp_path / "ckpt"
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    (ck / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE)
    cfg = TrainConfig(init_from=str(ck))
    before = fingerprint_extra(cfg)["chat_template"]
    (ck / "chat_template.jinja").write_text(LLAMA3)
    assert fingerprint_extra(cfg)["chat_template"] != before


def test_history_turns_and_a_template_that_drops_the_answer(tmp_path):
    """Earlier assistant turns are trained where the template renders history as a prefix of the prompt;
    a template that never writes the assistant's content cannot train anything: the row is refused."""
    from trainers.chat import conversation
    from trainers.tiny import train_tokenizer

    tok = train_tokenizer(tmp_path / "tok")

    def render(m, g):
        return tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g)

    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>r</think>d"}]
    text, turns, thinks = conversation(render, msgs)
    assert [text[a:b] for a, b in turns] == ["b<|im_end|>", "<think>r</think>d<|im_end|>"]
    assert [text[a:b] for a, b in thinks] == ["<think>r</think>"]
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="drops the assistant turn's content"):
        conversation(render, msgs[:2])
