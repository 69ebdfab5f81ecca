"""Regression tests for the trace-reader defects of issue 14, one test per defect, through the real CLI.

Each bad input must end as exit 0 with the row counted malformed (and its reason), or as exit 2 with one line
``kvtune: error: ...`` on stderr; never a traceback, never exit 130, never a hang, never an output file
written on an error. ``--hardware h100-sxm`` (a datasheet profile) keeps the hardware probe out of the way.
"""

import codecs
import gzip
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvtune.cli import app
from kvtune.errors import UserError, printable
from kvtune.profile.readers.base import MAX_TOKENS_PER_REQUEST
from kvtune.profile.workload import bundled_trace_path, read_trace

TRACES = Path("/work/shared/traces")
GOOD = [{"timestamp": i * 1000, "input_length": 100 + i, "output_length": 10 + i} for i in range(20)]
AZURE = ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n"
         "2023-11-16 18:15:50.99,396,109\n2023-11-16 18:15:52.00,879,55\n")


def mooncake(tmp_path, extra_line: str, name="t.jsonl") -> Path:
    """The 20 good rows, then ``extra_line`` as line 21."""
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in GOOD) + extra_line + "\n")
    return p


def profile(tmp_path, trace: Path, *more: str):
    """``kvtune profile --trace FILE`` -> (exit code, stdout, stderr, output file)."""
    out = tmp_path / "profile.yaml"
    r = CliRunner().invoke(app, ["profile", "--trace", str(trace), "--hardware", "h100-sxm", "-o", str(out),
                                 "--format", "json", *more])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)  # no crash
    assert "Traceback" not in r.stderr
    return r.exit_code, r.stdout, r.stderr, out


def one_line_error(tmp_path, trace: Path, *more: str) -> str:
    code, _, err, out = profile(tmp_path, trace, *more)
    assert code == 2, err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("kvtune: error: ") and "Traceback" not in err
    assert not out.exists()  # nothing written on an error
    return last


def counted_malformed(tmp_path, trace: Path, reason_part: str, requests=20) -> dict:
    """exit 0, ``requests`` valid rows, exactly the last row malformed for ``reason_part``; --strict then fails."""
    code, stdout, err, out = profile(tmp_path, trace)
    assert code == 0, err
    out.unlink()
    w = json.loads(stdout)["workload"]
    assert w["requests"] == requests and w["malformed_rows"] == 1
    assert reason_part in w["malformed_examples"][0]["reason"], w["malformed_examples"][0]
    assert w["malformed_examples"][0]["line"] == requests + 1
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and warning[0].endswith("--strict fails on them")  # one line, not wrapped at 80
    strict = one_line_error(tmp_path, trace, "--strict")
    assert f":{requests + 1}: " in strict and reason_part in strict
    return w


# ------------------------------------------------------------------------------- values counted malformed


def test_token_count_of_2_pow_63_is_a_malformed_row(tmp_path):
    # was: IndexError in the length sketch, even without --strict
    p = mooncake(tmp_path, '{"timestamp": 5, "input_length": 9223372036854775808, "output_length": 1}')
    w = counted_malformed(tmp_path, p, f"above the ceiling of {MAX_TOKENS_PER_REQUEST:,} tokens")
    assert w["input_tokens"]["max"] == 119


def test_token_count_above_the_ceiling_in_csv_is_a_malformed_row(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text(AZURE + f"2023-11-16 18:15:53.00,{MAX_TOKENS_PER_REQUEST + 1},5\n")
    code, stdout, err, _ = profile(tmp_path, p)
    w = json.loads(stdout)["workload"]
    assert code == 0 and w["requests"] == 3 and w["malformed_rows"] == 1
    assert "above the ceiling" in w["malformed_examples"][0]["reason"]


def test_negative_count_is_a_malformed_row(tmp_path):
    counted_malformed(tmp_path, mooncake(tmp_path, '{"timestamp": 5, "input_length": -3, "output_length": 1}'),
                      "negative")


def test_5000_digit_integer_is_a_malformed_row(tmp_path):
    p = mooncake(tmp_path, '{"timestamp": 5, "input_length": ' + "9" * 5000 + ', "output_length": 1}')
    counted_malformed(tmp_path, p, "an integer of more than")


def test_timestamp_1e400_is_a_malformed_row(tmp_path):
    # was: OverflowError
    counted_malformed(tmp_path, mooncake(tmp_path, '{"timestamp": 1e400, "input_length": 5, "output_length": 1}'),
                      "not finite")


def test_timestamp_1e27_is_a_malformed_row_and_the_rate_stays_real(tmp_path):
    # was: accepted, span 1e27 s, rate 0.00 requests/s, --strict passing
    p = mooncake(tmp_path, '{"timestamp": 1e27, "input_length": 5, "output_length": 1}')
    w = counted_malformed(tmp_path, p, "implausible")
    assert w["time_span_s"] == pytest.approx(19.0)  # 20 rows 1 s apart
    assert w["arrival_rate_per_s"] == pytest.approx(1.0)


def test_an_offset_among_epoch_timestamps_is_a_malformed_row(tmp_path):
    # found by the fuzz tests: one stray "00.002" in an Azure trace made the span 53 years and the rate 1e-9/s
    p = tmp_path / "a.csv"
    p.write_text(AZURE + "00.002,5,5\n")
    w = read_trace(p)
    assert w.requests == 3 and w.malformed_rows == 1 and "offset from the trace start" in w.malformed_examples[0].reason
    assert w.time_span_s == pytest.approx(5.32) and w.arrival_rate_per_s == pytest.approx(2 / 5.32, rel=1e-5)


def test_arrival_rate_is_never_rounded_to_zero_or_infinite(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "0,a,1,1,2,x\n1e-300,a,1,1,2,x\n")
    w = read_trace(p)
    assert w.arrival_rate_per_s is None and "too short for an arrival rate" in w.notes[-1]
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "0,a,1,1,2,x\n315000000,a,1,1,2,x\n")  # two requests ten years apart
    assert read_trace(p).arrival_rate_per_s == pytest.approx(1 / 315_000_000)


def test_epoch_timestamp_before_2000_is_a_malformed_row(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "1700000000,ChatGPT,10,2,12,x\n1700000001,ChatGPT,11,2,13,x\n"
                 "900000000,ChatGPT,12,2,14,x\n")  # 1998: neither an epoch time in 2000-2099 nor a 10-year offset
    code, stdout, err, _ = profile(tmp_path, p)
    w = json.loads(stdout)["workload"]
    assert code == 0 and w["requests"] == 2 and w["malformed_rows"] == 1
    assert "implausible" in w["malformed_examples"][0]["reason"]


def test_deeply_nested_json_is_a_malformed_row(tmp_path):
    # was: RecursionError
    deep = '{"timestamp": 5, "input_length": 5, "output_length": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    counted_malformed(tmp_path, mooncake(tmp_path, deep), "nested deeper than")


def test_deeply_nested_json_array_element_ends_the_array_with_a_reason(tmp_path):
    p = tmp_path / "s.json"
    conv = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    p.write_text("[" + json.dumps(conv) + ", " + "[" * 50_000 + "]" * 50_000 + "]")
    w = read_trace(p)
    assert w.requests == 1 and w.malformed_rows == 1 and "nested deeper than" in w.malformed_examples[0].reason


# ------------------------------------------------------------------------------- whole-file errors


def test_csv_first_line_over_128_kib_is_one_line(tmp_path):
    # was: _csv.Error traceback
    p = tmp_path / "wide.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens," + "x" * 200_000 + "\n2023-11-16 18:15:46,374,44,y\n")
    assert "field larger than field limit" in one_line_error(tmp_path, p)


def test_csv_field_over_128_kib_in_a_row_is_a_malformed_row(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text(AZURE + '2023-11-16 18:15:53.00,"' + "1" * 200_000 + '",5\n')
    code, stdout, err, _ = profile(tmp_path, p)
    w = json.loads(stdout)["workload"]
    assert code == 0 and w["requests"] == 3 and w["malformed_rows"] == 1


def test_truncated_gzip_is_one_line_exit_2_not_130(tmp_path):
    p = tmp_path / "t.jsonl.gz"
    p.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in GOOD).encode())[:-30])
    assert "truncated or corrupt gzip" in one_line_error(tmp_path, p)


def test_corrupt_gzip_is_one_line(tmp_path):
    p = tmp_path / "c.csv.gz"
    data = bytearray(gzip.compress((AZURE * 50).encode()))
    data[20:40] = b"\xff" * 20
    p.write_bytes(bytes(data))
    assert "truncated or corrupt gzip" in one_line_error(tmp_path, p)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
def test_fifo_is_refused_before_opening(tmp_path):
    # was: blocked forever. A subprocess with a timeout, so a regression fails instead of hanging the suite.
    fifo = tmp_path / "trace.jsonl"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "kvtune", "profile", "--trace", str(fifo), "--hardware", "h100-sxm",
                        "-o", str(tmp_path / "p.yaml")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"kvtune: error: {fifo}: is a FIFO, not a regular file (trace files "
                                                 "are read twice: save the stream to a file first)")
    assert not (tmp_path / "p.yaml").exists()


def test_directory_and_device_are_refused(tmp_path):
    assert "is a directory" in one_line_error(tmp_path, tmp_path)
    if Path("/dev/null").exists():
        assert "is a device, not a regular file" in one_line_error(tmp_path, Path("/dev/null"))


# ------------------------------------------------------------------------------- valid data accepted


def test_valid_10_mb_jsonl_record_is_accepted(tmp_path):
    # was: "no JSON object found" (the first line was cut at 128 KiB)
    big = dict(GOOD[0], pad="z" * 10_000_000)
    p = tmp_path / "big.jsonl"
    p.write_text(json.dumps(big) + "\n" + "".join(json.dumps(r) + "\n" for r in GOOD[1:]))
    code, stdout, err, _ = profile(tmp_path, p)
    w = json.loads(stdout)["workload"]
    assert code == 0 and w["format"] == "mooncake" and w["requests"] == 20 and w["malformed_rows"] == 0


@pytest.mark.parametrize("bom,encoding", [(codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                                          (codecs.BOM_UTF16_BE, "utf-16-be")])
def test_bom_on_jsonl(tmp_path, bom, encoding):
    # was: a UTF-8 BOM on JSONL rejected while accepted on CSV
    p = tmp_path / "bom.jsonl"
    p.write_bytes(bom + "".join(json.dumps(r) + "\n" for r in GOOD).encode(encoding))
    w = read_trace(p)
    assert (w.format, w.requests, w.malformed_rows, w.input_tokens.max) == ("mooncake", 20, 0, 119)


@pytest.mark.parametrize("data", [codecs.BOM_UTF16_LE + AZURE.encode("utf-16-le"),
                                  codecs.BOM_UTF16_BE + AZURE.encode("utf-16-be"),
                                  AZURE.encode("utf-16-le"),  # no BOM: told by its zero bytes
                                  codecs.BOM_UTF8 + AZURE.encode("utf-8")], ids=["le-bom", "be-bom", "le", "utf8-bom"])
def test_utf16_and_bom_csv(tmp_path, data):
    # was: UTF-16 CSV unrecognised
    p = tmp_path / "u.csv"
    p.write_bytes(data)
    w = read_trace(p)
    assert (w.format, w.requests, w.malformed_rows, w.input_tokens.max) == ("azure", 3, 0, 879)


# ------------------------------------------------------------------------------- exact percentiles


def _p50_sorted(values: list[int]) -> int:
    """Nearest-rank median from a sorted list: the value at 1-based rank ceil(n / 2)."""
    s = sorted(values)
    return s[max(1, -(-len(s) // 2)) - 1]


def _mooncake_values(path: Path) -> tuple[list[int], list[int]]:
    inp, out = [], []
    with open(path) as fh:
        for line in fh:
            d = json.loads(line)
            inp.append(d["input_length"])
            out.append(d["output_length"])
    return inp, out


def test_exact_p50_of_the_bundled_mooncake_sample():
    # was: approximate (sketch) percentiles
    inp, out = _mooncake_values(bundled_trace_path())
    w = read_trace(bundled_trace_path())
    assert w.percentile_relative_error == 0.0
    assert w.input_tokens.p50 == _p50_sorted(inp) == statistics.median_low(inp)  # n even: median_low = rank n/2
    assert w.output_tokens.p50 == _p50_sorted(out)
    assert w.total_tokens.p50 == _p50_sorted([a + b for a, b in zip(inp, out)])


def test_exact_p50_of_the_full_mooncake_conversation_trace():
    path = TRACES / "mooncake-fast25-conversation.jsonl"
    if not path.exists():
        pytest.skip(f"needs the shared trace {path} (present on the project's dev machine only)")
    inp, out = _mooncake_values(path)
    w = read_trace(path)
    assert w.requests == len(inp)
    assert w.input_tokens.p50 == _p50_sorted(inp)  # the report: 6,940 from the sketch vs 6,909 exact
    assert w.output_tokens.p50 == _p50_sorted(out)


# ------------------------------------------------------------------------------- terminal safety


def test_control_characters_from_the_input_are_escaped_in_errors(tmp_path):
    p = tmp_path / "ctrl.jsonl"
    p.write_text('{"ev\\u001b]0;pwned\\u0007il\\u0000": 1}\n')
    last = one_line_error(tmp_path, p)
    assert "\x1b" not in last and "\x07" not in last and "\x00" not in last
    assert "ev\\x1b]0;pwned\\x07il\\x00" in last


def test_control_characters_are_escaped_in_malformed_row_reasons(tmp_path):
    p = mooncake(tmp_path, '{"timestamp": 5, "input_length": "12\\u001b[31m\\u009b", "output_length": 1}')
    code, stdout, err, _ = profile(tmp_path, p)
    reason = json.loads(stdout)["workload"]["malformed_examples"][0]["reason"]
    assert code == 0 and "\\x1b[31m\\x9b" in reason and "\x1b" not in reason and "\x9b" not in reason
    assert "\x1b" not in err and "\x9b" not in err


def test_control_characters_in_the_file_name_are_escaped(tmp_path):
    p = tmp_path / "a\x1b[2Jb.csv"
    p.write_text("")
    last = one_line_error(tmp_path, p)
    assert "\x1b" not in last and "a\\x1b[2Jb.csv" in last


def test_printable_escapes_c0_c1_del_and_bidi():
    assert printable("a\x00b\x1bc\x7fd\x85e\u202ef\n") == "a\\x00b\\x1bc\\x7fd\\x85e\\u202ef\\n"
    assert printable("plain ascii") == "plain ascii"
    assert printable("x" * 50, 10) == "xxxxxxx..."


def test_user_error_from_the_library_is_one_line(tmp_path):
    p = mooncake(tmp_path, '{"timestamp": 5, "input_length": "\\n\\r", "output_length": 1}')
    with pytest.raises(UserError) as exc:
        read_trace(p, strict=True)
    assert "\n" not in str(exc.value) and "\r" not in str(exc.value)


def test_json_array_number_cut_at_a_chunk_boundary_is_read_whole():
    # found by the fuzz tests: "12" of a "123" split across two reads decoded as 12
    import io

    from kvtune.profile.readers.base import Malformed, json_array

    text = '[123, 0.5e3 , {"a": [1, 2]}, -7]'
    for chunk in (1, 2, 3, 5, 64):
        got = list(json_array(io.StringIO(text), "t.json", chunk=chunk))
        assert [obj for _, obj in got] == [123, 500.0, {"a": [1, 2]}, -7], (chunk, got)
    bad = list(json_array(io.StringIO("[1 2]"), "t.json", chunk=1))
    assert isinstance(bad[-1], Malformed) and "'2' after a value" in bad[-1].reason
