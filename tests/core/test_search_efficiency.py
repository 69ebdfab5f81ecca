"""benchmarks/search.py's machinery on a synthetic cached grid: the discretized space, the replay (nothing
measured, repeats free, the multi-fidelity cost rule) and the hypervolume score. The real grid's numbers are in
docs/benchmarks.md; here the grid's figures are made up so every expectation can be computed by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kvtune.pipeline import CostResult, Measured, Pipeline, QualityResult, ServingResult
from kvtune.search import choose

spec = importlib.util.spec_from_file_location("bench_search", Path(__file__).parents[2] / "benchmarks" / "search.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)  # type: ignore[union-attr]


def _with(p: Pipeline, loss: float, tps: float, bpt: float) -> Pipeline:
    q = QualityResult(quality_loss=loss, kl_mean=loss, kl_max=loss, top1_agreement=1.0, perplexity=1.0,
                      perplexity_full=1.0, eval_tokens=1)
    m = Measured.model_construct(quality=q, cost=CostResult.model_construct(bytes_per_token=bpt),
                                 serving=ServingResult.model_construct(tokens_per_s=tps, ttft_ms=1.0, batch=4,
                                                                       exposed_copy_ms=0.0, tpot_ms=10.0))
    return p.model_copy(update={"measured": m})


@pytest.fixture
def small_grid(monkeypatch):
    """A 20-point slice of the grid (the replays below run TPE a few hundred trials; the real grid's 54 points
    would make them minutes on a loaded 2-core machine): StreamingLLM 30/60%, SnapKV 30%, fp8 e4m3, int8 g32,
    KIVI 2/4-bit g32."""
    monkeypatch.setattr(bench, "GRID_VALUES", {"streaming_llm.budget": [0.3, 0.6], "snapkv.budget": [0.3],
                                               "kivi.bits": [2, 4]})
    assert len(bench.enumerate_grid(bench.grid_scenario())) == 20


def synthetic_grid() -> tuple[dict, dict]:
    """Loss grows as the kept budget shrinks and with 2-bit KIVI; bytes shrink with both; tokens/s follow bytes."""
    points, built = {}, {}
    for p in bench.enumerate_grid(bench.grid_scenario()):
        keep = float(p.selection.params.get("budget", 1.0))
        bits = {"fp16": 16, "fp8": 8, "int8": 8, "kivi": int(p.codec.params.get("bits", 4))}[p.codec.method]
        loss = (1 - keep) * 0.15 + {16: 0.0, 8: 0.01, 4: 0.05, 2: 0.5}[bits]
        bpt = 1000.0 * keep * bits / 16
        built[p.label()] = _with(p, round(loss, 6), 1e6 / (200 + bpt), bpt)
        bound = 0.5 if bits == 2 else 0.0  # 2-bit KIVI fails the probes: stopped by the slice
        points[p.label()] = {"full_s": 10.0, "probe_s": 2.0, "probe_bound": bound}
    return points, built


def _values(method: str, param: str) -> list:
    return bench.GRID_VALUES.get(f"{method}.{param}", bench.GRID_VALUES.get(param, [None]))


def test_grid_is_the_discretized_space() -> None:
    grid = bench.enumerate_grid(bench.grid_scenario())
    labels = [p.label() for p in grid]
    n_sel = sum(1 if m == "none" else len(_values(m, "budget")) for m in bench.GRID_SELECTION)
    n_codec = sum({"fp16": 1, "fp8": len(_values("fp8", "fmt")), "int8": len(_values("int8", "group_size")),
                   "kivi": len(_values("kivi", "bits")) * len(_values("kivi", "group_size"))}[c]
                  for c in bench.GRID_CODECS)
    assert len(labels) == len(set(labels)) == n_sel * n_codec
    assert "none + fp16 @ gpu" in labels and labels[0] == "none + fp16 @ gpu"
    # the target is at 15% of the grid's evaluations: enough of them to hold a front
    assert round(bench.TARGET_BUDGET * len(labels)) >= 7


def test_scorer_and_replay_against_the_cache(small_grid) -> None:
    points, built = synthetic_grid()
    scen = bench.grid_scenario()
    scorer = bench.Scorer(list(built.values()), scen)
    assert scorer.score(list(built.values()))["hv_ratio"] == pytest.approx(1.0)
    assert scorer.score([built["none + fp16 @ gpu"]])["hv_ratio"] < 1.0
    assert scorer.grid_pick.label() == choose(list(built.values()), scen)[0].label()
    n = len(built)
    for kind in ("kvtune", "kvtune-cold", "random", "nsga2"):
        marks = bench.replay(kind, 0, points, built, scen, scorer)
        assert [m["budget"] for m in marks] == list(bench.BUDGETS)
        for m in marks:  # plain samplers: one evaluation per distinct candidate, repeats free
            assert m["evaluations"] == max(1, round(m["budget"] * n))
            assert 0.0 <= m["hv_ratio"] <= 1.0 + 1e-9
        assert marks[-1]["hv_ratio"] >= marks[0]["hv_ratio"]


def test_multi_fidelity_costs_the_slice_and_keeps_the_pick(small_grid) -> None:
    points, built = synthetic_grid()
    scen = bench.grid_scenario()
    scorer = bench.Scorer(list(built.values()), scen)
    marks = bench.replay("kvtune+mf", 0, points, built, scen, scorer)
    for m in marks:  # a candidate costs 1 (the full trial reuses its slice) or 0.2 (stopped): evaluations >= budget
        assert m["evaluations"] >= round(m["budget"] * len(built)) - 1e-9
        steps = round(m["evaluations"] / 0.2, 6)
        assert steps == pytest.approx(round(steps))  # a sum of 0.2 and 1.0 costs
    # the same trials cost less than without early stops: some 2-bit KIVI candidate was stopped by 50%
    assert any(round(m["evaluations"], 6) != round(m["evaluations"]) for m in marks)
    # a stopped candidate (2-bit KIVI) is infeasible in full, so it is never the grid's pick either
    assert built[scorer.grid_pick.label()].codec.params.get("bits") != 2


@pytest.fixture(scope="module")
def mf_ctx(smol):
    """datacenter restricted to no selection x {fp16, KIVI}, on the quick evaluation set without conversations."""
    import dataclasses

    from kvtune.commands.common import load_hardware
    from kvtune.measure.quality import EvalConfig, build_eval_set
    from kvtune.measure.target import build_target
    from kvtune.profile.workload import default_workload
    from kvtune.scenarios import get_scenario
    from kvtune.search import SearchContext

    hw, _ = load_hardware(None, "h100-sxm")
    target = build_target(hardware=hw, workload=default_workload(), loaded=smol, target=None, context=512,
                          tpot_ms=None, default_tpot_ms=100.0)
    cfg = dataclasses.replace(EvalConfig.quick(), multiturn_items=0)
    evalset = build_eval_set(smol.model, smol.tokenizer, cfg, attention_sums=False)
    scen = dataclasses.replace(get_scenario("datacenter"), selection=("none",), codecs=("fp16", "kivi"))
    return SearchContext(model=smol.model, evalset=evalset, eval_config=cfg, target=target, scenario=scen)


KIVI2 = {"selection": "none", "codec": "kivi", "placement": "gpu", "kivi.bits": 2, "kivi.group_size": 32,
         "kivi.residual": 64}


def test_run_study_stops_a_hopeless_candidate_after_the_probe_slice(smol, mf_ctx, tmp_path) -> None:
    """2-bit KIVI misses a probe the full cache answers: the slice bounds its loss above datacenter's 0.1 ceiling,
    so the trial ends there, infeasible (constraint > 0), with the bound as its loss and no stored pipeline."""
    import optuna

    from kvtune.measure.quality import probe_loss_bound
    from kvtune.search import ATTR_STOPPED, run_study
    from kvtune.strategies import Stages

    ctx, scen = mf_ctx, mf_ctx.scenario
    p2 = Stages.of(Pipeline.model_validate(
        {"schema_version": 1, "codec": {"method": "kivi", "params": {"bits": 2, "group_size": 32, "residual": 64}}}))
    bound = probe_loss_bound(smol.model, ctx.evalset, p2, ctx.eval_config)
    if bound is None or bound <= scen.max_quality_loss:
        pytest.skip(f"2-bit KIVI keeps every probe on this build (bound {bound}); nothing to stop")
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=storage, study_name="mf", directions=["minimize"] * 3)
    study.enqueue_trial(KIVI2)
    lines: list[str] = []
    out = run_study(ctx, trials=1, storage=storage, study_name="mf", model_source=smol.identity,
                    on_trial=lambda _n, _p, text, _new: lines.append(text))
    assert out.trials == [] and len(out.pruned) == 1 and "stopped after the probe slice" in out.pruned[0][1]
    assert len(lines) == 1 and lines[0].startswith("none + kivi(bits=2,group_size=32,residual=64")  # names the candidate
    assert lines[0].endswith(f" @ gpu: {out.pruned[0][1]}")
    t = optuna.load_study(study_name="mf", storage=storage).trials[0]
    assert t.state == optuna.trial.TrialState.COMPLETE and t.values[0] == pytest.approx(bound)
    assert t.user_attrs[ATTR_STOPPED] == pytest.approx(bound) and "pipeline" not in t.user_attrs
    assert t.constraints["quality_loss"] == pytest.approx(bound - scen.max_quality_loss)


def test_a_continuing_candidate_reuses_the_slice(smol, mf_ctx, tmp_path, monkeypatch) -> None:
    """A candidate the slice does not stop is measured in full with the slice's probe outcomes: each probe batch
    is scored once per trial (it was twice), and the quality is the same as measuring it from scratch."""
    import optuna

    import kvtune.measure.quality as quality
    from kvtune.search import run_study
    from kvtune.strategies import Stages

    ctx = mf_ctx
    pipeline = Pipeline.model_validate({"codec": {"method": "kivi", "params": {
        "bits": 4, "group_size": 32, "residual": 64, "value_window": "paper"}}})  # what the search space asks for
    kivi4 = Stages.of(pipeline)
    plain = quality.evaluate_quality(smol.model, ctx.evalset, kivi4, ctx.eval_config)
    outcomes = quality.probe_outcomes(smol.model, ctx.evalset, kivi4, ctx.eval_config)
    assert quality.evaluate_quality(smol.model, ctx.evalset, kivi4, ctx.eval_config, probes=outcomes) == plain
    with pytest.raises(ValueError, match="probe batches"):
        quality.evaluate_quality(smol.model, ctx.evalset, kivi4, ctx.eval_config, probes=[[True]] * 9)

    calls = []
    real = quality.batch_probe_correct
    monkeypatch.setattr(quality, "batch_probe_correct", lambda *a, **k: calls.append(1) or real(*a, **k))
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=storage, study_name="reuse", directions=["minimize"] * 3)
    study.enqueue_trial({"selection": "none", "codec": "kivi", "placement": "gpu", "kivi.bits": 4,
                         "kivi.group_size": 32, "kivi.residual": 64})
    out = run_study(ctx, trials=1, storage=storage, study_name="reuse", model_source=smol.identity)
    assert [p.label() for p in out.trials] == [pipeline.label()]
    assert len(calls) == len(ctx.evalset.probe_batches) > 0
    assert out.trials[0].measured.quality == plain


def test_repeats_are_free_and_do_not_count(smol, mf_ctx, tmp_path, monkeypatch) -> None:
    """``trials`` counts pipelines the study has not measured. On a one-point space every trial after the first is
    a repeat: recorded from the stored figures (measured once), reported as a repeat, not counted; the run stops
    after REPEAT_ALLOWANCE x trials."""
    import dataclasses

    import kvtune.search as search

    one = dataclasses.replace(mf_ctx.scenario, codecs=("fp16",), placements=("gpu",))
    ctx = dataclasses.replace(mf_ctx, scenario=one)
    calls: list[str] = []
    real = search.measure
    monkeypatch.setattr(search, "measure", lambda c, p, *a, **k: calls.append(p.label()) or real(c, p, *a, **k))
    seen: list[tuple[bool, str]] = []
    out = search.run_study(ctx, trials=2, storage=f"sqlite:///{tmp_path / 's.db'}", study_name="rep",
                           model_source=smol.identity, on_trial=lambda _n, _p, label, new: seen.append((new, label)))
    full = Pipeline().label()
    assert calls == [full]
    assert out.new_candidates == 1 and out.new_trials == 2 * search.REPEAT_ALLOWANCE == len(seen)
    assert [new for new, _ in seen] == [True] + [False] * (len(seen) - 1)
    assert seen[0][1] == full and all(label == f"repeat of {full}" for _, label in seen[1:])
    assert [p.label() for p in out.trials] == [full] * len(seen)  # each trial holds the stored figures
    assert len({p.measured.model_dump_json() for p in out.trials}) == 1


# -- the sampler setup recommend runs (kvtune.search) ------------------------------------------------------------
def _scenarios() -> list:
    """Every scenario, plain and narrowed to every stack's default profile that can run it."""
    from kvtune.errors import UserError
    from kvtune.scenarios import SCENARIOS
    from kvtune.stacks import STACKS, default_profile, narrow

    out = []
    for scen in SCENARIOS.values():
        out.append(scen)
        for stack in STACKS:
            try:
                out.append(narrow(scen, default_profile(stack)))
            except UserError:
                pass
    return out


def test_warm_starts_are_points_of_every_scenarios_space() -> None:
    """Each enqueued warm start is a point the trial really offers in that scenario (Optuna would warn and run an
    out-of-range value), the pipeline builds, and the full cache comes first wherever it is allowed."""
    import warnings

    import optuna

    from kvtune.search import WARM_START, make_sampler, suggest_pipeline, warm_start
    from kvtune.strategies import Stages

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for scen in _scenarios():
        starts = warm_start(scen)
        if scen.allows("selection", "none") and scen.allows("codec", "fp16") and scen.allows("placement", "gpu"):
            assert starts[0] == WARM_START[0]
        assert all(w in WARM_START for w in starts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study = optuna.create_study(directions=["minimize"] * 3, sampler=make_sampler(0, len(starts)))
        for params in starts:
            study.enqueue_trial(params)
        for params in starts:
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*out of range.*")
                trial = study.ask()
                pipeline = suggest_pipeline(trial, scen)
            asked = {k: v for k, v in params.items() if k in trial.params}  # a stack variant may fix the rest
            assert asked == {k: trial.params[k] for k in asked} and {"selection", "codec", "placement"} <= set(asked)
            Stages.of(pipeline)
            study.tell(trial, [0.0, 0.0, 0.0])


def test_constraint_sign_is_optunas() -> None:
    """violation() <= 0 exactly when the quality is within the scenario (Optuna: <= 0 feasible), and the sampler
    ranks an infeasible trial by how far it is over."""
    import dataclasses

    from kvtune.pipeline import QualityResult
    from kvtune.scenarios import followup_ok, get_scenario
    from kvtune.search import violation

    def q(loss: float, followup: float | None = None) -> QualityResult:
        return QualityResult(quality_loss=loss, kl_mean=loss, kl_max=loss, top1_agreement=1.0, perplexity=1.0,
                             perplexity_full=1.0, eval_tokens=1, followup_retention=followup)

    dc = get_scenario("datacenter")
    assert violation(q(dc.max_quality_loss - 0.01), dc) == pytest.approx(-0.01)
    assert violation(q(dc.max_quality_loss), dc) <= 0
    assert violation(q(dc.max_quality_loss + 0.25), dc) == pytest.approx(0.25)
    mt = get_scenario("multi-turn")
    assert mt.max_followup_drop is not None
    ok, lost = q(0.0, followup=1.0), q(0.0, followup=1.0 - mt.max_followup_drop - 0.5)
    assert violation(ok, mt) <= 0 and followup_ok(ok, mt)
    assert violation(lost, mt) == pytest.approx(0.5) and not followup_ok(lost, mt)
    assert violation(q(0.05, followup=None), dataclasses.replace(mt, max_quality_loss=0.1)) == pytest.approx(-0.05)


def test_replay_runs_the_sampler_recommend_runs(small_grid, monkeypatch) -> None:
    """The benchmark's kvtune rows use kvtune.search's make_sampler, told how many warm starts come first, and
    the warm starts recommend enqueues, in the same order."""
    import kvtune.search as search

    points, built = synthetic_grid()
    scen = bench.grid_scenario()
    scorer = bench.Scorer(list(built.values()), scen)
    made, asked = [], []
    real = search.make_sampler

    def spy(seed: int, warm: int = 0):
        made.append((seed, warm))
        return real(seed, warm)

    monkeypatch.setattr(bench, "make_sampler", spy)
    real_suggest = bench.suggest_pipeline

    def suggest(grid_trial, s):
        pipeline = real_suggest(grid_trial, s)
        asked.append(dict(grid_trial.trial.params))
        return pipeline

    monkeypatch.setattr(bench, "suggest_pipeline", suggest)
    bench.replay("kvtune", 3, points, built, scen, scorer)
    starts = search.warm_start(scen)
    assert made == [(3, len(starts))]
    assert len(asked) >= len(starts)
    for params, got in zip(starts, asked):  # the first trials are the warm starts, in order
        assert {"selection", "codec", "placement"} <= set(got)
        assert {k: got[k] for k in params if k in got} == {k: v for k, v in params.items() if k in got}
