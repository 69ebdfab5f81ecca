"""iter_requests: the same rows as read_trace (one parsing path), streamed as TraceRequest records."""

import json
import tracemalloc

import pytest

from kvtune.errors import UserError
from kvtune.profile.counts import LengthCounts
from kvtune.profile.workload import (
    DEFAULT_WORKLOAD,
    TraceRequest,
    bundled_trace_path,
    default_workload,
    iter_requests,
    read_trace,
)


def test_bundled_trace_path_is_the_default_workload_file():
    p = bundled_trace_path()
    assert p.name == DEFAULT_WORKLOAD and p.is_file()
    assert bundled_trace_path(DEFAULT_WORKLOAD) == p
    first = json.loads(p.read_text().splitlines()[0])
    r = next(iter_requests(p))
    assert (r.input_tokens, r.output_tokens, r.timestamp_s) == (first["input_length"], first["output_length"], 0.0)
    assert r.blocks == tuple(first["hash_ids"]) and r.block_tokens == 512 and r.session is None
    with pytest.raises(UserError, match="no bundled workload 'nope'"):
        bundled_trace_path("nope")


def test_iter_requests_agrees_with_read_trace_on_the_bundled_trace():
    reqs = list(iter_requests(bundled_trace_path()))
    w = default_workload()
    assert len(reqs) == w.requests == 1000
    counts = LengthCounts()
    for r in reqs:
        counts.add(r.input_tokens)
    assert counts.stats() == w.input_tokens
    ts = [r.timestamp_s for r in reqs]
    assert (max(ts) - min(ts)) == pytest.approx(w.time_span_s)
    assert all(isinstance(r, TraceRequest) for r in reqs)
    with pytest.raises(Exception):  # frozen
        reqs[0].input_tokens = 1


def test_iter_requests_skips_and_reports_malformed_rows(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type,Session ID\n"
                 "5,ChatGPT,100,20,120,Conversation log,s1\n"
                 "6,ChatGPT,-3,30,330,Conversation log,s1\n"
                 "7,GPT-4,50,0,50,API log,s2\n")
    seen = []
    reqs = list(iter_requests(p, on_malformed=seen.append))
    assert reqs == [TraceRequest(5.0, 100, 20, "s1"), TraceRequest(7.0, 50, 0, "s2")]
    assert [(m.line, "negative" in m.reason) for m in seen] == [(3, True)]
    with pytest.raises(UserError, match=r"b\.csv:3: .*negative"):
        list(iter_requests(p, strict=True))


def test_iter_requests_sharegpt_sessions_and_text_blocks(tmp_path):
    data = [{"id": "a", "conversations": [{"from": "human", "value": "x" * 100}, {"from": "gpt", "value": "y" * 8},
                                          {"from": "human", "value": "z" * 4}, {"from": "gpt", "value": "w" * 4}]}]
    p = tmp_path / "s.json"
    p.write_text(json.dumps(data))
    r1, r2 = iter_requests(p)
    assert (r1.session, r2.session) == ("a", "a")
    assert (r1.input_tokens, r1.output_tokens, r2.input_tokens) == (25, 2, 28)  # 4 UTF-8 bytes per token
    assert r1.block_tokens == 16 and len(r1.blocks) == 1 and r2.blocks[0] == r1.blocks[0]  # shared prefix block


def test_iter_requests_streams_in_bounded_memory(tmp_path):
    p = tmp_path / "m.jsonl"
    rows = 50_000
    with open(p, "w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"timestamp": i, "input_length": i % 977, "output_length": 1, "hash_ids": [i]}) + "\n")
    it = iter_requests(p)
    tracemalloc.start()
    n = sum(1 for _ in it)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == rows
    assert peak < 1_000_000, peak  # holding the rows would take > 10 MB (>200 bytes per TraceRequest)


def test_iter_requests_checks_arguments_before_iterating(tmp_path):
    with pytest.raises(UserError, match="unknown trace format"):
        iter_requests(bundled_trace_path(), fmt="parquet")
    with pytest.raises(UserError, match="no such trace file"):
        iter_requests(tmp_path / "missing.jsonl")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    it = iter_requests(empty)
    with pytest.raises(UserError, match="no requests"):
        next(it)
