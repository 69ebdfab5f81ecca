"""Each trace reader on hand-made files in its format: values, malformed rows, empty files, detection."""

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from kvtune.errors import UserError
from kvtune.profile.workload import default_workload, read_trace

TRACES = Path("/work/shared/traces")


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def jsonl(rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


# ------------------------------------------------------------------------------------------- azure


AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224670,879,55
2023-11-16 18:15:56.6805900,91,16
"""


def test_azure_values_and_arrival_rate(tmp_path):
    w = read_trace(write(tmp_path, "a.csv", AZURE))
    assert w.format == "azure" and w.requests == 4
    assert (w.input_tokens.max, w.input_tokens.min, w.output_tokens.max) == (879, 91, 109)
    assert w.total_tokens.p50 == 418  # totals 418, 505, 934, 107 -> nearest rank 2 of 4
    assert w.input_tokens.mean == pytest.approx((374 + 396 + 879 + 91) / 4)
    assert w.time_span_s == pytest.approx(10.0)
    assert w.arrival_rate_per_s == pytest.approx(3 / 10.0)
    assert w.prefix_reuse_ratio is None and w.turns_per_session is None
    assert w.malformed_rows == 0


def test_azure_malformed_rows_counted_with_line_numbers(tmp_path):
    text = AZURE + "2023-11-16 18:15:57.0,abc,3\n2023-11-16 18:15:58.0,12\n\n2023-11-16 18:15:59.0,-5,3\n" \
                   "not-a-time,10,10\n2023-11-16 18:16:00.0,7,1.5\n2023-11-16 18:16:01.0,8,2\n"
    w = read_trace(write(tmp_path, "a.csv", text))
    assert w.requests == 5
    assert w.malformed_rows == 5
    lines = [(e.line, e.reason) for e in w.malformed_examples]
    assert [ln for ln, _ in lines] == [6, 7, 9, 10, 11]
    assert "expected 3 fields, got 2" in lines[1][1]
    assert "negative" in lines[2][1] and "timestamp" in lines[3][1] and "whole number" in lines[4][1]


def test_strict_fails_on_first_malformed_row(tmp_path):
    p = write(tmp_path, "a.csv", AZURE + "2023-11-16 18:15:57.0,abc,3\n")
    with pytest.raises(UserError, match=r"a\.csv:6: .*abc"):
        read_trace(p, strict=True)


@pytest.mark.parametrize("text", ["", "\n\n", "TIMESTAMP,ContextTokens,GeneratedTokens\n"])
def test_empty_files_are_one_line_errors(tmp_path, text):
    with pytest.raises(UserError, match="no requests"):
        read_trace(write(tmp_path, "e.csv", text))


def test_all_rows_malformed_says_so(tmp_path):
    p = write(tmp_path, "bad.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nx,y,z\n")
    with pytest.raises(UserError, match=r"no valid requests; 1 malformed rows \(first at line 2"):
        read_trace(p)


def test_gzip_is_read_transparently(tmp_path):
    p = tmp_path / "a.csv.gz"
    p.write_bytes(gzip.compress(AZURE.encode()))
    assert read_trace(p).requests == 4


# ------------------------------------------------------------------------------------------- mooncake


def test_mooncake_prefix_reuse_from_hash_ids(tmp_path):
    rows = [
        {"timestamp": 0, "input_length": 1024, "output_length": 10, "hash_ids": [1, 2]},
        {"timestamp": 500, "input_length": 1500, "output_length": 20, "hash_ids": [1, 2, 3]},  # 2 blocks reused
        {"timestamp": 1000, "input_length": 600, "output_length": 5, "hash_ids": [1, 9]},  # 1 block reused
        {"timestamp": 2000, "input_length": 300, "output_length": 5, "hash_ids": [7]},  # none
        {"timestamp": 2000, "input_length": 400, "output_length": 5, "hash_ids": [7]},  # 1 block, capped at 400
    ]
    w = read_trace(write(tmp_path, "m.jsonl", jsonl(rows)))
    assert w.format == "mooncake" and w.requests == 5
    reused = 1024 + 512 + 400
    assert w.prefix_reuse_ratio == pytest.approx(reused / (1024 + 1500 + 600 + 300 + 400), abs=1e-6)
    assert w.arrival_rate_per_s == pytest.approx(4 / 2.0)  # timestamps are milliseconds
    assert "hash_ids" in w.prefix_reuse_method


def test_mooncake_malformed_lines(tmp_path):
    rows = [{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]},
            "{not json", {"timestamp": 1, "input_length": 10}, [1, 2],
            {"timestamp": 2, "input_length": 5, "output_length": 2, "hash_ids": ["x"]},
            {"timestamp": 3, "input_length": 7, "output_length": 3, "hash_ids": [1]}]
    w = read_trace(write(tmp_path, "m.jsonl", jsonl(rows)))
    assert w.requests == 2 and w.malformed_rows == 4
    assert [e.line for e in w.malformed_examples] == [2, 3, 4, 5]
    assert "invalid JSON" in w.malformed_examples[0].reason
    assert "output_length" in w.malformed_examples[1].reason


# ------------------------------------------------------------------------------------------- burstgpt


def test_burstgpt_with_sessions(tmp_path):
    text = ("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type,Session ID\n"
            "5,ChatGPT,100,20,120,Conversation log,s1\n"
            "6,ChatGPT,300,30,330,Conversation log,s1\n"
            "7,GPT-4,50,0,50,API log,s2\n"
            "9,ChatGPT,700,70,770,Conversation log,s1\n")
    w = read_trace(write(tmp_path, "b.csv", text))
    assert w.format == "burstgpt" and w.requests == 4
    assert w.sessions == 2 and w.turns_per_session.max == 3 and w.turns_per_session.min == 1
    assert w.output_tokens.min == 0
    assert w.arrival_rate_per_s == pytest.approx(3 / 4)


def test_burstgpt_without_sessions(tmp_path):
    text = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n0.5,ChatGPT,10,2,12,x\n1.5,GPT-4,,3,3,x\n"
    w = read_trace(write(tmp_path, "b.csv", text))
    assert w.requests == 1 and w.malformed_rows == 1 and w.sessions is None


# ------------------------------------------------------------------------------------------- sharegpt


class WordTokenizer:
    """One token per whitespace word; ids from a growing vocabulary (deterministic)."""

    def __init__(self):
        self.vocab = {}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]


def words(n, tag):
    return " ".join(f"{tag}{i}" for i in range(n))


def test_sharegpt_multi_turn_with_tokenizer(tmp_path):
    data = [
        {"id": "a", "conversations": [
            {"from": "human", "value": words(20, "q")}, {"from": "gpt", "value": words(10, "r")},
            {"from": "human", "value": words(6, "s")}, {"from": "gpt", "value": words(4, "t")}]},
        {"id": "b", "conversations": [{"from": "system", "value": words(3, "sys")},
                                      {"from": "human", "value": words(5, "u")}, {"from": "gpt", "value": words(7, "v")}]},
        {"id": "c", "conversations": "oops"},
    ]
    w = read_trace(write(tmp_path, "sg.json", json.dumps(data, indent=1)), tokenizer=WordTokenizer())
    assert w.format == "sharegpt" and w.token_counts == "tokenizer"
    assert w.requests == 3
    assert sorted([w.input_tokens.min, w.input_tokens.max]) == [8, 36]  # 3+5; 20+10+6
    assert w.output_tokens.max == 10
    assert w.sessions == 2 and w.turns_per_session.max == 2
    # turn 2 of "a" re-reads the 30-token history: one full 16-token block is a prefix-cache hit
    assert w.prefix_reuse_ratio == pytest.approx(16 / (20 + 36 + 8))
    assert w.malformed_rows == 1 and w.malformed_examples[0].line == 3  # element 3 of the array


def test_sharegpt_without_tokenizer_is_estimated(tmp_path):
    data = [{"conversations": [{"from": "human", "value": "x" * 400}, {"from": "gpt", "value": "y" * 41}]}]
    w = read_trace(write(tmp_path, "sg.jsonl", json.dumps(data[0]) + "\n"))
    assert w.token_counts == "estimated"
    assert (w.input_tokens.max, w.output_tokens.max) == (100, 11)  # ceil(bytes / 4)
    assert any("estimated" in n for n in w.notes)


def test_json_array_streams_in_small_chunks(tmp_path, monkeypatch):
    import kvtune.profile.readers as readers

    data = [{"conversations": [{"from": "human", "value": words(i + 1, "w")}, {"from": "gpt", "value": "a b"}]}
            for i in range(300)]
    p = write(tmp_path, "big.json", json.dumps(data))
    real = readers.json_array
    monkeypatch.setattr(readers, "json_array", lambda fh, where, chunk=1 << 20: real(fh, where, chunk=97))
    w = read_trace(p, tokenizer=WordTokenizer())
    assert w.requests == 300 and w.input_tokens.max == 300 and w.malformed_rows == 0


def test_truncated_json_array_is_counted_not_crashed(tmp_path):
    p = write(tmp_path, "t.json", '[{"conversations": [{"from": "human", "value": "a b"}, {"from": "gpt", "value": "c"}]}, '
                                  '{"conversations": [')
    w = read_trace(p, tokenizer=WordTokenizer())
    assert w.requests == 1 and w.malformed_rows == 1


# ------------------------------------------------------------------------------------------- vllm / openai / generic


def test_vllm_custom_jsonl_shared_system_prompt(tmp_path):
    system = words(32, "sys")
    rows = [{"prompt": f"{system} {words(5, 'a')}", "output_tokens": 50},
            {"prompt": f"{system} {words(9, 'b')}", "output_tokens": 70},
            {"prompt": "short"}]
    w = read_trace(write(tmp_path, "v.jsonl", jsonl(rows)), tokenizer=WordTokenizer())
    assert w.format == "vllm" and w.requests == 2
    assert (w.input_tokens.min, w.input_tokens.max) == (37, 41)
    assert w.prefix_reuse_ratio == pytest.approx(32 / (37 + 41))  # the second prompt reuses the 2 system blocks
    assert w.malformed_rows == 1 and "output_tokens" in w.malformed_examples[0].reason


def test_openai_logs_three_shapes(tmp_path):
    rows = [
        {"id": "c1", "object": "chat.completion", "created": 1700000000,
         "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}},
        {"request": {"messages": []}, "response": {"created": 1700000004,
                                                   "usage": {"prompt_tokens": 80, "completion_tokens": 8}}},
        {"custom_id": "r3", "response": {"status_code": 200, "body": {
            "created": 1700000008, "usage": {"prompt_tokens": 40, "completion_tokens": 4}}}},
        {"id": "c4", "usage": {"prompt_tokens": 5}},
    ]
    w = read_trace(write(tmp_path, "o.jsonl", jsonl(rows)))
    assert w.format == "openai" and w.requests == 3
    assert (w.input_tokens.max, w.output_tokens.max, w.input_tokens.min) == (120, 30, 40)
    assert w.arrival_rate_per_s == pytest.approx(2 / 8)
    assert w.malformed_rows == 1 and w.malformed_examples[0].line == 4


def test_generic_csv_and_jsonl_with_columns(tmp_path):
    csv_text = "ts_ms,prompt_len,gen_len,conv\n0,10,1,a\n1000,20,2,a\n3000,30,3,b\n"
    w = read_trace(write(tmp_path, "g.csv", csv_text), columns="input=prompt_len,output=gen_len,time_ms=ts_ms,session=conv")
    assert w.format == "generic" and w.requests == 3
    assert w.arrival_rate_per_s == pytest.approx(2 / 3) and w.sessions == 2
    rows = [{"meta": {"in": 7}, "out": 3}, {"meta": {"in": 9}, "out": 1}, {"meta": {}, "out": 2}]
    w = read_trace(write(tmp_path, "g.jsonl", jsonl(rows)), columns={"input": "meta.in", "output": "out"})
    assert w.requests == 2 and w.input_tokens.max == 9 and w.malformed_rows == 1


def test_bad_columns_and_unknown_layouts_are_user_errors(tmp_path):
    p = write(tmp_path, "g.csv", "a,b\n1,2\n")
    with pytest.raises(UserError, match="cannot tell the trace format"):
        read_trace(p)
    with pytest.raises(UserError, match="no column 'x'"):
        read_trace(p, columns="input=x,output=b")
    with pytest.raises(UserError, match="needs at least input"):
        read_trace(p, columns="input=a")
    with pytest.raises(UserError, match="unknown key"):
        read_trace(p, columns="input=a,output=b,speed=c")
    with pytest.raises(UserError, match="no such trace"):
        read_trace(tmp_path / "missing.csv")
    with pytest.raises(UserError, match="unknown trace format"):
        read_trace(p, fmt="parquet")
    with pytest.raises(UserError, match="cannot tell"):
        read_trace(write(tmp_path, "x.jsonl", '{"a": 1}\n'))


def test_several_traces_pool_into_one_distribution(tmp_path):
    a = write(tmp_path, "a.csv", AZURE)
    b = write(tmp_path, "m.jsonl", jsonl([{"timestamp": 0, "input_length": 5000, "output_length": 1, "hash_ids": [1]}]))
    w = read_trace([a, b])
    assert w.requests == 5 and w.format == "mixed" and len(w.traces) == 2
    assert w.input_tokens.max == 5000


# ------------------------------------------------------------------------------------------- real traces


def _exact(path):
    inp, out = [], []
    if path.suffix == ".csv":
        for line in path.read_text().splitlines()[1:]:
            _, i, o = line.split(",")
            inp.append(int(i)), out.append(int(o))
    else:
        for line in path.read_text().splitlines():
            d = json.loads(line)
            inp.append(d["input_length"]), out.append(d["output_length"])
    return np.array(inp), np.array(out)


@pytest.mark.parametrize("name", ["azure-llm-2023-conv.csv", "azure-llm-2023-code.csv",
                                  "mooncake-fast25-conversation.jsonl", "mooncake-fast25-synthetic.jsonl"])
def test_real_traces_percentiles_against_numpy(name):
    path = TRACES / name
    if not path.exists():
        pytest.skip(f"needs the shared trace {path}")
    w = read_trace(path)
    inp, out = _exact(path)
    assert w.requests == len(inp) and w.malformed_rows == 0 and w.percentile_relative_error == 0.0
    for stats, arr in ((w.input_tokens, inp), (w.output_tokens, out), (w.total_tokens, inp + out)):
        for q, got in ((50, stats.p50), (90, stats.p90), (99, stats.p99)):
            exact = int(np.percentile(arr, q, method="inverted_cdf"))
            assert got == exact, (name, q, got, exact)  # exact counting: no tolerance
        assert stats.max == arr.max() and stats.mean == pytest.approx(arr.mean(), abs=1e-3)


def test_bundled_default_workload():
    w = default_workload()
    assert w.requests == 1000 and w.format == "mooncake"
    assert w.source == "kvtune.profiles/workloads/mooncake-conversation-sample.jsonl"
    assert 0 < w.prefix_reuse_ratio < 1 and w.arrival_rate_per_s == pytest.approx(999 / 330.0)
    assert math.isclose(sum(b.count for b in w.total_tokens.histogram), 1000)
