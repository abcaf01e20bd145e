"""External chains (filters/external.py): column mapping, bad rows, ids shared with ingest, and a whole
run of ingest -> filter (external source) -> curate on real traces."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from filters.external import ChainsSourceConfig, load_chains
from filters.extract import extract, split_chain, truncation
from pipeline.config import validate_config
from pipeline.ingest import ColumnMap, SourceConfig, load_sources
from pipeline.rundir import Manifest, read_table
from pipeline.runner import Runner

COLS = {"question": "q", "answer": "gold", "trace": "out", "id": "id", "teacher": "model"}
ROWS = [
    {"id": 1, "q": "What is 2+3?", "gold": "5", "out": "2+3=5</think>The answer is \\boxed{5}.", "model": "m1"},
    {"id": 2, "q": "What is 2+3?", "gold": "5", "out": "it is 6</think>\\boxed{6}", "model": "m1"},
    {"id": 3, "q": "Pick one", "gold": "B", "choices": ["1", "2"], "out": "x</think>(B)", "model": "m2"},
    {"id": 4, "q": "Cut off", "gold": "1", "out": "I was thinking and then", "model": "m1"},
    {"id": 5, "q": "No trace", "gold": "1", "out": "", "model": "m1"},
    {"id": 6, "q": "No answer", "out": "x</think>\\boxed{1}", "model": "m1"},
    {"id": 7, "q": "What is 2+3?", "gold": "5", "out": "2+3=5</think>The answer is \\boxed{5}.", "model": "m1"},
]


def _jsonl(path: Path, rows: list[dict], extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("\n".join([json.dumps(r) for r in rows] + list(extra_lines)) + "\n")
    return path


def test_load_chains_maps_columns_and_counts_bad_rows(tmp_path):
    path = _jsonl(tmp_path / "gens.jsonl", ROWS, ("{not json",))
    src = ChainsSourceConfig(path=str(path), columns={**COLS, "choices": "choices"})
    loaded = load_chains(src)
    assert loaded.quarantined == {"missing_trace": 1, "missing_answer": 1, "duplicate_chain": 1, "bad_row": 1}
    chains = loaded.chains.to_pylist()
    assert [c["teacher"] for c in chains] == ["m1", "m1", "m2", "m1"]
    assert loaded.problems.num_rows == 3  # rows 1 and 2 share a problem
    assert chains[0]["problem_id"] == chains[1]["problem_id"]
    assert chains[0]["reasoning"] == "2+3=5" and chains[0]["response"] == "The answer is \\boxed{5}."
    # a trace keeps its own text: one without markers is plain, and cut mid-sentence it is truncated
    assert chains[3]["completion"] == "I was thinking and then" and chains[3]["response"] == chains[3]["completion"]
    split = split_chain(chains[3]["completion"])
    assert split.fmt == "plain" and truncation(split, extract(split.response)) == "ends mid-sentence"
    problems = {p["problem_id"]: p for p in loaded.problems.to_pylist()}
    assert problems[chains[2]["problem_id"]]["answer_type"] == "choice"
    assert any("not valid JSON" in ref for ref in loaded.bad_refs)


def test_problem_ids_match_an_ingest_source_over_the_same_file(tmp_path):
    path = _jsonl(tmp_path / "gens.jsonl", ROWS[:4])
    loaded = load_chains(ChainsSourceConfig(path=str(path), columns=COLS))
    cmap = ColumnMap(id="id", question="q", answer="gold", images=None, choices=None, answer_type=None)
    ingested = [row for kind, row in load_sources([SourceConfig(kind="jsonl", path=str(path), columns=cmap)])
                if kind == "problem"]
    assert {p["problem_id"] for p in ingested} == set(loaded.problems.column("problem_id").to_pylist())


def test_parquet_source_and_limit(tmp_path):
    path = tmp_path / "gens.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), path)
    loaded = load_chains(ChainsSourceConfig(path=str(path), columns=COLS, limit=2))
    assert loaded.chains.num_rows == 2


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="filter.source.path"):
        load_chains(ChainsSourceConfig(path=str(tmp_path / "nope.jsonl")))


def test_ingest_filter_curate_on_external_traces(ray_local, traces_path, tmp_path):
    """Existing R1 / Sky-T1 generations, filtered and curated without a generate step."""
    raw = {
        "run": {"name": "traces", "root": str(tmp_path)},
        "ingest": {"sources": [{"kind": "jsonl", "path": str(traces_path), "name": "traces-dev",
                                "columns": {"question": "problem", "answer": "gold_answer", "images": None,
                                            "choices": None, "answer_type": None}}]},
        "filter": {"workers": 2, "batch_size": 16,
                   "source": {"path": str(traces_path), "name": "traces-dev",
                              "columns": {"question": "problem", "answer": "gold_answer", "trace": "trace",
                                          "id": "id", "teacher": "model"}}},
        "curate": {"n_per_problem": 2},
    }
    cfg = validate_config(raw, "test")
    Runner(cfg).run()
    run_dir = tmp_path / "traces"
    m = Manifest.load(run_dir / "filter")
    assert (m.rows_in, m.kept) == (160, 105)
    assert m.dropped == {"truncated": 23, "wrong": 32}
    assert m.metrics["verdicts"] == {"correct": 105, "wrong": 32, "truncated": 23}
    ext_problems = set(read_table(run_dir / "filter" / "problems").column("problem_id").to_pylist())
    assert ext_problems == set(read_table(run_dir / "ingest").column("problem_id").to_pylist())
    sft = read_table(run_dir / "curate").to_pylist()
    kept_ids = set(read_table(run_dir / "filter").filter(pa.compute.field("keep")).column("chain_id").to_pylist())
    assert sft and {s["chain_id"] for s in sft} <= kept_ids
    assert all(s["messages"][-1]["content"].startswith("<think>") for s in sft)


def test_images_are_read_relative_to_the_source_file(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 6), (200, 10, 10)).save(tmp_path / "fig.png")
    rows = [{"q": "Area?", "gold": "48", "img": "fig.png", "out": "8*6</think>\\boxed{48}"},
            {"q": "Broken", "gold": "1", "img": "missing.png", "out": "x</think>\\boxed{1}"}]
    path = _jsonl(tmp_path / "gens.jsonl", rows)
    loaded = load_chains(ChainsSourceConfig(path=str(path), columns={**COLS, "id": None, "images": "img"}))
    assert loaded.quarantined == {"missing_image": 1}
    (problem,) = loaded.problems.to_pylist()
    assert [(im["format"], im["width"], im["height"]) for im in problem["images"]] == [("png", 8, 6)]
    assert loaded.chains.column("problem_id").to_pylist() == [problem["problem_id"]]


def test_validate_names_a_missing_source(tmp_path):
    from filters.filter import FilterConfig, preflight

    assert preflight(FilterConfig(source={"path": str(tmp_path / "nope.jsonl")})) == [
        f"filter.source.path: file not found: {tmp_path / 'nope.jsonl'}"
    ]
    assert preflight(FilterConfig()) == []


@pytest.mark.parametrize("curate_workers", [0, 1])
def test_chat_records_alone_filter_and_curate(tmp_path, curate_workers):
    """A file of chat records (OpenAI with reasoning_content, ShareGPT with <thought>, a Kimi-style
    string) and no ingest step: `r1v run` filters and curates them (in the driver and bucketed on Ray,
    both reading the problems the filter step wrote); the SFT turns carry the reasoning."""
    import yaml

    from pipeline.cli import main

    rows = [
        {"id": 1, "gold": "5", "chat": [{"role": "system", "content": "Think."}, {"role": "user", "content": "2+3?"},
                                        {"role": "assistant", "content": "So \\boxed{5}.", "reasoning_content": "2+3 is 5"}]},
        {"id": 2, "gold": "7", "chat": [{"from": "human", "value": "3+4?"},
                                        {"from": "gpt", "value": "<thought>3+4 is 7</thought>Answer: 7"}]},
        {"id": 3, "q": "4+4?", "gold": "8", "chat": "◁think▷4+4 is 9◁/think▷The answer is $9$."},
        {"id": 4, "gold": "1", "chat": [{"role": "user", "content": "1?"}]},  # no assistant turn: counted
    ]
    path = _jsonl(tmp_path / "chats.jsonl", rows)
    cfg = {"run": {"name": "chats", "root": str(tmp_path / "runs")}, "ray": {"num_cpus": 2},
           "filter": {"workers": 0, "source": {"path": str(path),
                                               "columns": {"question": "q", "answer": "gold", "trace": "chat", "id": "id"}}},
           "curate": {"n_per_problem": 2, "workers": curate_workers}}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(cfg_path)]) == 0
    run_dir = tmp_path / "runs" / "chats"
    m = Manifest.load(run_dir / "filter")
    assert (m.rows_in, m.kept, m.dropped, m.quarantined) == (4, 2, {"wrong": 1}, {"bad_trace": 1})
    assert m.metrics["trace_formats"] == {"think": 3}
    sft = read_table(run_dir / "curate").to_pylist()
    turns = sorted(s["messages"][-1]["content"] for s in sft)
    assert turns == ["<think>\n2+3 is 5\n</think>\n\nSo \\boxed{5}.", "<think>\n3+4 is 7\n</think>\n\nAnswer: 7"]
    questions = sorted(s["messages"][-2]["content"] for s in sft)
    assert [q.split()[-1] for q in questions] == ["2+3?", "3+4?"]


def test_api_responses_give_one_sample_per_choice(tmp_path):
    """OpenAI chat / completions responses: every choice a sample with its own finish reason; a choice cut
    at the length limit is truncated whatever its text, and samples=last_complete never takes it."""
    from filters.deadline import DeadlinePool
    from filters.filter import FilterConfig, _problem_columns, score_batch
    from filters.verify import check_answer

    resp = {"choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "So \\boxed{5}.",
                                                          "reasoning_content": "2+3=5"}},
        {"index": 1, "finish_reason": "length", "message": {"role": "assistant", "content": "",
                                                            "reasoning_content": "2+3 is, hmm, 5? Let me"}},
        {"index": 2, "finish_reason": "length", "message": {"role": "assistant", "content": "It is \\boxed{5}."}},
    ]}
    rows = [{"q": "2+3?", "gold": "5", "resp": resp},
            {"q": "2+4?", "gold": "6", "resp": {"choices": [{"index": 0, "text": "</think>So 6.", "finish_reason": "stop"}]}}]
    path = _jsonl(tmp_path / "api.jsonl", rows)
    cols = {"question": "q", "answer": "gold", "trace": "resp", "id": None}
    loaded = load_chains(ChainsSourceConfig(path=str(path), columns=cols))
    chains = loaded.chains.to_pylist()
    assert [(c["sample_idx"], c["finish_reason"]) for c in chains] == [(0, "stop"), (1, "length"), (2, "length"), (0, "stop")]
    problems = {p["problem_id"]: p for p in loaded.problems.to_pylist()}
    with DeadlinePool(check_answer, timeout_s=5) as pool:
        out = score_batch(_problem_columns(loaded.chains, problems).to_pylist(), FilterConfig(workers=0), pool)
    assert [r["verdict"] for r in out] == ["correct", "truncated", "truncated", "correct"]
    last = load_chains(ChainsSourceConfig(path=str(path), columns=cols, samples="last_complete")).chains.to_pylist()
    assert [(c["sample_idx"], c["finish_reason"]) for c in last] == [(0, "stop"), (0, "stop")]
