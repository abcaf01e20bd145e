"""Engine settings that change the generated text are part of the cache key; placement is not."""

from __future__ import annotations

from teachers.engines import HFEngineConfig, VLLMEngineConfig


def test_vllm_identity_covers_quantization_context_and_images():
    base = VLLMEngineConfig(model="m").cache_identity()
    assert VLLMEngineConfig(model="m", engine_kwargs={"quantization": "fp8"}).cache_identity() != base
    assert VLLMEngineConfig(model="m", max_model_len=8192).cache_identity() != base
    assert VLLMEngineConfig(model="m", multimodal=True).cache_identity() != base
    assert VLLMEngineConfig(model="m", gpu_memory_utilization=0.5).cache_identity() == base


def test_hf_identity_covers_multimodal_but_not_batch_size():
    base = HFEngineConfig(model="m").cache_identity()
    assert HFEngineConfig(model="m", multimodal=True).cache_identity() != base
    assert HFEngineConfig(model="m", batch_size=32).cache_identity() == base
