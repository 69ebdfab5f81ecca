"""Trace and profile generators for the fuzz tests (tests/fuzz/test_fuzz_traces.py, test_fuzz_profile.py) and
the fuzz campaign (benchmarks/fuzz.py). Every generator is a Hypothesis strategy.

Traces come as :class:`TraceCase`: the file's name and bytes plus what a reader must make of them. ``valid`` cases
are built from values every reader documents as valid (their requests and lengths are known: the oracle),
``bad_rows`` cases are a valid trace with rows from the catalogue of known-bad rows below inserted (each must be
counted malformed, for the reason given), ``unknown`` cases are byte-level mutations of a valid trace (any
outcome but a crash is fine: a profile, or one :class:`~kvtune.errors.UserError` line). The catalogue is written
from the documented limits (docs/profile.md, ``kvtune.profile.readers.base``), not read from the readers' code.
"""

from __future__ import annotations

import codecs
import copy
import gzip
import json
import math
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

MAX_TOKENS = 1 << 24  # documented ceiling per request
HOSTILE = ["\x00", "\x1b]0;pwned\x07", "\x1b[2J", "\x9b", "\x7f", "\u202e", "\r", "\n", "\ufeff", "\ufffd", "\x85"]


@dataclass
class TraceCase:
    name: str  # file name (the suffix selects gzip and CSV vs TSV)
    data: bytes
    kind: str  # "valid" | "bad_rows" | "unknown"
    inputs: list[int] = field(default_factory=list)  # valid rows' input lengths, in file order
    outputs: list[int] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # expected reason fragment of each inserted bad row, in order


# -- valid rows ---------------------------------------------------------------------------------------------------

lengths = st.one_of(st.integers(0, 64), st.integers(0, 200_000), st.sampled_from([0, 1, 511, 512, MAX_TOKENS]))
row_lengths = st.lists(st.tuples(lengths, lengths), min_size=1, max_size=40)


def _mooncake_lines(rows: list[tuple[int, int]], step_ms: int) -> list[str]:
    return [json.dumps({"timestamp": i * step_ms, "input_length": a, "output_length": b,
                        "hash_ids": list(range(i % 3, i % 3 + a // 512 % 5))}) for i, (a, b) in enumerate(rows)]


def _azure_lines(rows: list[tuple[int, int]], step_ms: int) -> list[str]:
    return ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
        f"2023-11-16 18:{15 + i * step_ms // 60_000 % 40:02d}:{i * step_ms // 1000 % 60:02d}.{i % 1000:03d},{a},{b}"
        for i, (a, b) in enumerate(rows)]


def _burstgpt_lines(rows: list[tuple[int, int]], step_ms: int) -> list[str]:
    return ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type,Session ID"] + [
        f"{i * step_ms / 1000},ChatGPT,{a},{b},{a + b},Conversation log,s{i % 4}" for i, (a, b) in enumerate(rows)]


def _openai_lines(rows: list[tuple[int, int]], step_ms: int) -> list[str]:
    out = []
    for i, (a, b) in enumerate(rows):
        usage, created = {"prompt_tokens": a, "completion_tokens": b}, 1_700_000_000 + i * step_ms // 1000
        shape = i % 3  # the three places the usage block is found: top level, response, response.body (Batch API)
        out.append(json.dumps({"created": created, "usage": usage} if shape == 0 else
                              {"response": {"created": created, "usage": usage}} if shape == 1 else
                              {"id": f"b{i}", "response": {"body": {"created": created, "usage": usage}}}))
    return out


def _sharegpt_array(rows: list[tuple[int, int]], step_ms: int) -> list[str]:
    """A JSON array of one-turn conversations whose texts are 4 UTF-8 bytes per estimated token (no tokenizer)."""
    convs = [{"id": f"c{i}", "conversations": [{"from": "human", "value": "abcd" * a}, {"from": "gpt", "value": "wxyz" * b}]}
             for i, (a, b) in enumerate(rows)]
    return [json.dumps(convs, indent=None if step_ms % 2 else 1)]


FORMATS = {"mooncake": (_mooncake_lines, ".jsonl"), "azure": (_azure_lines, ".csv"),
           "burstgpt": (_burstgpt_lines, ".csv"), "openai": (_openai_lines, ".jsonl"),
           "sharegpt": (_sharegpt_array, ".json")}
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le-bom", "utf-16-be-bom", "utf-16-le"]


def encode(text: str, encoding: str) -> bytes:
    if encoding == "utf-16-le-bom":
        return codecs.BOM_UTF16_LE + text.encode("utf-16-le")
    if encoding == "utf-16-be-bom":
        return codecs.BOM_UTF16_BE + text.encode("utf-16-be")
    return text.encode(encoding)


@st.composite
def valid_traces(draw: Any) -> TraceCase:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    make, suffix = FORMATS[fmt]
    rows = draw(row_lengths)
    if fmt == "sharegpt":
        rows = [(a % 3000, b % 3000) for a, b in rows]  # text: 4 bytes per token, keep the file small
    lines = make(rows, draw(st.sampled_from([1, 7, 1000])))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    text = newline.join(lines) + draw(st.sampled_from(["", newline, newline * 3]))
    data = encode(text, draw(st.sampled_from(ENCODINGS)))
    gz = draw(st.booleans())
    return TraceCase(name=f"t{suffix}{'.gz' if gz else ''}", data=gzip.compress(data, mtime=0) if gz else data,
                     kind="valid", inputs=[a for a, _ in rows], outputs=[b for _, b in rows])


# -- known-bad rows: (row, reason fragment the malformed row must carry) ---------------------------------------

MOONCAKE_BAD: list[tuple[str, str]] = [
    ('{"timestamp": 5, "input_length": 9223372036854775808, "output_length": 1}', "above the ceiling"),
    (f'{{"timestamp": 5, "input_length": {MAX_TOKENS + 1}, "output_length": 1}}', "above the ceiling"),
    ('{"timestamp": 5, "input_length": -3, "output_length": 1}', "negative"),
    ('{"timestamp": 5, "input_length": ' + "9" * 5000 + ', "output_length": 1}', "an integer of more than"),
    ('{"timestamp": 5, "input_length": "' + "9" * 40 + '", "output_length": 1}', "over 32 characters"),
    ('{"timestamp": 1e400, "input_length": 5, "output_length": 1}', "not finite"),
    ('{"timestamp": 1e27, "input_length": 5, "output_length": 1}', "implausible"),
    ('{"timestamp": -5000, "input_length": 5, "output_length": 1}', "implausible"),
    ('{"timestamp": 5, "input_length": 1.5, "output_length": 1}', "not a whole number"),
    ('{"timestamp": 5, "input_length": NaN, "output_length": 1}', "not a JSON number"),
    ('{"timestamp": 5, "input_length": Infinity, "output_length": 1}', "not a JSON number"),
    ('{"timestamp": 5, "input_length": "abc", "output_length": 1}', "not a token count"),
    ('{"timestamp": 5, "input_length": true, "output_length": 1}', "not a token count"),
    ('{"timestamp": 5, "input_length": "12\\u001b[31m", "output_length": 1}', "\\x1b[31m"),
    ('{"timestamp": 5, "input_length": 5}', "missing field"),
    ('{"timestamp": 5, "input_length": 5, "output_length": 1, "x": ' + "[" * 5000 + "]" * 5000 + "}",
     "nested deeper than"),
    ('{"timestamp": 5, "input_length": 5, "output_length": 1, "hash_ids": ["x"]}', "hash_ids"),
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('"\x1b]0;pwned\x07"', "expected a JSON object"),
]
AZURE_BAD: list[tuple[str, str]] = [
    ("2023-11-16 18:15:46.68,-1,5", "negative"),
    ("2023-11-16 18:15:46.68,abc,5", "not a token count"),
    (f"2023-11-16 18:15:46.68,{2**63},5", "above the ceiling"),
    (f"2023-11-16 18:15:46.68,{MAX_TOKENS + 1},5", "above the ceiling"),
    ("2023-11-16 18:15:46.68,5", "expected 3 fields"),
    ("1e400,5,5", "not finite"),
    ("1e27,5,5", "implausible"),
    ("1899-01-01 00:00:00,5,5", "implausible"),
    ("not a time\x1b[2J,5,5", "\\x1b[2J"),
    ('2023-11-16 18:15:46.68,"' + "1" * 200_000 + '",5', "unreadable CSV row"),
    ("2023-11-16 18:15:46.68,nan,5", "not a whole number"),
    ("2023-11-16 18:15:46.68,5,inf", "not a whole number"),
]


@st.composite
def bad_row_traces(draw: Any) -> TraceCase:
    fmt = draw(st.sampled_from(["mooncake", "azure"]))
    make, suffix = FORMATS[fmt]
    rows = draw(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000)), min_size=2, max_size=20))
    lines = make(rows, 1000)
    catalogue = MOONCAKE_BAD if fmt == "mooncake" else AZURE_BAD
    picks = draw(st.lists(st.sampled_from(catalogue), min_size=1, max_size=4))
    head = 2 if fmt == "azure" else 1  # header + first good row: detection sees a good record
    body = lines[head:]
    slots = sorted(draw(st.lists(st.integers(0, len(body)), min_size=len(picks), max_size=len(picks))))
    out, reasons, prev = lines[:head], [], 0
    for slot, (row, reason) in zip(slots, picks):
        out += body[prev:slot] + [row]
        reasons.append(reason)
        prev = slot
    out += body[prev:]
    return TraceCase(name=f"bad{suffix}", data=("\n".join(out) + "\n").encode("utf-8"), kind="bad_rows",
                     inputs=[a for a, _ in rows], outputs=[b for _, b in rows], bad=reasons)


# -- byte-level mutations -----------------------------------------------------------------------------------------


@st.composite
def mutated_traces(draw: Any) -> TraceCase:
    """A valid trace with 1-4 random edits: truncation, inserted bytes or hostile text, flipped or deleted bytes,
    a duplicated region, an overlong line. Gzip cases may be truncated after compression (a corrupt archive)."""
    case = draw(valid_traces())
    data = bytearray(gzip.decompress(case.data) if case.name.endswith(".gz") else case.data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "insert", "hostile", "flip", "delete", "dup", "long", "nul16"]))
        first_nl = data.find(b"\n") + 1  # half the edits spare the header / first record, so rows get fuzzed too
        at = draw(st.integers(first_nl if first_nl and draw(st.booleans()) else 0, len(data)))
        if op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "hostile":
            data[at:at] = draw(st.sampled_from(HOSTILE)).encode("utf-8")
        elif op == "flip" and data:
            i = min(at, len(data) - 1)
            data[i] ^= draw(st.integers(1, 255))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif op == "dup":
            data[at:at] = data[at:at + draw(st.integers(1, 200))] * draw(st.integers(1, 3))
        elif op == "long":
            data[at:at] = draw(st.sampled_from([b"7", b"[", b"{", b'"', b","])) * draw(st.sampled_from([300, 140_000]))
        elif op == "nul16":
            data[at:at] = b"\x00" * draw(st.integers(1, 8))
    raw = bytes(data)
    if case.name.endswith(".gz"):
        raw = gzip.compress(raw, mtime=0)
        if draw(st.booleans()):
            raw = raw[:draw(st.integers(0, len(raw)))]  # truncated or corrupt archive
    return TraceCase(name=case.name, data=raw, kind="unknown")


any_trace = st.one_of(valid_traces(), bad_row_traces(), mutated_traces())


def nearest_rank(values: list[int], p: int) -> int:
    """The documented percentile definition, from a sorted list: the value at 1-based rank ceil(p * n / 100)."""
    s = sorted(values)
    return s[max(1, math.ceil(p * len(s) / 100)) - 1]


# -- profiles -----------------------------------------------------------------------------------------------------

BAD_NUMBERS = [math.inf, -math.inf, math.nan, -1, -1e-9, 1e300, 10**30, 2**64]
HOSTILE_VALUES: list[Any] = BAD_NUMBERS + [None, True, "", "x\x1b[2J", "12", [], {}, [1, 2], {"a": 1}, 0, 0.0, 1.5]

# (path to a number, the rule it must obey): setting it to any value in BAD_NUMBERS must be refused
PROFILE_NUMBERS: list[tuple[tuple[Any, ...], str]] = [
    (("hardware", "hbm_bandwidth_gbps"), "rate > 0, finite"),
    (("hardware", "peak_bf16_tflops"), "rate > 0, finite"),
    (("hardware", "peak_fp16_tflops"), "rate > 0, finite"),
    (("hardware", "cpu_matmul_gflops"), "rate > 0, finite"),
    (("hardware", "host_link_theoretical_gbps"), "rate > 0, finite"),
    (("hardware", "gpu_memory_total_bytes"), "bytes >= 0, bounded"),
    (("hardware", "cpu_ram_total_bytes"), "bytes >= 0, bounded"),
    (("hardware", "sm_count"), "count >= 0, bounded"),
    (("hardware", "power_limit_w"), "watts >= 0, finite"),
    (("workload", "requests"), "requests >= 1"),
    (("workload", "arrival_rate_per_s"), "rate > 0, finite"),
    (("workload", "time_span_s"), "seconds >= 0, finite"),
    (("workload", "prefix_reuse_ratio"), "ratio in [0, 1]"),
    (("workload", "input_tokens", "p50"), "token count >= 0, bounded"),
    (("workload", "input_tokens", "mean"), "mean >= 0, finite"),
    (("workload", "total_tokens", "max"), "token count >= 0, bounded"),
    (("workload", "malformed_rows"), "count >= 0"),
]


def set_path(doc: dict, path: tuple[Any, ...], value: Any) -> dict:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def leaf_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a leaf or a container of ``doc`` (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += leaf_paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += leaf_paths(v, prefix + (i,))
    return out


def bad_number_profile(base: dict) -> st.SearchStrategy[tuple[dict, str]]:
    """``base`` with one number from :data:`PROFILE_NUMBERS` set to a value from :data:`BAD_NUMBERS`."""
    return st.tuples(st.sampled_from(PROFILE_NUMBERS), st.sampled_from(BAD_NUMBERS)).map(
        lambda t: (set_path(base, t[0][0], t[1]), f"{'.'.join(t[0][0])}={t[1]!r}: {t[0][1]}"))


def mutated_profile(base: dict) -> st.SearchStrategy[dict]:
    """``base`` with 1-3 random edits anywhere: a leaf replaced by a hostile value, a key deleted or added."""
    paths = leaf_paths(base)

    @st.composite
    def build(draw: Any) -> dict:
        doc = copy.deepcopy(base)
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(paths))
            target = doc
            try:
                for key in path[:-1]:
                    target = target[key]
                op = draw(st.sampled_from(["set", "set", "delete", "add"]))
                if op == "set":
                    target[path[-1]] = draw(st.sampled_from(HOSTILE_VALUES))
                elif op == "delete" and isinstance(target, dict):
                    target.pop(path[-1], None)
                elif op == "add" and isinstance(target, dict):
                    target[draw(st.sampled_from(["extra", "x\x1b[2J", "\u202ekey"]))] = 1
            except (KeyError, IndexError, TypeError):
                continue  # an earlier edit removed or replaced this path
        return doc

    return build()
