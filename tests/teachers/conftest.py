"""Teacher test fixtures: synthetic problem tables, stage contexts, a tiny HF chat model, a fault server."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest

from pipeline.rundir import PROGRESS, ShardWriter, atomic_write_json, stable_hash
from pipeline.runner import StageContext
from pipeline.schema import PROBLEMS, extend
from pipeline.synthetic import make_problem

ASSESSED = extend(
    PROBLEMS,
    pa.field("repetition_penalty", pa.float64()),
    pa.field("max_tokens", pa.int64()),
    pa.field("image_description", pa.string()),
)


def synthetic_problems(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        p = make_problem(seed, i)
        p["problem_id"] = stable_hash(p["question"], p["answer"], p["id"])
        p["source"] = "synthetic"
        p["source_ref"] = p.pop("id")
        p.pop("kind", None)
        rows.append(p)
    return rows


def write_problems(directory: Path, rows: list[dict[str, Any]], schema: pa.Schema = ASSESSED) -> Path:
    with ShardWriter(directory, schema, "problems") as w:
        w.write(pa.Table.from_pylist(rows, schema=schema))
    return directory


def make_ctx(run_dir: Path, step: str = "generate", round_: int = 0, inputs: dict | None = None,
             resume: bool = False, seed: int = 0, stage: str = "generate") -> StageContext:
    """A StageContext as the runner builds it (run root = run_dir.parent)."""
    run_cfg = SimpleNamespace(run=SimpleNamespace(seed=seed, root=str(run_dir.parent), name=run_dir.name))
    out = run_dir / step
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / PROGRESS, {"fingerprint": "test"})
    return StageContext(run_dir=run_dir, step=step, stage=stage, round=round_, out_dir=out,
                        inputs=inputs or {"problems": [run_dir / "ingest"]}, run_config=run_cfg,
                        fingerprint="test", resume=resume)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    d = tmp_path / "runs" / "t"
    d.mkdir(parents=True)
    return d


@pytest.fixture
def problems12(run_dir) -> list[dict[str, Any]]:
    rows = synthetic_problems(12)
    write_problems(run_dir / "ingest", rows)
    return rows


def chains_by_id(directory: Path) -> dict[str, dict[str, Any]]:
    from pipeline.rundir import read_table

    rows = read_table(directory).to_pylist()
    out = {r["chain_id"]: r for r in rows}
    assert len(out) == len(rows), "duplicate chain ids"
    return out


def strip_timing(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "latency_s"}


def dumps(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=str)


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def build_tiny_chat_model(directory: Path, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                          chat_template: str = CHAT_TEMPLATE) -> Path:
    """A small Qwen2 (default: 2 layers, hidden 64) with a BPE tokenizer trained here, saved with save_pretrained.

    vLLM's CPU attention needs heads of 64: `hidden=128, heads=2`.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    corpus = [p["question"] + " The answer is " + p["answer"] for p in synthetic_problems(40)]
    corpus += ["Please reason step by step, and put your final answer within \\boxed{}. Wait, let me re-check."] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens(["<think>", "</think>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>", chat_template=chat_template)
    fast.save_pretrained(directory)
    cfg = Qwen2Config(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=min(2, heads), max_position_embeddings=2048,
                      pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for in-process generation: two spinning OpenMP threads on a shared 2-core
    box stall for seconds whenever another process takes a core. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
