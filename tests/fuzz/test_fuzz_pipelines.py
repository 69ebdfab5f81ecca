"""Property-based fuzzing of the pipeline loader (Hypothesis, seeded): generated documents and raw YAML text.

Contract: every input is either accepted (a pipeline every strategy can build) or refused with one
:class:`UserError` line naming the file; never another exception. Documents built from the catalogue of
known-bad values (tests/fuzz/fuzzgen.py) are always refused, documents built from documented-valid values are
always accepted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).parent))
from fuzzgen import invalid_docs, random_docs, raw_yaml_text, to_yaml, valid_docs  # noqa: E402

from kvtune.errors import UserError  # noqa: E402
from kvtune.pipeline import load_pipeline  # noqa: E402

HC = list(HealthCheck)  # fixtures are read-only here; generation speed is bounded by max_examples


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-pipelines")


def load_text(folder: Path, text: str, name: str = "p.yaml"):
    path = folder / name
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return load_pipeline(path)


def assert_one_line(exc: UserError, where: str) -> None:
    message = str(exc)
    assert "\n" not in message and "\r" not in message, message
    assert where in message, message


@settings(derandomize=True, max_examples=60, deadline=None, suppress_health_check=HC)
@given(doc=valid_docs)
def test_valid_documents_are_accepted(folder, doc):
    pipeline = load_text(folder, to_yaml(doc))
    assert pipeline.selection.method == doc["selection"]["method"]


@settings(derandomize=True, max_examples=150, deadline=None, suppress_health_check=HC)
@given(case=invalid_docs())
def test_known_bad_documents_are_refused_in_one_line(folder, case):
    doc, rule = case
    with pytest.raises(UserError) as info:
        load_text(folder, to_yaml(doc))
    assert_one_line(info.value, "p.yaml")


@settings(derandomize=True, max_examples=150, deadline=None, suppress_health_check=HC)
@given(doc=random_docs())
def test_random_documents_never_crash(folder, doc):
    try:
        load_text(folder, to_yaml(doc))
    except UserError as exc:
        assert_one_line(exc, "p.yaml")


@settings(derandomize=True, max_examples=100, deadline=None, suppress_health_check=HC)
@given(text=raw_yaml_text)
def test_raw_text_never_crashes(folder, text):
    try:
        load_text(folder, text)
    except UserError as exc:
        assert_one_line(exc, "p.yaml")


def test_python_tags_and_alias_bombs_are_refused(folder):
    with pytest.raises(UserError, match="could not determine a constructor|invalid YAML"):
        load_text(folder, "schema_version: !!python/object/apply:os.system ['echo pwned']\n")
    bomb = "schema_version: 1\na: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(  # 12 levels of 9 aliases: 9**12 leaves
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(12))
    with pytest.raises(UserError, match="more than 100 aliases"):
        load_text(folder, bomb)
    with pytest.raises(UserError, match="nested deeper than 64 levels"):
        load_text(folder, "schema_version: 1\nname: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(UserError, match="empty document"):
        load_text(folder, "")
