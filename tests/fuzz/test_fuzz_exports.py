"""Property-based fuzzing of the exporters (Hypothesis, seeded): hostile text cannot add a key or a statement.

A pipeline's name, its model's name and source, and a plugin strategy's free-text parameter (the only strings
that reach an exported file unchecked) are drawn from hostile text: newlines and every other YAML line break,
NUL, terminal escapes, triple quotes, YAML syntax. Each exported file is parsed back and compared with the
export of the same pipeline with harmless text: the same YAML keys and values, the same JSON, the same Python
statements (string constants blanked). Invalid pipelines are never rendered.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from fuzzgen import file_shape, hostile_text, invalid_docs, valid_docs  # noqa: E402

from kvtune.errors import UserError  # noqa: E402
from kvtune.export import TARGETS, render_pipeline  # noqa: E402
from kvtune.pipeline import Pipeline  # noqa: E402
from kvtune.strategies import SELECTORS, ScoreInputs, Selector  # noqa: E402

HC = list(HealthCheck)
MODEL = {"name": "llama", "source": "meta-llama/Llama-3.1-8B-Instruct", "layers": 32, "kv_heads": 8, "q_heads": 32,
         "head_dim": 128, "dtype": "bfloat16"}


@dataclass
class Tagged(Selector):
    """A plugin selector with a free-text parameter (the way a third-party strategy could carry one)."""

    name: ClassVar[str] = "tagged"
    tag: str = "x"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        b, h, t, _ = inputs.keys.shape
        return torch.arange(t, dtype=torch.float32).expand(b, h, t)

    @classmethod
    def search_space(cls, trial: Any, scenario: Any) -> dict[str, Any]:
        return {}


@pytest.fixture(autouse=True)
def tagged_plugin():
    SELECTORS[Tagged.name] = Tagged
    yield
    SELECTORS.pop(Tagged.name, None)


def with_text(doc: dict, name: str, model_name: str, source: str, tag: str | None) -> Pipeline:
    doc = copy.deepcopy(doc)
    doc["name"] = name
    doc["provenance"] = {"kvtune_version": "0", "created": "2025-01-01T00:00:00+00:00",
                         "model": {**MODEL, "name": model_name, "source": source}}
    if tag is not None:
        doc["selection"] = {"method": "tagged", "params": {"budget": 0.5, "tag": tag}}
    return Pipeline.from_dict(doc)


def shapes(pipeline: Pipeline) -> dict[str, Any]:
    return {r.filename: file_shape(r.filename, r.text) for _, r in render_pipeline(pipeline, TARGETS)}


@settings(derandomize=True, max_examples=80, deadline=None, suppress_health_check=HC)
@given(doc=valid_docs, name=hostile_text, model_name=hostile_text, source=hostile_text,
       tag=st.none() | hostile_text.filter(lambda t: len(t) <= 512))
def test_hostile_text_adds_no_key_and_no_statement(doc, name, model_name, source, tag):
    name, model_name, source = name[:512], model_name[:512], source[:512]
    hostile = shapes(with_text(doc, name, model_name, source, tag))
    plain = shapes(with_text(doc, "plain", "plain", source, None if tag is None else "plain"))
    assert hostile.keys() == plain.keys()
    for filename, shape in hostile.items():
        assert shape == plain[filename], f"{filename}: hostile text changed what the file says"


@settings(derandomize=True, max_examples=60, deadline=None, suppress_health_check=HC)
@given(case=invalid_docs())
def test_invalid_pipelines_are_never_rendered(case):
    doc, rule = case
    try:
        pipeline = Pipeline.from_dict(doc, where="p.yaml")
    except UserError:
        return  # refused by the schema already
    with pytest.raises(UserError) as info:
        render_pipeline(pipeline, TARGETS, where="p.yaml")
    assert "\n" not in str(info.value) and "p.yaml" in str(info.value)


def test_the_issue_name_injection_stays_a_comment():
    doc = {"schema_version": 1, "name": "x\n\nmax-num-seqs: 99999\n\nenforce-eager: true"}
    for _, rendered in render_pipeline(Pipeline.from_dict(doc), TARGETS):
        assert "\nmax-num-seqs: 99999" not in rendered.text and "\nenforce-eager" not in rendered.text
        if rendered.filename.endswith(".yaml"):
            assert "# pipeline name: x\\n\\nmax-num-seqs: 99999\\n\\nenforce-eager: true\n" in rendered.text
