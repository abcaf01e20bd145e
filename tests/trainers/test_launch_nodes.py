"""torchrun over two "nodes" (two torchrun agents meeting at a c10d rendezvous endpoint, as on two hosts):
the same losses and weights as one rank."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

from tests.trainers.test_launch import _agree, _same_weights, _spec
from trainers.launch import Rendezvous, launch, torchrun_command

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_rendezvous_two_nodes_match_one_rank(tiny_student, sft_dir, tmp_path):
    rdzv = Rendezvous(nnodes=2, endpoint=f"127.0.0.1:{_free_port()}", id="r1v-test")
    spec = _spec(tiny_student, sft_dir, tmp_path / "two", grad_accum=1)
    result: dict = {}
    errors: list[BaseException] = []

    def head() -> None:
        try:
            result.update(launch(spec, "torchrun", nproc=1, rdzv=rdzv))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(e)

    t = threading.Thread(target=head)
    t.start()
    spec_path = tmp_path / "two" / "worker_spec.json"
    deadline = time.time() + 120
    while not spec_path.exists() and time.time() < deadline:
        time.sleep(0.1)
    # the second node runs the command the head logs, against the spec on shared storage
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    other = subprocess.run(torchrun_command(spec_path, 1, rdzv), cwd=REPO, env=env, timeout=600)
    t.join(timeout=600)
    if errors:
        raise errors[0]
    assert other.returncode == 0
    one = launch(_spec(tiny_student, sft_dir, tmp_path / "one", grad_accum=2), "local")
    _agree(one, result, 1e-5)
    _same_weights(tmp_path / "one" / "model", tmp_path / "two" / "model", 1e-5)


def test_rendezvous_needs_torchrun(tiny_student, sft_dir, tmp_path):
    import pytest

    with pytest.raises(ValueError, match="launcher=torchrun"):
        launch(_spec(tiny_student, sft_dir, tmp_path), "ray", nproc=2,
               rdzv=Rendezvous(nnodes=2, endpoint="127.0.0.1:29400"))
