"""External traces under `ray job submit` (configs/traces.yaml with the data path given on the command
line, the run root from R1V_ROOT in the job's env), submitted twice: the second job skips every step and
rewrites nothing; `--stage filter` from the same config re-runs that one step without duplicating a row."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.rundir import Manifest, read_table
from tests.pipeline.test_ray_job import BIN, _manifest_stamps, _submit, ray_head  # noqa: F401 - fixture


@pytest.mark.slow
def test_traces_job_submitted_twice_then_one_stage(ray_head, traces_path, tmp_path):  # noqa: F811
    address, env = ray_head
    root = tmp_path / "root"
    data = [f"ingest.sources.0.path={traces_path}", f"filter.source.path={traces_path}"]
    r1 = _submit(address, env, ["configs/traces.yaml", *data], job_env={"R1V_ROOT": str(root)})
    assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
    run_dir = root / "traces"
    first = _manifest_stamps(run_dir)
    assert set(first) == {"ingest", "filter", "curate"}
    m = Manifest.load(run_dir / "filter")
    assert m.rows_in == 160 == m.kept + sum(m.dropped.values()) + sum(m.quarantined.values())
    n_sft = read_table(run_dir / "curate").num_rows
    r2 = _submit(address, env, ["configs/traces.yaml", *data], job_env={"R1V_ROOT": str(root)})
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    log2 = r2.stdout + r2.stderr
    assert _manifest_stamps(run_dir) == first
    assert "running (fingerprint" not in log2 and log2.count("skipped") >= 3
    # one stage again, from its config: filter rewritten whole (same rows, no duplicates), the rest untouched
    r3 = _submit(address, env, ["configs/traces.yaml", *data, "--stage", "filter"], job_env={"R1V_ROOT": str(root)})
    assert r3.returncode == 0, r3.stdout[-3000:] + r3.stderr[-3000:]
    third = _manifest_stamps(run_dir)
    assert third["filter"] != first["filter"] and {k: third[k] for k in ("ingest", "curate")} == {
        k: first[k] for k in ("ingest", "curate")}
    chains = read_table(run_dir / "filter")
    assert chains.num_rows == 160 and len(set(chains.column("chain_id").to_pylist())) == 160
    assert read_table(run_dir / "curate").num_rows == n_sft
    st = subprocess.run([str(BIN / "r1v"), "status", str(run_dir)], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
    assert st.returncode == 0 and "stale" not in st.stdout, st.stdout + st.stderr
    print(st.stdout, file=sys.__stderr__)
