"""Shards published by workers: names from their rows, and a newer attempt fencing off an older one's workers."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.rundir import AttemptFenced, open_attempt, publish_shard, read_table, shard_files, shard_name


def _rows(ids):
    return pa.table({"chain_id": pa.array(ids, pa.string())})


def test_shard_name_depends_on_the_rows_only():
    assert shard_name(["b", "a"]) == shard_name(["a", "b"]) != shard_name(["a", "c"])
    assert shard_name(["a"]).startswith("part-") and shard_name(["a"]).endswith(".parquet")


def test_publish_then_a_retry_rewrites_the_same_file(tmp_path):
    att = open_attempt(tmp_path)
    name = shard_name(["a", "b"])
    publish_shard(_rows(["a", "b"]), att, name, "chains")
    publish_shard(_rows(["a", "b"]), att, name, "chains")  # a retried task: same rows, same name
    assert [p.name for p in shard_files(tmp_path)] == [name]
    assert read_table(tmp_path).column("chain_id").to_pylist() == ["a", "b"]
    assert pq.read_schema(tmp_path / name).metadata[b"r1v.table"] == b"chains"
    assert not list(att.iterdir())  # nothing left behind in the attempt folder


def test_a_newer_attempt_fences_the_older_ones_workers(tmp_path):
    old = open_attempt(tmp_path)
    publish_shard(_rows(["a"]), old, shard_name(["a"]), "chains")
    # a straggler of the old attempt has its tmp file open when the next driver starts
    straggler_tmp = old / "part-late.parquet"
    fh = open(straggler_tmp, "wb")
    new = open_attempt(tmp_path)
    fh.write(b"x")
    fh.close()
    assert not old.exists() and new.exists()
    with pytest.raises(AttemptFenced, match="newer attempt"):
        publish_shard(_rows(["b"]), old, shard_name(["b"]), "chains")
    with pytest.raises(FileNotFoundError):
        os.replace(straggler_tmp, tmp_path / "part-late.parquet")
    # what was published before the fence stays; nothing after it appears
    assert [p.name for p in shard_files(tmp_path)] == [shard_name(["a"])]
    assert not list(tmp_path.glob(".dead-*"))
