"""The pipeline document: strict schema, versioning, exact YAML round-trip, one-line errors."""

from __future__ import annotations

import pytest
import yaml

from kvtune.errors import UserError
from kvtune.pipeline import (
    CostResult, Measured, ModelInfo, Pipeline, Provenance, QualityResult, Stage, load_pipeline,
)


def _measured() -> Measured:
    q = QualityResult(quality_loss=0.0123456789, kl_mean=0.0123456789, kl_max=0.5, top1_agreement=0.96875,
                      perplexity=11.607, perplexity_full=11.5, passkey_accuracy=0.9, passkey_full_accuracy=1.0,
                      probe_retention=0.9, eval_tokens=192, eval_context_tokens=[1536, 1470])
    c = CostResult(bytes_per_token=7256.0, bytes_per_token_full=23040.0, compression_ratio=3.1753, decode_latency_ms=1.25,
                   decode_latency_full_ms=1.0 / 3.0, context_tokens=8735, capacity_seqs=343, capacity_full_seqs=108,
                   memory_budget_bytes=21_846_885_350, backend="torch-cpu", device="cpu", notes=["a note"])
    return Measured(quality=q, cost=c, trial=3, seconds=2.5)


def test_yaml_round_trip_is_exact():
    p = Pipeline(
        name="x", selection=Stage(method="snapkv", params={"budget": 0.25, "window": 32, "pooling": "max"}),
        codec=Stage(method="kivi", params={"bits": 4, "group_size": 32, "residual": 128}),
        measured=_measured(),
        provenance=Provenance(kvtune_version="0.1.0", created="2026-11-22T10:00:00+00:00", scenario="edge", seed=7,
                              model=ModelInfo(name="m", source="s", layers=30, kv_heads=3, q_heads=9, head_dim=64,
                                              dtype="float16")),
    )
    text = p.to_yaml()
    back = Pipeline.from_dict(yaml.safe_load(text))
    assert back == p
    assert back.to_yaml() == text
    # budget stays a ratio (float) and token counts stay ints through YAML
    assert isinstance(back.selection.params["budget"], float)
    assert isinstance(back.codec.params["bits"], int)
    assert back.measured.cost.decode_latency_full_ms == 1.0 / 3.0


def test_defaults_are_the_full_cache():
    p = Pipeline()
    assert p.is_identity()
    assert p.label() == "none + fp16 @ gpu"


@pytest.mark.parametrize(
    "doc, fragment",
    [
        ({"schema_version": 1, "selection": {"method": "snapkv", "parms": {}}}, "selection.parms': unknown field"),
        ({"schema_version": 1, "extra": 1}, "'extra': unknown field"),
        ({"schema_version": 3}, "newer than this kvtune understands"),
        ({"selection": {"method": "none"}}, "missing 'schema_version'"),
        ({"schema_version": 1, "switches": {"gpu_memory_fraction": 1.5}}, "switches.gpu_memory_fraction"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_malformed_documents_give_one_line(doc, fragment):
    with pytest.raises(UserError) as err:
        Pipeline.from_dict(doc, where="p.yaml")
    msg = str(err.value)
    assert fragment in msg and msg.startswith("p.yaml:") and "\n" not in msg


def test_load_pipeline_reports_yaml_syntax_with_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: 1\nselection: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml: line \d+, column \d+: invalid YAML"):
        load_pipeline(bad)
    with pytest.raises(UserError, match="no such file"):
        load_pipeline(tmp_path / "missing.yaml")
