"""Launchers: run the SFT worker in this process, under `torchrun`, or on Ray Train's TorchTrainer.

    python -m trainers.launch SPEC.json           # what each torchrun rank runs

`WorkerSpec` says everything a rank needs (student dir, SFT shard dirs, freeze policy, data and loop
configs, seed, output dir) as JSON, so the same worker runs under every launcher:

- `local`: one process, this one (CPU tests, one GPU). Starts a one-rank process group itself.
- `torchrun`: `torchrun --standalone --nproc_per_node N -m trainers.launch SPEC.json`; on CPU the ranks
  use gloo, on GPUs nccl. Multi-node (`Rendezvous`: train.nnodes, train.rdzv_endpoint): the stage runs
  `torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:PORT --rdzv_id ID
  -m trainers.launch SPEC.json` on its own node and logs that command for the other M-1 nodes (the spec
  and the step directory sit on storage every node sees).
- `ray`: `TorchTrainer(train_loop_per_worker, ScalingConfig(num_workers=N, use_gpu=...),
  TorchConfig(backend=gloo|nccl))` on the connected Ray cluster, so a pipeline started with
  `ray job submit -- r1v run CONFIG` trains on the cluster's workers. The storage path is inside the
  step directory, which must be on storage all nodes share.

Rank 0 writes `<out>/result.json` (steps, losses, throughput, dataset drops); the launcher returns it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

RESULT = "result.json"
LAUNCHERS = ("local", "torchrun", "ray")


class WorkerSpec(BaseModel):
    """Everything one training rank needs, as plain JSON."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_dir: str = Field(description="student checkpoint to start from (AutoModelForImageTextToText layout)")
    sft_dirs: list[str] = Field(description="SFT shard directories to train on")
    out_dir: str = Field(description="where checkpoints, logs and the exported model go")
    freeze: Literal["projector", "projector_llm", "lora", "full"] = "projector_llm"
    lora: dict[str, Any] | None = None
    data: dict[str, Any] = Field(default_factory=dict, description="trainers.data.SFTDataConfig fields")
    loop: dict[str, Any] = Field(default_factory=dict, description="trainers.loop.LoopConfig fields")
    seed: int = 0
    dtype: str | None = Field(None, description="load dtype; None = float32 (DeepSpeed casts to bf16 itself)")


def train_worker(spec: dict | WorkerSpec) -> dict:
    """One rank: load the student, freeze, build the data, run the loop, return the result summary."""
    from pipeline.logging import setup_logging
    from trainers.data import SFTDataConfig, make_sft_data
    from trainers.loop import LoopConfig, LoopData, train_loop
    from trainers.model import apply_freeze, load_student

    spec = WorkerSpec.model_validate(spec) if isinstance(spec, dict) else spec
    setup_logging()
    model, processor = load_student(spec.model_dir, dtype=spec.dtype or "float32")
    trainable = apply_freeze(model, spec.freeze, spec.lora if spec.freeze == "lora" else None)
    data_cfg = SFTDataConfig.model_validate(spec.data)
    dataset, collate = make_sft_data(spec.sft_dirs, processor, data_cfg)
    base = getattr(dataset, "base", dataset)
    res = train_loop(
        model, LoopData(dataset, collate, processor), LoopConfig.model_validate(spec.loop), Path(spec.out_dir), spec.seed
    )
    summary = {
        "steps": res.steps,
        "losses": res.losses,
        "samples_seen": res.samples_seen,
        "items": len(dataset),
        "samples": len(base),
        "dropped": dict(getattr(base, "dropped", {})),
        "trainable_params": len(trainable),
        "model_dir": str(res.model_dir),
        **res.metrics,
    }
    import torch.distributed as dist

    if dist.get_rank() == 0:
        from pipeline.rundir import atomic_write_json

        atomic_write_json(Path(spec.out_dir) / RESULT, summary)
    return summary


def _ray_worker(config: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    for k, v in config.get("env", {}).items():  # the driver's quiet settings (no per-rank progress bars)
        os.environ.setdefault(k, v)
    train_worker(config["spec"])


class Rendezvous(BaseModel):
    """torchrun's c10d rendezvous for a run over several nodes."""

    model_config = ConfigDict(extra="forbid")

    nnodes: int = Field(ge=1, description="nodes taking part; each runs nproc ranks")
    endpoint: str = Field(description="HOST:PORT every node reaches (the c10d store runs there)")
    id: str = Field("r1v-train", description="job id: the same on every node, new for each run")


def torchrun_command(spec_path: Path, nproc: int, rdzv: Rendezvous | None = None,
                     module: str = "trainers.launch") -> list[str]:
    """The torchrun command line for one node (every node runs the same one under a rendezvous)."""
    if rdzv is None:
        # --standalone: torchrun's own rendezvous binds a port the OS picks, so no other process can take
        # it between choosing and binding
        head = ["--standalone"]
    else:
        head = [f"--nnodes={rdzv.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv.endpoint}",
                f"--rdzv_id={rdzv.id}"]
    return [sys.executable, "-m", "torch.distributed.run", *head, f"--nproc_per_node={nproc}",
            "-m", module, str(spec_path)]


def run_torchrun(cmd: list[str], spec_path: Path) -> None:
    """Run a torchrun command line from the project root, in a clean environment (no one-rank group
    variables of this process, one OMP thread per rank unless set, the project on PYTHONPATH)."""
    log.info("launching: %s", " ".join(cmd))
    env = _clean_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, env=env, cwd=repo)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with {proc.returncode} (logs above; spec {spec_path})")


def _clean_env() -> dict[str, str]:
    """This process's environment minus a one-rank group's variables (a child must not reuse its port)."""
    env = dict(os.environ)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return env


def launch(spec: WorkerSpec, launcher: str = "local", nproc: int = 1, use_gpu: bool | None = None,
           rdzv: Rendezvous | None = None) -> dict:
    """Run `spec` with the chosen launcher; returns rank 0's result summary. `rdzv` (torchrun only): this
    node's part of a multi-node run; the other nodes run the logged command."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"train.launcher={launcher!r}: expected one of {LAUNCHERS}")
    if rdzv is not None and launcher != "torchrun":
        raise ValueError(f"train.nnodes / train.rdzv_endpoint need train.launcher=torchrun, not {launcher!r} "
                         "(Ray Train places its workers on the cluster's nodes itself)")
    # Absolute paths: torchrun ranks start in the repo and Ray Train workers in their own directory.
    spec = spec.model_copy(update={
        "model_dir": str(Path(spec.model_dir).resolve()),
        "sft_dirs": [str(Path(d).resolve()) for d in spec.sft_dirs],
        "out_dir": str(Path(spec.out_dir).resolve()),
    })
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "worker_spec.json"
    spec_path.write_text(spec.model_dump_json(indent=2))
    if launcher == "local":
        if nproc != 1:
            raise ValueError(f"train.launcher=local runs one process, got train.nproc={nproc}: use torchrun or ray")
        return train_worker(spec)
    if launcher == "torchrun":
        cmd = torchrun_command(spec_path, nproc, rdzv)
        if rdzv is not None and rdzv.nnodes > 1:
            log.warning("train: waiting for %d more node(s); on each, from the project root, run:\n  %s",
                        rdzv.nnodes - 1, " ".join(["torchrun", *cmd[3:]]))
        run_torchrun(cmd, spec_path)
    else:
        _launch_ray(spec, nproc, use_gpu)
    result = out / RESULT
    if not result.exists():
        raise RuntimeError(f"training finished without {result}")
    return json.loads(result.read_text())


def _launch_ray(spec: Any, nproc: int, use_gpu: bool | None, worker: Any = None, name: str = "ray_train") -> None:
    """Ray Train's TorchTrainer over `nproc` workers running `worker(config)` (default: train's), gloo on
    CPU, nccl when the workers take GPUs; its files under `<out_dir>/ray/<name>`."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.logging import quiet_env
    from pipeline.ray_utils import init_ray

    init_ray()
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= nproc
    trainer = TorchTrainer(
        worker or _ray_worker,
        train_loop_config={"spec": spec.model_dump(), "env": quiet_env()},
        scaling_config=ScalingConfig(num_workers=nproc, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(Path(spec.out_dir).resolve() / "ray")),
    )
    log.info("Ray Train: %d %s workers (use_gpu=%s)", nproc, name, use_gpu)
    trainer.fit()


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m trainers.launch SPEC.json", file=sys.stderr)
        return 2
    spec = WorkerSpec.model_validate_json(Path(args[0]).read_text())
    train_worker(spec)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
