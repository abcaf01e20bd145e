"""The rl stage in configs and in the plan: the production config carries Skywork R1V's GRPO recipe and
validates; the demo plans rl after the last SFT round, followed by its evaluation; bad settings fail at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.errors import PlanError
from pipeline.plan import expand

REPO = Path(__file__).resolve().parents[2]


def test_production_config_carries_the_papers_grpo_recipe(tmp_path):
    cfg = load_config(REPO / "configs" / "r1v-38b.yaml")
    rl = cfg.rl
    # Skywork R1V: GRPO with LR 1e-6, group size 8, temperature 1.0, 8k completion tokens, accuracy + format
    assert (rl.lr, rl.num_generations, rl.temperature, rl.max_completion_tokens) == (1e-6, 8, 1.0, 8192)
    assert rl.rewards.accuracy_weight > 0 and rl.rewards.format_weight > 0
    assert rl.loss_type == "grpo" and rl.zero_std == "buffer"  # R1V2's Selective Sample Buffer
    assert rl.use_vllm and rl.vllm_mode == "colocate" and rl.zero_stage == 3 and rl.launcher == "ray"
    # the SFT rounds before it: T=4, tau 2,3,4,5, LR 1e-4 then 2e-5
    it = cfg.train.iterative
    assert (it.rounds, it.tau, it.lr) == (4, [2.0, 3.0, 4.0, 5.0], [1e-4, 2e-5])
    # with a student to start from, the plan ends with GRPO on the last round's model and its evaluation
    (tmp_path / "vit").mkdir()
    (tmp_path / "llm").mkdir()
    if cfg.assemble is None:
        cfg = load_config(REPO / "configs" / "r1v-38b.yaml",
                          [f"assemble.vision_path={tmp_path / 'vit'}", f"assemble.llm_path={tmp_path / 'llm'}"])
    steps = expand(cfg)
    names = [s.name for s in steps]
    assert names[-2:] == ["rl", "evaluate-rl"]
    # efficient transfer first: the projector aligned on the substitute LLM, re-assembled onto the reasoning one
    by = {s.name: s for s in steps}
    assert by["align"].inputs == {"sft": ["align-data"], "model": ["align-assemble"]}
    assert by["assemble"].inputs == {"student": ["align"]} and by["train"].inputs["model"] == ["assemble"]
    assert "Qwen2.5-32B-Instruct" in cfg.align.substitute.llm_path and "R1-Distill" in cfg.assemble.llm_path
    assert (cfg.align.lr, cfg.align.warmup_ratio, cfg.align.data.max_len) == (2e-4, 0.03, 16384)
    assert cfg.assemble.layout == "internvl" and cfg.assemble.pixel_shuffle == 0.5
    # every phase's student scored on one held-out set, k samples each
    assert cfg.evaluate.eval_set is not None and cfg.evaluate.eval_set.samples == 8
    rl_step, ev = steps[-2], steps[-1]
    assert rl_step.inputs["model"] == ["train-t4"] and rl_step.inputs["problems"]
    assert ev.inputs["model"] == ["rl"]


def test_demo_plans_rl_after_the_sft_rounds():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    steps = {s.name: s for s in expand(cfg)}
    names = list(steps)
    assert names[-2:] == ["rl", "evaluate-rl"] and names.index("rl") > names.index("evaluate-t2")
    assert steps["rl"].inputs["model"] == ["train-t2"] and steps["rl"].inputs["problems"] == [names[3]]
    assert steps["rl"].phase == "rl"


def test_rl_without_a_student_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: {name: x}\ningest: {sources: [{kind: synthetic}]}\nrl: {}\n")
    with pytest.raises(PlanError, match="rl: no student"):
        expand(load_config(cfg))


@pytest.mark.parametrize(("override", "needle"), [
    ("rl.per_device_batch=6", "not a multiple of num_generations"),
    ("rl.zero_std=drop", "rl.zero_std"),
    ("rl.loss_type=ppo", "rl.loss_type"),
    ("rl.freeze=lora", "lora is not supported"),
    ("rl.vllm_mode=server", "vllm_server_base_url"),
    ("rl.rewards.lenght={weight: 1}", "rl.rewards.lenght"),
])
def test_bad_rl_settings_fail_at_load_naming_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(REPO / "configs" / "demo.yaml", [override, "rl.use_vllm=true"] if "vllm_mode" in override
                    else [override])
