"""Property-based fuzzing of the trace readers (Hypothesis, seeded: ``derandomize=True``).

Contract: every file is either read into a workload profile or refused with one :class:`UserError` line; never
another exception, never a control character from the input in a message. Valid traces (tests/fuzz/tracegen.py)
give exactly their rows and nearest-rank percentiles equal to a sorted-list computation, in every encoding and
compressed or not; a known-bad row inserted into a valid trace is counted malformed with its reason; ``read_trace``
and ``iter_requests`` agree row for row on every file (one parsing path). Through the CLI: exit 0, or exit 2 with
one ``kvtune: error:`` line and no output file.
"""

from __future__ import annotations

import io
import itertools
import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from tracegen import TraceCase, any_trace, bad_row_traces, mutated_traces, nearest_rank, valid_traces  # noqa: E402

from kvtune.cli import app  # noqa: E402
from kvtune.errors import UserError  # noqa: E402
from kvtune.profile.readers.base import Malformed, json_array  # noqa: E402
from kvtune.profile.workload import iter_requests, read_trace  # noqa: E402

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=10)

FUZZ = settings(derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), database=None)
_names = itertools.count()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-traces")


def write(folder: Path, case: TraceCase) -> Path:
    path = folder / f"{next(_names)}-{case.name}"  # a fresh file per example: no stale state between examples
    path.write_bytes(case.data)
    return path


def assert_clean_message(message: str, path: Path) -> None:
    assert "\n" not in message and "\r" not in message, message
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in message), repr(message)
    assert path.name in message or "--" in message, message  # names the file (or the flag)


def read_or_refuse(path: Path):
    """The profile, or ``None`` after checking the UserError is one clean line. Any other exception fails."""
    try:
        return read_trace(path)
    except UserError as exc:
        assert_clean_message(str(exc), path)
        return None


@settings(FUZZ, max_examples=120)
@given(case=valid_traces())
def test_valid_traces_are_read_exactly(folder, case):
    path = write(folder, case)
    w = read_trace(path)
    assert w.requests == len(case.inputs) and w.malformed_rows == 0, w.malformed_examples
    totals = [a + b for a, b in zip(case.inputs, case.outputs)]
    for stats, values in ((w.input_tokens, case.inputs), (w.output_tokens, case.outputs), (w.total_tokens, totals)):
        assert [stats.p50, stats.p90, stats.p99] == [nearest_rank(values, p) for p in (50, 90, 99)]
        assert (stats.min, stats.max, stats.count) == (min(values), max(values), len(values))
    got = list(iter_requests(path))
    assert [(r.input_tokens, r.output_tokens) for r in got] == list(zip(case.inputs, case.outputs))


@settings(FUZZ, max_examples=120)
@given(case=bad_row_traces())
def test_known_bad_rows_are_counted_with_their_reason(folder, case):
    path = write(folder, case)
    w = read_trace(path)
    assert w.requests == len(case.inputs), w.malformed_examples
    assert w.malformed_rows == len(case.bad)
    for example, reason in zip(w.malformed_examples, case.bad):
        assert reason in example.reason, (example, reason)
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in example.reason), repr(example.reason)
    with pytest.raises(UserError) as info:
        read_trace(path, strict=True)
    assert case.bad[0] in str(info.value)
    assert_clean_message(str(info.value), path)


@settings(FUZZ, max_examples=250)
@given(case=mutated_traces())
def test_mutated_traces_are_read_or_refused_in_one_line(folder, case):
    path = write(folder, case)
    w = read_or_refuse(path)
    seen = []
    try:
        n = sum(1 for _ in iter_requests(path, on_malformed=seen.append))
    except UserError as exc:
        assert_clean_message(str(exc), path)
        assert w is None  # iter_requests refuses exactly what read_trace refuses
        return
    assert w is not None
    assert (n, len(seen)) == (w.requests, w.malformed_rows)  # one parsing path: the same rows, the same rejects
    for row in w.malformed_examples:
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in row.reason), repr(row.reason)


@settings(FUZZ, max_examples=60)
@given(case=any_trace, strict=st.booleans())
def test_cli_exit_0_or_one_line_exit_2(folder, case, strict: bool):
    path = write(folder, case)
    out = folder / f"{path.name}.profile.yaml"
    args = ["profile", "--trace", str(path), "--hardware", "h100-sxm", "-o", str(out), "--format", "json"]
    r = CliRunner().invoke(app, args + (["--strict"] if strict else []))
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code in (0, 2), (r.exit_code, r.stderr)
    assert "Traceback" not in r.stderr
    assert not any(ord(c) < 0x20 and c != "\n" or 0x7F <= ord(c) <= 0x9F for c in r.stderr), repr(r.stderr)
    if r.exit_code == 2:
        assert r.stderr.splitlines()[-1].startswith("kvtune: error: ")
        assert not out.exists()
    else:
        assert out.exists()
        assert not (strict and case.kind == "bad_rows")  # --strict fails on the first known-bad row


@settings(FUZZ, max_examples=150)
@given(values=st.lists(json_values, max_size=12), chunk=st.integers(1, 64), indent=st.sampled_from([None, 0, 2]))
def test_json_array_streaming_equals_json_loads_at_any_chunk_size(values, chunk, indent):
    # the streamed array decoder refills its buffer at chunk boundaries: an element cut anywhere must still decode
    text = json.dumps(values, indent=indent)
    got = [item for item in json_array(io.StringIO(text), "t.json", chunk=chunk)]
    assert not any(isinstance(item, Malformed) for item in got), got
    assert [obj for _, obj in got] == json.loads(text)
