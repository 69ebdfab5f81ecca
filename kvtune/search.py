"""The search: an Optuna multi-objective study over composed pipelines, every trial measured for real.

Objectives (all minimized): quality loss, KV bytes per token, decode latency (attention plus the offload
transfer prefetch does not hide). A scenario restricts each axis's methods and sets a quality-loss ceiling,
given to the sampler as a constraint (a trial above it is infeasible, not discarded). Before a trial costs
anything, an analytic pre-check rejects candidates whose KV for one sequence cannot fit the memory budget
(pruned, with the reason kept on the trial). A trial that runs out of memory is recorded as failed and the
study goes on.

The first trial of a new study is always the full cache, so every report has its baseline. Each trial's
complete measured pipeline is stored on the trial (``user_attrs["pipeline"]``), so a resumed study (same
``--storage`` and ``--study-name``) reports every earlier trial without measuring it again; a candidate
already measured in the study is not measured twice.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from kvtune.measure.kernels_cost import CostSetup, measure_cost
from kvtune.errors import UserError, printable
from kvtune.pipeline import Measured, Pipeline, Stage, Switches, validate_pipeline
from kvtune.measure.quality import EvalConfig, EvalSet, evaluate_quality
from kvtune.strategies import Stages
from kvtune.scenarios import Scenario
from kvtune.storage import fail_dead_trials, mark_worker, open_storage, redact_text, redact_url
from kvtune.strategies import AXES, NONE

ATTR_PIPELINE = "pipeline"
ATTR_REASON = "infeasible"


def objectives(p: Pipeline) -> tuple[float, float, float]:
    m = p.measured
    assert m is not None
    return (m.quality.quality_loss, m.cost.bytes_per_token, m.cost.decode_latency_ms + m.cost.transfer_ms)


def suggest_pipeline(trial: Any, scenario: Scenario) -> Pipeline:
    """Ask the trial for one method per axis (within the scenario) and that method's parameters."""
    stages: dict[str, Stage] = {}
    for axis, allowed in (("selection", scenario.selection), ("codec", scenario.codecs),
                          ("placement", scenario.placements)):
        method = trial.suggest_categorical(axis, list(allowed))
        params = {} if method == NONE else AXES[axis][method].search_space(trial, scenario)
        stages[axis] = Stage(method=method, params=params)
    return Pipeline(**stages, switches=Switches(prefix_caching=scenario.prefix_caching))


def precheck(stages: Stages, cost: CostSetup) -> str | None:
    """Why this candidate cannot work at all (without running it), or None."""
    spec, ctx = cost.spec, cost.context_tokens
    sel, codec = stages.selector, stages.codec
    per_seq = 0
    for i in range(spec.layers):
        kept = sel.layer_keep(ctx, i, spec.layers) if sel is not None else ctx
        per_seq += codec.layer_nbytes(i, spec.layers, 1, spec.kv_heads, kept, spec.head_dim, cost.dtype)
    on_gpu = per_seq * stages.placement.gpu_fraction_held()
    if on_gpu > cost.memory_budget_bytes:
        return (f"one sequence of {ctx} tokens needs {on_gpu / 2**30:.2f} GiB of KV on the device, "
                f"budget is {cost.memory_budget_bytes / 2**30:.2f} GiB")
    return None


@dataclass
class SearchContext:
    model: Any
    evalset: EvalSet
    eval_config: EvalConfig
    cost: CostSetup
    scenario: Scenario
    seed: int = 0


def measure(ctx: SearchContext, pipeline: Pipeline, trial_number: int | None = None) -> Pipeline:
    """Measure quality and cost of one pipeline; returns a copy carrying ``measured``."""
    stages = Stages.of(pipeline)
    started = time.perf_counter()
    quality = evaluate_quality(ctx.model, ctx.evalset, stages, ctx.eval_config, ctx.seed)
    cost = measure_cost(stages, ctx.cost, ctx.seed)
    measured = Measured(quality=quality, cost=cost, trial=trial_number,
                        seconds=round(time.perf_counter() - started, 3))
    return pipeline.model_copy(update={"measured": measured})


def eval_fingerprint(ctx: SearchContext, model_source: str) -> str:
    """What must not change between runs of one study: model, evaluation set, cost setup, scenario."""
    doc = {"model": model_source, "eval": ctx.eval_config.__dict__, "scenario": ctx.scenario.name,
           "spec": ctx.cost.spec.name, "context": ctx.cost.context_tokens}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StudyOutcome:
    study_name: str
    trials: list[Pipeline]  # every completed trial, measured, in trial order
    pruned: list[tuple[int, str]] = field(default_factory=list)  # (trial number, reason)
    failed: list[tuple[int, str]] = field(default_factory=list)
    new_trials: int = 0
    resumed_trials: int = 0
    seconds: float = 0.0

    def pareto(self) -> list[Pipeline]:
        return pareto_front(self.trials)


def pareto_front(pipelines: list[Pipeline]) -> list[Pipeline]:
    """Non-dominated pipelines on the three objectives (duplicates by label kept once)."""
    seen: dict[str, Pipeline] = {}
    for p in pipelines:
        seen.setdefault(p.label(), p)
    pts = list(seen.values())
    front = []
    for p in pts:
        op = objectives(p)
        dominated = any(
            all(a <= b for a, b in zip(objectives(q), op)) and any(a < b for a, b in zip(objectives(q), op))
            for q in pts if q is not p
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=objectives)


def offload_hidden(p: Pipeline) -> bool:
    """An offload placement counts only if the copy prefetch cannot hide is at most the full cache's own
    decode-attention time (it may at most double the attention step); otherwise it trades latency for capacity
    in a way no preference below sees."""
    c = p.measured.cost  # type: ignore[union-attr]
    return c.transfer_ms <= c.decode_latency_full_ms


def choose(pipelines: list[Pipeline], scenario: Scenario) -> tuple[Pipeline | None, bool]:
    """The scenario's pick among feasible Pareto-optimal trials: (pipeline, feasible). Feasible: quality loss
    within the scenario's ceiling and any offload copy mostly hidden (:func:`offload_hidden`). If nothing is
    feasible, the lowest-loss trial is returned with ``feasible=False``."""
    if not pipelines:
        return None, False
    feasible = [p for p in pipelines if p.measured and p.measured.quality.quality_loss <= scenario.max_quality_loss + 1e-12
                and offload_hidden(p)]
    if not feasible:
        return min(pipelines, key=objectives), False
    front = pareto_front(feasible)

    def key(p: Pipeline) -> tuple:
        q, b, lat = objectives(p)
        cap = p.measured.cost.capacity_seqs  # type: ignore[union-attr]
        return {
            "capacity": (-cap, q, lat),
            "memory": (b, q, lat),
            "latency": (lat, q, b),
            "quality": (q, -cap, lat),
        }[scenario.prefer]

    return min(front, key=key), True


def run_study(ctx: SearchContext, *, trials: int, storage: str, study_name: str, model_source: str,
              on_trial: Callable[[int, Pipeline | None, str], None] | None = None) -> StudyOutcome:
    """Run ``trials`` new trials on the study (created or resumed) and return every completed one."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    fingerprint = eval_fingerprint(ctx, model_source)

    sampler = optuna.samplers.TPESampler(
        seed=ctx.seed, multivariate=True, group=True, n_startup_trials=max(4, min(10, trials // 3)),
    )
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
        study.set_user_attr("memory_budget_bytes", ctx.cost.memory_budget_bytes)
    elif known != fingerprint:
        raise UserError(f"study '{study_name}' was run with another model, evaluation set, scenario or cost "
                        "setup; pick another --study-name or --storage")
    else:
        # free memory drifts between runs; a resumed study keeps the budget its first trials were sized with
        ctx.cost.memory_budget_bytes = int(study.user_attrs.get("memory_budget_bytes", ctx.cost.memory_budget_bytes))
    done: dict[str, Pipeline] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if ATTR_PIPELINE in t.user_attrs:
            where = f"study '{printable(study_name)}' trial {t.number}"
            p = Pipeline.from_dict(t.user_attrs[ATTR_PIPELINE], where=where)
            validate_pipeline(p, where=where)
            done.setdefault(p.label(), p)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    resumed = sum(t.state in finished for t in study.get_trials(deepcopy=False))  # not RUNNING/FAIL/WAITING
    if not study.trials:
        study.enqueue_trial({"selection": NONE, "codec": "fp16", "placement": "gpu"})
    outcome = StudyOutcome(study_name=study_name, trials=[], resumed_trials=resumed)
    started = time.perf_counter()

    def objective(trial: Any) -> tuple[float, float, float]:
        mark_worker(trial)
        pipeline = suggest_pipeline(trial, ctx.scenario)
        label = pipeline.label()
        if label in done:
            measured = done[label].model_copy(update={})
        else:
            try:
                stages = Stages.of(pipeline)
            except UserError as exc:
                trial.set_user_attr(ATTR_REASON, str(exc))
                raise optuna.TrialPruned(str(exc)) from None
            reason = precheck(stages, ctx.cost)
            if reason:
                trial.set_user_attr(ATTR_REASON, reason)
                if on_trial:
                    on_trial(trial.number, None, f"rejected before running: {reason}")
                raise optuna.TrialPruned(reason)
            measured = measure(ctx, pipeline, trial.number)
            done[label] = measured
        q = measured.measured.quality.quality_loss  # type: ignore[union-attr]
        trial.set_constraint("quality_loss", q - ctx.scenario.max_quality_loss)
        trial.set_user_attr(ATTR_PIPELINE, measured.model_dump(mode="json", exclude_none=True))
        if on_trial:
            on_trial(trial.number, measured, label)
        return objectives(measured)

    study.optimize(objective, n_trials=trials, catch=(MemoryError, RuntimeError), gc_after_trial=False)
    outcome.new_trials = trials
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.COMPLETE and ATTR_PIPELINE in t.user_attrs:
            outcome.trials.append(Pipeline.model_validate(t.user_attrs[ATTR_PIPELINE]))
        elif t.state == optuna.trial.TrialState.PRUNED:
            outcome.pruned.append((t.number, t.user_attrs.get(ATTR_REASON, "pruned")))
        elif t.state == optuna.trial.TrialState.FAIL:
            outcome.failed.append((t.number, t.system_attrs.get("fail_reason", "failed")))
    outcome.seconds = time.perf_counter() - started
    return outcome

