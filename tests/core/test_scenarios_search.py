"""Scenarios constrain the search; the Pareto front and the scenario's pick are computed correctly."""

from __future__ import annotations

import optuna
import pytest

from kvtune.errors import UserError
from kvtune.pipeline import CostResult, Measured, Pipeline, QualityResult, Stage
from kvtune.scenarios import SCENARIOS, get_scenario
from kvtune.search import choose, pareto_front, precheck, suggest_pipeline
from kvtune.strategies import AXES, NONE
from kvtune.measure.kernels_cost import CostSetup
from kvtune.modelspec import ModelSpec
from kvtune.strategies import Stages

SURVEY = {"long-context", "minimal-change", "datacenter", "edge", "multi-turn", "prefill-heavy", "accuracy-critical"}


def test_the_seven_scenarios_exist_and_name_known_methods():
    assert set(SCENARIOS) == SURVEY
    for s in SCENARIOS.values():
        for axis, allowed in (("selection", s.selection), ("codec", s.codecs), ("placement", s.placements)):
            for method in allowed:
                assert method == NONE or method in AXES[axis], (s.name, axis, method)


@pytest.mark.parametrize("name", sorted(SURVEY))
def test_sampled_pipelines_never_leave_the_scenario(name):
    scenario = get_scenario(name)
    study = optuna.create_study(directions=["minimize"] * 3, sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(60):
        trial = study.ask()
        p = suggest_pipeline(trial, scenario)
        assert scenario.allows("selection", p.selection.method)
        assert scenario.allows("codec", p.codec.method)
        assert scenario.allows("placement", p.placement.method)
        Stages.of(p)  # every sampled combination builds
        study.tell(trial, [0.0, 0.0, 0.0])


def test_multi_turn_never_drops_and_accuracy_critical_is_lossless():
    assert get_scenario("multi-turn").selection == ("none",)
    acc = get_scenario("accuracy-critical")
    assert acc.selection == ("none",) and all(AXES["codec"][c].lossless for c in acc.codecs)
    assert acc.max_quality_loss == 0.0


def test_unknown_scenario_is_one_line():
    with pytest.raises(UserError, match="unknown scenario .*known: long-context"):
        get_scenario("fast")


def _p(label: str, loss: float, bpt: float, ms: float, cap: int) -> Pipeline:
    q = QualityResult(quality_loss=loss, kl_mean=loss, kl_max=loss, top1_agreement=1.0, perplexity=1.0,
                      perplexity_full=1.0, eval_tokens=1)
    c = CostResult(bytes_per_token=bpt, bytes_per_token_full=100.0, compression_ratio=100.0 / bpt, decode_latency_ms=ms,
                   decode_latency_full_ms=1.0, context_tokens=10, capacity_seqs=cap, capacity_full_seqs=1,
                   memory_budget_bytes=1000, backend="torch-cpu", device="cpu")
    return Pipeline(name=label, codec=Stage(method="kivi", params={"bits": int(label[1:]) if label[1:].isdigit() else 4}),
                    measured=Measured(quality=q, cost=c))


def test_pareto_front_and_preferences():
    a = _p("a2", 0.0, 100.0, 1.0, 1)     # baseline
    b = _p("b4", 0.01, 30.0, 2.0, 3)     # good trade-off
    c = _p("c8", 0.5, 15.0, 2.0, 6)      # tiny but lossy
    d = _p("d16", 0.02, 40.0, 3.0, 2)    # dominated by b
    front = pareto_front([a, b, c, d])
    assert {p.name for p in front} == {"a2", "b4", "c8"}
    pick, ok = choose([a, b, c, d], get_scenario("multi-turn"))  # capacity within loss 0.1
    assert ok and pick.name == "b4"
    pick, ok = choose([a, b, c, d], get_scenario("long-context"))  # memory within loss 0.5
    assert ok and pick.name == "c8"
    pick, ok = choose([a, b, c, d], get_scenario("accuracy-critical"))
    assert ok and pick.name == "a2"
    pick, ok = choose([b, c], get_scenario("accuracy-critical"))  # nothing lossless: lowest loss, flagged
    assert not ok and pick.name == "b4"


def test_precheck_rejects_what_cannot_fit():
    spec = ModelSpec("llama-8b-like", layers=32, kv_heads=8, q_heads=32, head_dim=128)
    tiny = CostSetup(spec=spec, context_tokens=131072, memory_budget_bytes=8 * 2**30)
    full = Stages.of(Pipeline())
    assert "16.00 GiB" in precheck(full, tiny)  # 128 KiB/token * 128K tokens
    kivi2 = Stages.of(Pipeline(codec=Stage(method="kivi", params={"bits": 2})))
    assert precheck(kivi2, tiny) is None
