"""Scenarios constrain the search; the Pareto front and the scenario's pick are computed correctly."""

from __future__ import annotations

import optuna
import pytest

from kvtune.errors import UserError
from kvtune.measure.tiers import Tiers
from kvtune.pipeline import CostResult, Measured, Pipeline, QualityResult, ServingResult, Stage
from kvtune.profile.hardware import reference_hardware
from kvtune.scenarios import PREFERENCES, SCENARIOS, get_scenario
from kvtune.search import choose, pareto_front, suggest_pipeline
from kvtune.strategies import AXES, NONE, Stages

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
    mt = get_scenario("multi-turn").selection
    assert "none" in mt and all(AXES["selection"][m].multiturn_safe() for m in mt if m != NONE)
    acc = get_scenario("accuracy-critical")
    assert acc.selection == ("none",) and all(AXES["codec"][c].lossless for c in acc.codecs)
    assert acc.max_quality_loss == 0.0


def test_unknown_scenario_is_one_line():
    with pytest.raises(UserError, match="unknown scenario .*known: long-context"):
        get_scenario("fast")


def _p(label: str, loss: float, bpt: float, tps: float, ttft: float = 100.0, exposed: float = 0.0,
       batch: int = 4) -> Pipeline:
    q = QualityResult(quality_loss=loss, kl_mean=loss, kl_max=loss, top1_agreement=1.0, perplexity=1.0,
                      perplexity_full=1.0, eval_tokens=1)
    c = CostResult(bytes_per_token=bpt, bytes_per_token_full=100.0, compression_ratio=100.0 / bpt, context_tokens=10,
                   capacity_seqs=1, capacity_full_seqs=1, memory_budget_bytes=1000, backend="torch-cpu", device="cpu")
    sv = ServingResult(target="t", tpot_target_ms=50.0, batch=batch, max_batch=batch, batch_bound="device pool",
                       tpot_ms=20.0, tokens_per_s=tps, decode_tokens_per_s=tps, ttft_ms=ttft, decode_context=10.0,
                       weights_ms=10.0, kv_ms=10.0 - exposed / 2, compute_ms=1.0, copy_ms=exposed, exposed_copy_ms=exposed,
                       overhead_ms=0.0, hit_rate_device=0.0, hit_rate_lower=0.0, prompt_recomputed=1.0)
    return Pipeline(name=label, codec=Stage(method="kivi", params={"bits": int(label[1:]) if label[1:].isdigit() else 4}),
                    measured=Measured(quality=q, cost=c, serving=sv))


def test_every_scenario_prefers_a_known_figure():
    assert {s.prefer for s in SCENARIOS.values()} <= set(PREFERENCES)
    assert get_scenario("multi-turn").prefer == get_scenario("datacenter").prefer == "throughput"
    assert get_scenario("edge").prefer == get_scenario("long-context").prefer == "memory"
    assert get_scenario("prefill-heavy").prefer == "ttft"


def test_pareto_front_and_preferences():
    a = _p("a2", 0.0, 100.0, 100.0, ttft=50.0)   # baseline
    b = _p("b4", 0.01, 30.0, 300.0, ttft=60.0)   # good trade-off
    c = _p("c8", 0.5, 15.0, 350.0, ttft=70.0)    # tiny but lossy
    d = _p("d16", 0.02, 40.0, 250.0, ttft=80.0)  # dominated by b
    front = pareto_front([a, b, c, d])
    assert {p.name for p in front} == {"a2", "b4", "c8"}
    pick, ok = choose([a, b, c, d], get_scenario("multi-turn"))  # throughput within loss 0.1
    assert ok and pick.name == "b4"
    pick, ok = choose([a, b, c, d], get_scenario("long-context"))  # memory within loss 0.5
    assert ok and pick.name == "c8"
    pick, ok = choose([a, b, c, d], get_scenario("prefill-heavy"))  # TTFT within loss 0.1
    assert ok and pick.name == "a2"
    pick, ok = choose([a, b, c, d], get_scenario("accuracy-critical"))
    assert ok and pick.name == "a2"
    pick, ok = choose([b, c], get_scenario("accuracy-critical"))  # nothing lossless: lowest loss, flagged
    assert not ok and pick.name == "b4"


def test_a_tier_that_exposes_more_copy_than_its_step_is_never_picked():
    a = _p("a2", 0.0, 100.0, 100.0)
    greedy = _p("b4", 0.0, 30.0, 900.0, exposed=15.0)  # 15 ms of a 20 ms step is exposed copy
    pick, ok = choose([a, greedy], get_scenario("multi-turn"))
    assert ok and pick.name == "a2"
    missed = _p("c8", 0.0, 30.0, 0.0, batch=0)  # misses the TPOT target even at batch 1
    assert choose([missed], get_scenario("datacenter")) == (missed, False)


def test_precheck_rejects_what_cannot_fit():
    from kvtune.modelspec import preset

    spec = preset("llama-3.1-8b")
    hw = reference_hardware("h100-sxm", fill_host=False).model_copy(update={
        "gpu_memory_total_bytes": int(8 * 2**30 / 0.9) + 1, "cpu_ram_total_bytes": 2**36, "cpu_ram_available_bytes": 2**36})
    tiers = Tiers.from_hardware(hw, 0)
    full = Stages.of(Pipeline())
    per_seq = 131072 * spec.kv_bytes_per_token()  # 16 GiB at 128K tokens
    assert "16.00 GiB" in tiers.check(full.placement, per_seq, 0)
    kivi2 = Stages.of(Pipeline(codec=Stage(method="kivi", params={"bits": 2})))
    assert tiers.check(kivi2.placement, per_seq / 7, 0) is None
    disk = Stages.of(Pipeline(placement=Stage(method="offload", params={"tier": "disk", "gpu_fraction": 0.5})))
    assert "free disk not measured" in tiers.check(disk.placement, per_seq / 2, per_seq / 2)


def test_exporters_know_every_built_in_selector():
    from kvtune.export._common import KNOWN_SELECTIONS
    from kvtune.strategies import SELECTORS

    assert set(KNOWN_SELECTIONS) == {NONE, *SELECTORS}
