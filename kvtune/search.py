"""The search: an Optuna multi-objective study over composed pipelines, every trial measured for real.

Objectives (all minimized): quality loss, the deployment's speed on the target hardware from the serving model
(minus output tokens/s at the scenario's TPOT target; time to first token for a scenario that prefers it), and
KV bytes per token. A scenario restricts each axis's methods and sets a quality-loss ceiling, given to the
sampler as a constraint (a trial above it is infeasible, not discarded). Before a trial costs anything, a
pre-check rejects candidates whose KV for one sequence cannot be placed in the target's tiers (pruned, with the
reason kept on the trial). A trial that runs out of memory is recorded as failed and the study goes on.

The first trial of a new study is always the full cache, so every report has its baseline; the known-good
pipelines the scenario allows follow (:data:`WARM_START`), then multivariate TPE (:func:`make_sampler`).
Multi-fidelity: a candidate first runs the probe slice of the evaluation set; when ``1 - probe_retention`` alone
puts its quality loss above the scenario's ceiling it stops there (:func:`stop_early`), recorded as infeasible with
that bound and listed with the rejected trials, never measured in full (it could not be the pick). Each trial's
complete measured pipeline is stored on the trial (``user_attrs["pipeline"]``), so a resumed study (same
``--storage`` and ``--study-name``) reports every earlier trial without measuring it again; a candidate
already measured in the study is not measured twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from kvtune.errors import UserError, printable
from kvtune.measure.kernels_cost import measure_cost
from kvtune.measure.quality import EvalConfig, EvalSet, evaluate_quality, probe_loss_bound, probe_outcomes
from kvtune.measure.target import Target
from kvtune.pipeline import Measured, Pipeline, Stage, Switches, validate_pipeline
from kvtune.scenarios import Scenario, followup_ok
from kvtune.stacks import stack_params
from kvtune.storage import fail_dead_trials, mark_worker, open_storage, redact_text, redact_url
from kvtune.strategies import AXES, NONE, Stages

ATTR_PIPELINE = "pipeline"
ATTR_REASON = "infeasible"
ATTR_STOPPED = "stopped_at_loss"  # multi-fidelity: the probe slice's lower bound on quality loss


def speed(p: Pipeline, prefer: str) -> float:
    """The speed objective (minimized): time to first token for ``ttft``, else minus tokens/s at the target."""
    sv = p.measured.serving  # type: ignore[union-attr]
    if sv is None:
        return math.inf
    return sv.ttft_ms if prefer == "ttft" else -sv.tokens_per_s


def objectives(p: Pipeline, prefer: str = "throughput") -> tuple[float, float, float]:
    m = p.measured
    assert m is not None
    return (m.quality.quality_loss, speed(p, prefer), m.cost.bytes_per_token)


def suggest_pipeline(trial: Any, scenario: Scenario) -> Pipeline:
    """Ask the trial for one method per axis (within the scenario) and that method's parameters."""
    stages: dict[str, Stage] = {}
    for axis, allowed in (("selection", scenario.selection), ("codec", scenario.codecs),
                          ("placement", scenario.placements)):
        method = trial.suggest_categorical(axis, list(allowed))
        params = {} if method == NONE else stack_params(trial, axis, method, scenario.stack,
                                                        AXES[axis][method].search_space, scenario)
        stages[axis] = Stage(method=method, params=params)
    return Pipeline(**stages, switches=Switches(prefix_caching=scenario.prefix_caching))


# The first trials of a new study, in order: the full cache (every report's baseline), then known-good pipelines
# from the literature that usually sit on the front: fp8 and int8 KV (2x, near lossless in vLLM/TensorRT-LLM
# practice) and 4-bit KIVI (4x; Liu et al., ICML 2024). Priors, not results: each is measured like any trial,
# and those a scenario does not allow are left out (warm_start). benchmarks/search.py shows what they buy.
WARM_START: tuple[dict[str, Any], ...] = (
    {"selection": NONE, "codec": "fp16", "placement": "gpu"},
    {"selection": NONE, "codec": "fp8", "placement": "gpu", "fp8.fmt": "e4m3", "fp8.scale": "head"},
    {"selection": NONE, "codec": "kivi", "placement": "gpu", "kivi.bits": 4},
    {"selection": NONE, "codec": "int8", "placement": "gpu"},
)


def warm_start(scenario: Scenario) -> list[dict[str, Any]]:
    """The :data:`WARM_START` trials the scenario allows (the full cache is always first)."""
    return [w for w in WARM_START if scenario.allows("selection", w["selection"]) and scenario.allows("codec", w["codec"])
            and scenario.allows("placement", w["placement"])]


STARTUP_TRIALS = 4  # trials before TPE models anything: the warm starts count, random trials fill the rest


def good_share(n: int) -> int:
    """How many of ``n`` finished trials TPE models as the good set ("below"): a third, at most 25. Optuna's
    default (a tenth) keeps one trial good until the tenth, so every other point of a multi-point front found so
    far (the warm starts: fp16, fp8, int8, KIVI-4) is modeled as bad and the sampler steers away from the region
    the front lies in. A third keeps the feasible front in the good set; infeasible trials fill it only when fewer
    than a third are feasible, least violating first (Optuna's constraint handling)."""
    return min(25, max(1, math.ceil(n / 3)))


def make_sampler(seed: int, warm: int = 0) -> Any:
    """kvtune's sampler: multivariate TPE with grouped decomposition (each method's parameters form their own
    group, so the sampler never models a parameter of a method the trial did not pick), :func:`good_share` of
    the trials as the good set, :data:`STARTUP_TRIALS` startup trials of which the ``warm`` warm starts
    (:func:`warm_start`) are the first (random trials only fill up to it), and the scenario's quality ceiling as
    a constraint (``set_constraint``, see :func:`violation`). ``benchmarks/search.py`` replays this exact setup
    against an exhaustively measured grid (docs/benchmarks.md, "Search efficiency")."""
    import optuna

    with warnings.catch_warnings():  # gamma: deprecated since Optuna 4.9 with no replacement, removed in 6.0
        warnings.simplefilter("ignore", FutureWarning)  # (pyproject pins optuna < 6); group: experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, gamma=good_share,
                                          n_startup_trials=max(STARTUP_TRIALS, warm))


@dataclass
class SearchContext:
    model: Any
    evalset: EvalSet
    eval_config: EvalConfig
    target: Target
    scenario: Scenario
    seed: int = 0
    multi_fidelity: bool = True  # stop a candidate after the probe slice when it can no longer be feasible
    # label -> quality measured on ``evalset``; contexts that share the evaluation set (per-length buckets measured
    # at the same length, kvtune.buckets) share this dict, so a pipeline's quality is measured once per set
    quality_memo: dict[str, Any] | None = None


def stop_early(ctx: SearchContext, stages: Stages, label: str) -> tuple[float | None, list[list[bool]] | None]:
    """Multi-fidelity rule: run the probe slice; (its lower bound on quality loss when that already exceeds the
    scenario's ceiling (the candidate can never be feasible, so never the pick), else None (measure it in full);
    the slice's per-item outcomes, which :func:`measure` reuses instead of scoring the probes again).

    With a shared ``quality_memo`` (length buckets measured on one evaluation set) the slice runs once per
    pipeline ``label``: a pipeline already measured in full skips it, a stopped one reuses its bound."""
    if not ctx.multi_fidelity:
        return None, None
    memo, key = ctx.quality_memo, f"{label} (probe slice)"
    if memo is not None and (label in memo or key in memo):
        return memo.get(key, (None, None))
    outcomes = probe_outcomes(ctx.model, ctx.evalset, stages, ctx.eval_config, ctx.seed)
    bound = probe_loss_bound(ctx.model, ctx.evalset, stages, ctx.eval_config, ctx.seed, outcomes=outcomes)
    result = (bound if bound is not None and bound > ctx.scenario.max_quality_loss + 1e-12 else None), outcomes
    if memo is not None and result[0] is not None:  # a continuing candidate's full quality is memoized by measure()
        memo[key] = result
    return result


def measure(ctx: SearchContext, pipeline: Pipeline, trial_number: int | None = None,
            probes: list[list[bool]] | None = None) -> Pipeline:
    """Measure quality and cost of one pipeline; returns a copy carrying ``measured``. ``probes``: the probe
    slice's outcomes (:func:`stop_early`) for this pipeline, reused rather than computed again."""
    stages = Stages.of(pipeline)
    started = time.perf_counter()
    memo, label = ctx.quality_memo, pipeline.label()
    quality = memo.get(label) if memo is not None else None
    if quality is None:
        quality = evaluate_quality(ctx.model, ctx.evalset, stages, ctx.eval_config, ctx.seed, probes)
        if memo is not None:
            memo[label] = quality
    cost = measure_cost(stages, ctx.target.cost, ctx.seed)
    serving = ctx.target.price(stages, pipeline, cost)
    measured = Measured(quality=quality, cost=cost, serving=serving, trial=trial_number,
                        seconds=round(time.perf_counter() - started, 3))
    return pipeline.model_copy(update={"measured": measured})


def fingerprint_fields(ctx: SearchContext, model_source: str) -> dict[str, Any]:
    """What must not change between runs (and workers) of one study: model (``model_source`` is
    :attr:`kvtune.models.LoadedModel.identity`, its content hash, so a worker whose copy lies at another path may
    join), evaluation set, cost setup, scenario. Stored on the study (``fingerprint_fields``) so a refused worker can say which one differs."""
    t = ctx.target
    doc = {"model": model_source, "eval": ctx.eval_config.__dict__, "scenario": ctx.scenario.name,
           "stack": ctx.scenario.stack.spec if ctx.scenario.stack is not None else None,
           "spec": t.spec.name, "context": t.cost.context_tokens, "hardware": t.hardware.name, "tpot": t.tpot_requested,
           "workload": t.workload.name if t.workload is not None else None}
    return json.loads(json.dumps(doc, sort_keys=True, default=str))


def eval_fingerprint(ctx: SearchContext, model_source: str) -> str:
    """A short hash of :func:`fingerprint_fields`: a study refuses runs whose hash differs."""
    return hashlib.sha256(json.dumps(fingerprint_fields(ctx, model_source), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class StudyOutcome:
    study_name: str
    trials: list[Pipeline]  # every completed trial, measured, in trial order
    pruned: list[tuple[int, str]] = field(default_factory=list)  # (trial number, reason)
    failed: list[tuple[int, str]] = field(default_factory=list)
    new_trials: int = 0  # trials this run added (repeats and pre-check rejections included)
    new_candidates: int = 0  # of them, pipelines the study had not measured
    resumed_trials: int = 0
    seconds: float = 0.0

    def pareto(self, prefer: str = "throughput") -> list[Pipeline]:
        return pareto_front(self.trials, prefer)


def pareto_front(pipelines: list[Pipeline], prefer: str = "throughput") -> list[Pipeline]:
    """Non-dominated pipelines on the three objectives (duplicates by label kept once)."""
    seen: dict[str, Pipeline] = {}
    for p in pipelines:
        seen.setdefault(p.label(), p)
    pts = list(seen.values())
    objs = {p.label(): objectives(p, prefer) for p in pts}
    front = []
    for p in pts:
        op = objs[p.label()]
        dominated = any(
            all(a <= b for a, b in zip(objs[q.label()], op)) and any(a < b for a, b in zip(objs[q.label()], op))
            for q in pts if q is not p
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: objs[p.label()])


def copy_hidden(p: Pipeline) -> bool:
    """No tier may expose more copy time than the step it serves: the copy prefetch cannot hide is at most the
    rest of the step (so offload at most doubles the step time)."""
    sv = p.measured.serving  # type: ignore[union-attr]
    return sv is None or sv.exposed_copy_ms <= sv.tpot_ms - sv.exposed_copy_ms + 1e-9


def feasible(p: Pipeline, scenario: Scenario) -> bool:
    """Within the quality ceiling, keeping the follow-up answers the scenario asks for (:func:`followup_ok`), no
    copy exposed beyond its step, and (throughput preference) one sequence at least meeting the TPOT target."""
    m = p.measured
    return (m is not None and m.quality.quality_loss <= scenario.max_quality_loss + 1e-12 and copy_hidden(p)
            and followup_ok(m.quality, scenario)
            and (m.serving is None or scenario.prefer in ("memory", "ttft") or m.serving.batch > 0))


def violation(quality: Any, scenario: Scenario) -> float:
    """The sampler's constraint (<= 0 feasible): how far the candidate is over the quality ceiling or the
    scenario's follow-up tolerance, whichever is more."""
    over = quality.quality_loss - scenario.max_quality_loss
    if scenario.max_followup_drop is not None and quality.followup_retention is not None:
        over = max(over, (1.0 - quality.followup_retention) - scenario.max_followup_drop)
    return over


def choose(pipelines: list[Pipeline], scenario: Scenario) -> tuple[Pipeline | None, bool]:
    """The scenario's pick among feasible Pareto-optimal trials: (pipeline, feasible). Feasible: quality loss
    within the scenario's ceiling, no offload copy exposed beyond the step it serves (:func:`copy_hidden`), and
    for a throughput preference at least one sequence meeting the TPOT target. If nothing is feasible, the
    lowest-loss trial is returned with ``feasible=False``."""
    if not pipelines:
        return None, False
    prefer = scenario.prefer
    ok = [p for p in pipelines if feasible(p, scenario)]
    if not ok:
        return min(pipelines, key=lambda p: objectives(p, prefer)), False
    front = pareto_front(ok, prefer)

    def key(p: Pipeline) -> tuple:
        q, sp, b = objectives(p, prefer)
        return {"throughput": (sp, q, b), "ttft": (sp, q, b), "memory": (b, q, sp), "quality": (q, sp, b)}[prefer]

    return min(front, key=key), True


def _measured(study: Any, study_name: str, known: dict[str, Pipeline]) -> dict[str, Pipeline]:
    """The study's completed, measured pipelines by label that ``known`` does not hold yet (checked as loaded)."""
    import optuna

    found: dict[str, Pipeline] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if ATTR_PIPELINE in t.user_attrs:
            where = f"study '{printable(study_name)}' trial {t.number}"
            p = Pipeline.from_dict(t.user_attrs[ATTR_PIPELINE], where=where)
            if p.label() not in known and p.label() not in found:
                validate_pipeline(p, where=where)
                found[p.label()] = p
    return found


REPEAT_ALLOWANCE = 3  # a study stops after this many times ``trials`` trials even if short of new candidates


def run_study(ctx: SearchContext, *, trials: int, storage: str, study_name: str, model_source: str,
              on_trial: Callable[[int, Pipeline | None, str, bool], None] | None = None,
              settings: dict[str, Any] | None = None, sampler_seed: int | None = None) -> StudyOutcome:
    """Measure ``trials`` new candidates on the study (created or resumed) and return every completed trial.

    A new candidate is a pipeline the study has not measured, in full or by the probe slice. TPE proposes a
    measured pipeline again now and then (on a small discrete space, often): such a repeat is recorded for the
    sampler from the stored figures at no cost and does not count, nor does a candidate the cost pre-check
    rejects; after ``REPEAT_ALLOWANCE * trials`` trials the study stops short. ``on_trial(number, pipeline or
    None, label or reason, new)`` reports every trial, ``new`` telling whether it counted.

    ``settings`` (what the study was created with: scenario, model, target, hardware, ...) is stored on a new
    study for ``kvtune worker``; ``sampler_seed`` (default ``ctx.seed``) lets each worker sample its own candidates.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    fingerprint = eval_fingerprint(ctx, model_source)

    sampler = make_sampler(ctx.seed if sampler_seed is None else sampler_seed, len(warm_start(ctx.scenario)))
    opened = open_storage(storage)  # heartbeat + retry of trials whose process died (kvtune/storage.py)
    try:
        study = optuna.create_study(storage=opened, study_name=study_name, sampler=sampler,
                                    directions=["minimize", "minimize", "minimize"], load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - storage errors come in many types; report one line
        raise UserError(f"--storage {redact_url(storage)}: cannot open study '{printable(study_name)}' "
                        f"({type(exc).__name__}: {redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else '', storage)})") from None
    fail_dead_trials(study)
    known = study.user_attrs.get("fingerprint")
    if known is None:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("scenario", ctx.scenario.name)
        study.set_user_attr("memory_budget_bytes", ctx.target.cost.memory_budget_bytes)
        study.set_user_attr("fingerprint_fields", fingerprint_fields(ctx, model_source))
        study.set_user_attr("settings", settings or {})
    elif known != fingerprint:
        raise UserError(f"study '{study_name}' was run with another model, evaluation set, scenario or cost "
                        "setup; pick another --study-name or --storage")
    else:
        # free memory drifts between runs; a resumed study keeps the budget its first trials were sized with
        ctx.target.pin_device_pool(int(study.user_attrs.get("memory_budget_bytes", ctx.target.cost.memory_budget_bytes)))
    done = _measured(study, study_name, {})
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    resumed = sum(t.state in finished for t in study.get_trials(deepcopy=False))  # not RUNNING/FAIL/WAITING
    if not study.trials:
        for params in warm_start(ctx.scenario):
            study.enqueue_trial(params)
    outcome = StudyOutcome(study_name=study_name, trials=[], resumed_trials=resumed)
    stopped: dict[str, float] = {}
    started = time.perf_counter()

    prefer = ctx.scenario.prefer
    counted = 0  # new candidates measured by this run

    def objective(trial: Any) -> tuple[float, float, float]:
        nonlocal counted
        mark_worker(trial)
        pipeline = suggest_pipeline(trial, ctx.scenario)
        label = pipeline.label()
        if label not in done:  # another worker may have measured it since
            done.update(_measured(study, study_name, done))
        new = label not in done and label not in stopped
        if label in done:
            measured = done[label].model_copy(update={})
        else:
            try:
                stages = Stages.of(pipeline)
            except UserError as exc:
                trial.set_user_attr(ATTR_REASON, str(exc))
                raise optuna.TrialPruned(str(exc)) from None
            reason = ctx.target.precheck(stages)
            if reason:
                trial.set_user_attr(ATTR_REASON, reason)
                if on_trial:
                    on_trial(trial.number, None, f"{label}: rejected before running: {reason}", False)
                raise optuna.TrialPruned(reason)
            bound, probes = stopped.get(label), None
            if bound is None:
                bound, probes = stop_early(ctx, stages, label)
            if bound is not None:  # infeasible for sure: priced (cheap), recorded with its bound, not stored
                stopped[label] = bound
                cost = measure_cost(stages, ctx.target.cost, ctx.seed)
                sv = ctx.target.price(stages, pipeline, cost)
                reason = (f"stopped after the probe slice: quality loss >= {bound:.3f} > ceiling "
                          f"{ctx.scenario.max_quality_loss:g}")
                trial.set_user_attr(ATTR_REASON, reason)
                trial.set_user_attr(ATTR_STOPPED, bound)
                trial.set_constraint("quality_loss", bound - ctx.scenario.max_quality_loss)
                counted += new
                if on_trial:
                    on_trial(trial.number, None, f"{label}: {reason}" if new else f"repeat of {label}: {reason}", new)
                return (bound, sv.ttft_ms if prefer == "ttft" else -sv.tokens_per_s, cost.bytes_per_token)
            measured = measure(ctx, pipeline, trial.number, probes)
            done[label] = measured
        trial.set_constraint("quality_loss", violation(measured.measured.quality, ctx.scenario))  # type: ignore[union-attr]
        trial.set_user_attr(ATTR_PIPELINE, measured.model_dump(mode="json", exclude_none=True))
        counted += new
        if on_trial:
            on_trial(trial.number, measured, label if new else f"repeat of {label}", new)
        return objectives(measured, prefer)

    ran = 0

    def after_trial(study: Any, _trial: Any) -> None:
        nonlocal ran
        ran += 1
        fail_dead_trials(study)  # journal: a dead worker's trial
        if counted >= trials:
            study.stop()

    study.optimize(objective, n_trials=REPEAT_ALLOWANCE * trials, catch=(MemoryError, RuntimeError),
                   gc_after_trial=False, callbacks=[after_trial])
    outcome.new_trials, outcome.new_candidates = ran, counted
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.COMPLETE and ATTR_PIPELINE in t.user_attrs:
            outcome.trials.append(Pipeline.model_validate(t.user_attrs[ATTR_PIPELINE]))
        elif t.state == optuna.trial.TrialState.PRUNED or ATTR_STOPPED in t.user_attrs:
            outcome.pruned.append((t.number, t.user_attrs.get(ATTR_REASON, "pruned")))
        elif t.state == optuna.trial.TrialState.FAIL:
            outcome.failed.append((t.number, t.system_attrs.get("fail_reason", "failed")))
    outcome.seconds = time.perf_counter() - started
    return outcome

