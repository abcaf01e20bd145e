"""Re-assembly: the projector moves to a matching reasoning LLM; mismatches fail with a clear message."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def other_llms(tmp_path_factory):
    from trainers.tiny import build_tiny_llm

    root = tmp_path_factory.mktemp("llms")
    return {
        "match": build_tiny_llm(root / "match", seed=11),
        "llama": build_tiny_llm(root / "llama", seed=11, arch="llama"),
        "hidden": build_tiny_llm(root / "hidden", seed=11, hidden_size=96),
        "rows": build_tiny_llm(root / "rows", seed=11, vocab_rows=640),
        "tokens": build_tiny_llm(root / "tokens", seed=11, corpus_salt=7),
    }


def test_reassemble_keeps_projector_and_takes_new_llm(tiny_student, other_llms, tmp_path):
    from transformers import AutoModelForCausalLM

    from trainers.model import load_student, reassemble

    student, _ = load_student(tiny_student, dtype="float32")
    with torch.no_grad():  # perturb the projector as alignment would, so "kept" is a real check
        for p in student.model.multi_modal_projector.parameters():
            p.add_(0.5)
    aligned = tmp_path / "aligned"
    student.save_pretrained(aligned)
    for f in tiny_student.iterdir():
        if not (aligned / f.name).exists():
            (aligned / f.name).write_bytes(f.read_bytes())
    out = reassemble(aligned, other_llms["match"], tmp_path / "reasoner")
    new, processor = load_student(out, dtype="float32")
    for (n, a), (_, b) in zip(
        student.model.multi_modal_projector.state_dict().items(),
        new.model.multi_modal_projector.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(a, b), n
    for (n, a), (_, b) in zip(
        student.model.vision_tower.state_dict().items(), new.model.vision_tower.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), n
    llm = AutoModelForCausalLM.from_pretrained(other_llms["match"], dtype=torch.float32).eval()
    ids = processor.tokenizer("so the area is 6", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(new.eval()(input_ids=ids).logits, llm(input_ids=ids).logits, atol=1e-6)
        assert not torch.allclose(student.eval()(input_ids=ids).logits, llm(input_ids=ids).logits, atol=1e-3)
    record = json.loads((out / "r1v_assembly.json").read_text())
    assert [h["op"] for h in record["history"]] == ["assemble", "reassemble"]
    assert record["llm_path"] == str(other_llms["match"])


@pytest.mark.parametrize(
    "which, message",
    [
        ("llama", r"architecture mismatch: the student's LLM is 'qwen2', the new LLM is 'llama'"),
        ("hidden", r"hidden size mismatch: the projector outputs 64-d embeddings, the new LLM expects 96-d"),
        ("rows", r"vocabulary mismatch: the new LLM has 640 embedding rows"),
        ("tokens", r"vocabulary mismatch: \d+ of \d+ base tokens differ"),
    ],
)
def test_reassemble_refuses_mismatched_llm(tiny_student, other_llms, tmp_path, which, message):
    from trainers.model import ReassemblyError, reassemble

    with pytest.raises(ReassemblyError, match=message) as err:
        reassemble(tiny_student, other_llms[which], tmp_path / "out")
    assert str(other_llms[which]) in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_reassemble_names_missing_checkpoint(tiny_student, tmp_path):
    from trainers.model import reassemble

    with pytest.raises(FileNotFoundError, match="no config.json"):
        reassemble(tiny_student, tmp_path / "missing", tmp_path / "out")
