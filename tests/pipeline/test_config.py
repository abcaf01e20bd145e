"""Configs: every YAML in configs/ validates; bad keys and values are named with their path."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml"))


def test_configs_exist():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates(path):
    cfg = load_config(path)
    assert cfg.run.name
    assert cfg.ingest is not None and cfg.ingest.sources


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = """
run: {name: t, root: %s}
ingest:
  sources:
    - kind: synthetic
      synthetic: {n: 5}
"""


def test_misspelt_key_names_path_and_value(tmp_path):
    p = _write(tmp_path, BASE % tmp_path + "  limt: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "ingest.limt" in msg and "unknown key" in msg and "5" in msg


def test_bad_value_names_path_and_value(tmp_path):
    p = _write(tmp_path, BASE % tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(p, ["ingest.limit=-3"])
    assert "ingest.limit" in str(e.value) and "-3" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(p, ["ingest.sources.0.kind=csv"])
    assert "ingest.sources.0.kind" in str(e.value) and "csv" in str(e.value)


def test_dotted_overrides_apply_and_parse_types(tmp_path):
    p = _write(tmp_path, BASE % tmp_path)
    cfg = load_config(p, ["ingest.limit=50", "run.seed=7", "ingest.dedupe=false"])
    assert cfg.ingest.limit == 50 and cfg.run.seed == 7 and cfg.ingest.dedupe is False


def test_override_without_equals_and_missing_file(tmp_path):
    p = _write(tmp_path, BASE % tmp_path)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(p, ["ingest.limit"])
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_round_overrides_are_validated(tmp_path):
    p = _write(tmp_path, BASE % tmp_path + "rounds: {count: 2, overrides: [{}, {ingest: {limt: 3}}]}\n")
    with pytest.raises(ConfigError, match=r"rounds\.overrides\.1\.ingest\.limt"):
        load_config(p)


def test_validate_cli_exit_codes(tmp_path, capsys):
    good = _write(tmp_path, BASE % tmp_path)
    assert main(["validate", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text((BASE % tmp_path).replace("synthetic: {n: 5}", "synthetic: {n: 5, sed: 1}"))
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "ingest.sources.0.synthetic.sed" in err
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"run: {{name: t, root: {tmp_path}}}\ningest:\n  sources: [{{kind: jsonl, path: /no/such.jsonl}}]\n")
    assert main(["validate", str(missing)]) == 1
    assert "/no/such.jsonl" in capsys.readouterr().err
