"""Property-based fuzzing of the profile loader (Hypothesis, seeded: ``derandomize=True``).

Contract: a profile YAML is either loaded (then every number in it is finite, and the lengths' statistics are
ordered) or refused with one :class:`UserError` line naming the file; never another exception, never a control
character from the input in the message. A number from the catalogue in tests/fuzz/tracegen.py set to a
non-finite, negative or absurd value is always refused, naming the field. Through the CLI, ``kvtune recommend
--profile FILE`` with such a profile exits 2 with one line before the model loads.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from tracegen import BAD_NUMBERS, PROFILE_NUMBERS, bad_number_profile, mutated_profile, set_path  # noqa: E402

from kvtune.cli import app  # noqa: E402
from kvtune.errors import UserError  # noqa: E402
from kvtune.modelspec import preset  # noqa: E402
from kvtune.profile import default_workload, load_profile, reference_hardware  # noqa: E402
from kvtune.profile.models import capacity_table, model_record  # noqa: E402
from kvtune.profile.schema import Profile, now_iso, profile_from_dict  # noqa: E402

FUZZ = settings(derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def _base() -> dict:
    hw = reference_hardware("h100-sxm").model_copy(update={"cpu_matmul_gflops": 120.0})
    w = default_workload()
    spec = preset("smollm2-135m")
    prof = Profile(kvtune_version="0.1.0", created=now_iso(), hardware=hw, workload=w, model=model_record(spec),
                   capacity=capacity_table(spec, hw, w))
    return prof.model_dump(mode="json")


BASE = _base()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-profiles")


def write(folder: Path, doc_or_text, name: str = "p.yaml") -> Path:
    path = folder / name
    text = doc_or_text if isinstance(doc_or_text, str) else yaml.safe_dump(doc_or_text, allow_unicode=True)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


def assert_one_clean_line(message: str, path: Path) -> None:
    assert "\n" not in message and "\r" not in message, message
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in message), repr(message)
    assert path.name in message, message


def numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_the_base_profile_loads(folder):
    assert load_profile(write(folder, BASE)).model_dump(mode="json") == BASE


@pytest.mark.parametrize("path,rule", PROFILE_NUMBERS, ids=[".".join(p) for p, _ in PROFILE_NUMBERS])
def test_every_catalogued_number_refuses_every_bad_value(folder, path, rule):
    for value in BAD_NUMBERS:
        p = write(folder, set_path(BASE, path, value))
        with pytest.raises(UserError) as info:
            load_profile(p)
        assert f"field {'.'.join(path)}" in str(info.value), (value, str(info.value))
        assert_one_clean_line(str(info.value), p)


@settings(FUZZ, max_examples=40)
@given(case=bad_number_profile(BASE))
def test_bad_numbers_are_refused_in_one_line(folder, case):
    doc, rule = case
    p = write(folder, doc)
    with pytest.raises(UserError) as info:
        load_profile(p)
    assert_one_clean_line(str(info.value), p)


@settings(FUZZ, max_examples=500)
@given(doc=mutated_profile(BASE))
def test_mutated_profiles_load_or_are_refused_in_one_line(doc):
    # the document as load_profile sees it after YAML (the YAML layer has its own test below): fast, so many cases
    where = "mutated.yaml"
    try:
        prof = profile_from_dict(doc, where)
    except UserError as exc:
        assert_one_clean_line(str(exc), Path(where))
        return
    dumped = prof.model_dump(mode="json")
    assert all(math.isfinite(x) for x in numbers(dumped))
    if prof.workload is not None:
        for s in (prof.workload.input_tokens, prof.workload.output_tokens, prof.workload.total_tokens):
            assert s.min <= s.p50 <= s.p90 <= s.p99 <= s.max


RAW = st.one_of(
    st.text(max_size=300),
    st.sampled_from([
        "", "~\n", "[]\n", "hardware: [unclosed\n", "hardware: !!python/object/apply:os.system ['echo x']\n",
        "hardware: {cpu_ram_total_bytes: .inf}\n", "hardware:\n  name: x\n  source: measured\n  cpu_ram_total_bytes: "
        + "9" * 5000 + "\n  cpu_ram_available_bytes: 1\n",
        "hardware: " + "[" * 3000 + "]" * 3000 + "\n", "schema_version: 99999999999999999999999\nhardware: {}\n",
        "hardware:\n  name: \"\\e]0;pwned\\a\"\n", "\x1b]0;pwned\x07: 1\n", "\ufeffhardware: {}\n",
    ]),
    st.builds(lambda doc, cut: yaml.safe_dump(doc)[:cut], mutated_profile(BASE), st.integers(0, 4000)),
)


@settings(FUZZ, max_examples=100)
@given(text=RAW)
def test_raw_yaml_text_loads_or_is_refused_in_one_line(folder, text):
    p = write(folder, text)
    try:
        load_profile(p)
    except UserError as exc:
        assert_one_clean_line(str(exc), p)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
def test_fifo_profile_is_refused_not_read(tmp_path):
    fifo = tmp_path / "p.yaml"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="is not a regular file"):
        load_profile(fifo)


@settings(FUZZ, max_examples=8)
@given(case=bad_number_profile(BASE))
def test_recommend_with_a_bad_profile_is_one_line_exit_2(folder, case):
    doc, _ = case
    p = write(folder, doc, "cli-profile.yaml")
    out = folder / "pipeline.yaml"
    r = CliRunner().invoke(app, ["recommend", "--profile", str(p), "--scenario", "multi-turn", "-o", str(out)])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 2, r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith("kvtune: error: ") and "cli-profile.yaml: field " in last
    assert not out.exists()
