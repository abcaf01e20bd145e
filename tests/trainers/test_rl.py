"""The `rl` stage's GRPO worker on the tiny student (CPU): it learns the format reward, a pathological answer
times out inside a reward call while the step goes on, zero-advantage groups are counted and skipped or
replayed, a SIGKILLed run resumes with its log continuing at the checkpoint's step, torchrun ranks agree.

Run: .venv/bin/pytest -q tests/trainers/test_rl.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.rundir import ShardWriter
from pipeline.synthetic import make_problem
from trainers.rl import RL_PROBLEMS, RLConfig, RLWorkerSpec

REPO = Path(__file__).resolve().parents[2]
SYSTEM = "Think inside <think> and </think>, then give the final answer in \\boxed{}."


@pytest.fixture(scope="module")
def problems_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rl_problems")
    rows = []
    for i in range(8):
        p = make_problem(0, i)
        rows.append({**{k: p.get(k) for k in RL_PROBLEMS.names}, "problem_id": p["id"], "max_tokens": None})
    with ShardWriter(d, RL_PROBLEMS, "problems") as w:
        w.write(rows)
    return d


def _spec(student: Path, problems: Path, out: Path, **over) -> RLWorkerSpec:
    base = dict(lr=5e-3, num_generations=4, per_device_batch=8, max_completion_tokens=24, max_steps=30,
                save_every=10, gradient_checkpointing=False, tensorboard=False,
                rewards={"workers": 1, "length": {"weight": 0.0}})
    base.update(over)
    return RLWorkerSpec(model_dir=str(student), problems_dir=str(problems), out_dir=str(out),
                        cfg=RLConfig(**base).model_dump(mode="json"), system_prompt=SYSTEM, seed=0)


def _steps(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines() if x.strip()]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# ~15 s each on an idle 2-core machine; the buffer variant runs with the slow tests
@pytest.mark.parametrize("zero_std", ["skip", pytest.param("buffer", marks=pytest.mark.slow)])
def test_grpo_learns_the_format_reward(tiny_student, problems_dir, tmp_path, zero_std):
    """30 steps with a fixed seed: the format reward's mean over the last 10 steps clearly above the first 10."""
    from trainers.model import load_student
    from trainers.rl_worker import launch

    out = tmp_path / "rl"
    res = launch(_spec(tiny_student, problems_dir, out, zero_std=zero_std))
    rows = _steps(out)
    assert [r["step"] for r in rows] == list(range(1, 31)) and res["steps"] == 30
    fmt = [r["format_mean"] for r in rows]
    first, last = _mean(fmt[:10]), _mean(fmt[-10:])
    assert last > first + 0.15, (first, last, fmt)
    for r in rows:  # one row per step with every figure the log promises
        for k in ("reward", "reward_std", "accuracy_mean", "accuracy_std", "format_std", "clip_ratio",
                  "completion_len", "tok_s", "gen_s", "reward_s", "update_s"):
            assert r[k] is not None, (k, r)
        assert r["groups"] == 2 and 0 <= r["zero_std_groups"] <= 2
    assert any(r["kl"] for r in rows)  # beta 0.04: the KL to the initial model is measured and grows
    assert sum(r["zero_std_groups"] for r in rows) > 0  # a random start: many groups all equal (no advantage)
    if zero_std == "skip":
        assert all(r["replayed_rows"] == 0 for r in rows)
        assert sum(r["skipped_rows"] for r in rows) == 4 * sum(r["zero_std_groups"] for r in rows)
    else:
        assert sum(r["replayed_rows"] for r in rows) > 0
    model, processor = load_student(out / "model")  # the standard layout, as train exports it
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.tokenizer.padding_side == load_student(tiny_student)[1].tokenizer.padding_side


def test_pathological_answer_times_out_inside_a_reward_call_and_the_step_goes_on(tiny_student, problems_dir,
                                                                                 tmp_path):
    """The accuracy reward of a real training step sees one answer sympy never finishes: it scores 0 after
    the verifier's deadline, the other completions are graded, and training goes on to the next step."""
    from tests.trainers.test_rewards import tower
    from trainers.rl import RLWorkerSpec
    from trainers.rl_worker import build_trainer

    spec = RLWorkerSpec.model_validate(_spec(tiny_student, problems_dir, tmp_path / "rl", max_steps=2,
                                             rewards={"workers": 1, "verify": {"timeout_s": 1.5}}).model_dump())
    trainer, funcs, _ = build_trainer(spec)
    acc = funcs[0]
    tok = trainer.processing_class.tokenizer
    bad = tok(f"<think>x</think>$\\boxed{{{tower(2_000)}}}$", add_special_tokens=False)["input_ids"]
    seen = {}

    class Pathological:
        """The first completion of each call replaced by the tower; the others as generated."""

        __name__ = "accuracy"

        def __call__(self, prompts, completions, completion_ids, **kw):
            t0 = time.monotonic()
            out = acc(prompts, completions, [bad] + list(completion_ids[1:]), **kw)
            seen.setdefault("seconds", []).append(time.monotonic() - t0)
            return out

    trainer.reward_funcs[0] = Pathological()
    try:
        trainer.train()
    finally:
        acc.close()
    rows = _steps(tmp_path / "rl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["accuracy_timeouts"] == 1 for r in rows)
    assert acc.verdicts["timeout"] == 2
    assert max(seen["seconds"]) < 1.5 + 5.0


def test_sigkill_after_a_checkpoint_resumes_with_the_log_at_the_same_step(tiny_student, problems_dir, tmp_path):
    out = tmp_path / "rl"
    spec = _spec(tiny_student, problems_dir, out, max_steps=24, save_every=4)
    out.mkdir()
    (out / "spec.json").write_text(spec.model_dump_json())
    cmd = [sys.executable, "-m", "trainers.rl_worker", str(out / "spec.json")]
    from trainers.launch import _clean_env

    # as the launchers start a child: without the one-rank group variables an in-process train left behind
    env = dict(_clean_env(), R1V_PROGRESS="0")
    err = tmp_path / "worker.err"
    with err.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=fh)
    deadline = time.time() + 600
    ckpt = out / "checkpoints" / "checkpoint-8" / "trainer_state.json"
    while not (ckpt.exists() and (out / "steps.jsonl").exists() and len(_steps(out)) >= 10):
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before it could be killed: " + \
            err.read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _steps(out)
    assert 10 <= len(before) < 24 and not (out / "result.json").exists()

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    resumed = int(Path(result["resumed_from"]).name.split("-")[1])
    assert resumed >= 8 and resumed % 4 == 0
    rows = _steps(out)
    assert [r["step"] for r in rows] == list(range(1, 25))  # continues at the checkpoint's step, no duplicates
    assert rows[:resumed] == before[:resumed]  # the rows up to the checkpoint are the killed run's own
    assert (out / "model" / "config.json").exists()


def test_torchrun_two_ranks(tiny_student, problems_dir, tmp_path):
    """Two gloo ranks: groups span the ranks (rewards gathered), one log, one exported model."""
    from trainers.rl_worker import launch

    out = tmp_path / "rl"
    res = launch(_spec(tiny_student, problems_dir, out, max_steps=3, per_device_batch=4), "torchrun", 2)
    assert res["world_size"] == 2 and res["steps"] == 3
    rows = _steps(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["groups"] == 2 for r in rows)
    assert (out / "model" / "model.safetensors").exists()


def test_selective_sample_buffer_rows_round_trip():
    """Rows split from a batch and joined again give the batch back (padding, per-token tensors, images)."""
    import torch

    from trainers.grpo import join_rows, split_rows

    pad = 0
    batch = {
        "prompt_ids": torch.tensor([[pad, 5, 6], [7, 8, 9]]), "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
        "completion_ids": torch.tensor([[1, 2, pad, pad], [3, 4, 5, 6]]),
        "completion_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]),
        "old_per_token_logps": torch.tensor([[-1.0, -2.0, 0.0, 0.0], [-3.0, -4.0, -5.0, -6.0]]),
        "advantages": torch.tensor([0.5, -0.5]), "num_items_in_batch": torch.tensor(6),
        "pixel_values": torch.arange(3 * 2 * 2, dtype=torch.float32).view(3, 1, 2, 2), "num_images": [1, 2],
    }
    rows = split_rows(batch)
    assert rows[0]["completion_ids"].tolist() == [1, 2] and rows[1]["pixel_values"].shape[0] == 2
    back = join_rows(rows, batch, pad, "cpu")
    for k, v in batch.items():
        assert (back[k] == v).all() if hasattr(v, "shape") else back[k] == v, k
    swapped = join_rows([rows[1], rows[1]], batch, pad, "cpu")
    assert swapped["pixel_values"].shape[0] == 4 and swapped["num_images"] == [2, 2]
    assert swapped["advantages"].tolist() == [-0.5, -0.5]


def test_deepspeed_zero3_through_accelerate_and_the_export(tiny_student, problems_dir, tmp_path):
    """ZeRO-3 in one process: the gathered export holds the trained LLM + projector, the frozen encoder as it was,
    under the student's own weight names; a model loaded afterwards in this process is whole again."""
    from safetensors.torch import load_file

    from trainers.model import load_student
    from trainers.rl_worker import launch

    out = tmp_path / "rl"
    launch(_spec(tiny_student, problems_dir, out, max_steps=12, zero_stage=3))
    rows = _steps(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert sum(r["zero_std_groups"] for r in rows) < sum(r["groups"] for r in rows)  # some steps had advantage
    trained = load_file(out / "model" / "model.safetensors")
    start = load_file(Path(tiny_student) / "model.safetensors")
    assert trained.keys() == start.keys()  # the student's own weight names
    changed = {k for k in start if not (trained[k] == start[k]).all()}
    assert any("multi_modal_projector" in k for k in changed) and any("language_model" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)
    model = load_student(out / "model")[0]  # not partitioned by a ZeRO-3 setting left behind
    assert all(p.numel() > 0 for p in model.parameters())


@pytest.mark.slow
def test_ray_train_two_workers(tiny_student, problems_dir, tmp_path, ray_local):
    from trainers.rl_worker import launch

    out = tmp_path / "rl"
    res = launch(_spec(tiny_student, problems_dir, out, max_steps=3), "ray", 2)
    assert res["world_size"] == 2 and res["steps"] == 3
    rows = _steps(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["groups"] == 4 for r in rows)
    assert (out / "model" / "model.safetensors").exists()
