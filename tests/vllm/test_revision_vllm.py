"""`revision` reaches ray.data.llm's CPU stages: the tokenizer and chat template come from that revision.

A hub model id resolved offline from a local HF cache holding two revisions whose chat templates differ
(`main` and `v1`); the processor's chat-template / tokenize / detokenize stages must read `v1`'s files.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own venv (make venv-vllm)")

from teachers.engines import VLLMEngineConfig  # noqa: E402
from teachers.engines.vllm import processor_config, tokenizer_source  # noqa: E402
from teachers.generate import GenerateConfig  # noqa: E402

from .conftest import PARTS_TEMPLATE, build_text_model  # noqa: E402

pytestmark = pytest.mark.vllm


def _cache(tmp_path, r1_model):
    """An HF hub cache with org/tiny at `main` (R1 template) and `v1` (the parts template)."""
    repo = tmp_path / "hub" / "models--org--tiny"
    main_sha, v1_sha = "a" * 40, "b" * 40
    shutil.copytree(r1_model, repo / "snapshots" / main_sha)
    build_text_model(repo / "snapshots" / v1_sha, chat_template=PARTS_TEMPLATE)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(main_sha)
    (repo / "refs" / "v1").write_text(v1_sha)
    return tmp_path / "hub", repo / "snapshots" / v1_sha


def test_revision_reaches_the_tokenizer_stages(tmp_path, r1_model, monkeypatch):
    import huggingface_hub.constants
    from ray.llm._internal.batch.stages.chat_template_stage import ChatTemplateUDF

    hub, v1_dir = _cache(tmp_path, r1_model)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    engine = VLLMEngineConfig(model="org/tiny", revision="v1")
    src = tokenizer_source(engine)
    assert src == str(v1_dir)
    pc = processor_config(GenerateConfig(engine=engine))
    assert pc.chat_template_stage["model_source"] == pc.tokenize_stage["model_source"] == src
    assert pc.detokenize_stage["model_source"] == src
    assert pc.engine_kwargs["revision"] == pc.engine_kwargs["tokenizer_revision"] == "v1"
    assert tokenizer_source(VLLMEngineConfig(model="org/tiny")) == "org/tiny"  # no revision: Ray's own lookup

    udf = ChatTemplateUDF(data_column="__data", expected_input_keys=["messages"], model=src)
    row = {"messages": [{"role": "user", "content": "1+1?"}], udf.IDX_IN_BATCH_COLUMN: 0}

    async def go():
        return [o async for o in udf.udf([row])]

    (out,) = asyncio.run(go())
    assert out["prompt"] == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"  # v1's, not main's


def test_gpus_per_worker_for_vllm():
    from teachers.engines.vllm import check_gpus

    tp2 = VLLMEngineConfig(model="m", tensor_parallel_size=2)
    pc = processor_config(GenerateConfig(engine=tp2, gpus_per_worker=2, cpus_per_worker=3))
    assert pc.placement_group_config["bundles"] == [{"GPU": 1.0, "CPU": 1.5}] * 2
    share = processor_config(GenerateConfig(engine=VLLMEngineConfig(model="m"), gpus_per_worker=0.5))
    assert share.placement_group_config["bundles"] == [{"GPU": 0.5, "CPU": 1.0}]
    assert processor_config(GenerateConfig(engine=tp2)).placement_group_config is None  # Ray's default
    with pytest.raises(ValueError, match="gpus_per_worker=1.0.*set gpus_per_worker to 0 or 2"):
        check_gpus(tp2, 1.0)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="gpus_per_worker=3.0"):  # the config itself refuses it
        GenerateConfig(engine=tp2, gpus_per_worker=3)
