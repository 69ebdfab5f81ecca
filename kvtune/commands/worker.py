"""``kvtune worker``: join a study ``kvtune recommend`` created and run trials on it, from this or another host.

Optuna's storage is the distributed engine: every worker asks the shared storage (PostgreSQL, MySQL, a journal
file on a shared file system) for its next trial and writes the result back. What makes a trial comparable
across workers is that its figures are priced for the study's *target* hardware (profile or datasheet plus the
calibration table), not from the worker's own timings; so a worker rebuilds the study's exact setup from the
settings ``recommend`` recorded on the study (``study.user_attrs["settings"]``) and refuses, in one line, to
join when what it would measure differs (``fingerprint_fields``: model, evaluation set, scenario, target shapes,
hardware, workload, TPOT target). Each worker samples with its own seed (the study's seed mixed with host and
process id), so two workers do not propose the same candidates in lockstep, and a candidate another worker
already measured is taken from the study instead of being measured again.
"""

from __future__ import annotations

import zlib
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from kvtune.commands.common import DEVICE_HELP, OutputFormat, emit, needs_attention_sums, prepare, stderr
from kvtune.commands.recommend import searched_scenario
from kvtune.errors import UserError, printable
from kvtune.measure.calibration import codec_keys
from kvtune.pipeline import Pipeline
from kvtune.report import front_table
from kvtune.scenarios import get_scenario
from kvtune.stacks import get_profile, narrow
from kvtune.storage import check_storage, open_storage, redact_text, worker_id

ATTR_SETTINGS = "settings"  # written by run_study on a new study (kvtune recommend)


def read_settings(storage: str, study_name: str) -> dict[str, Any]:
    """The settings the study was created with, checked before any model loads; creates nothing."""
    import optuna

    spec = check_storage(storage)
    if spec.file is not None and not spec.file.exists():
        raise UserError(f"--storage {spec.shown}: {printable(str(spec.file))} does not exist (create the study with "
                        "kvtune recommend --storage ... --study-name ... first)")
    opened = open_storage(spec)
    try:
        names = optuna.get_all_study_names(storage=opened)
    except Exception as exc:  # noqa: BLE001 - storage errors come in many types; one line
        raise UserError(f"--storage {spec.shown}: cannot list studies ({type(exc).__name__}: "
                        f"{redact_text(str(exc).strip().splitlines()[0] if str(exc).strip() else '', spec.target)})") from None
    if study_name not in names:
        shown = ", ".join(printable(n, 80) for n in names[:5]) + (", ..." if len(names) > 5 else "")
        raise UserError(f"--study {printable(study_name)}: no such study in {spec.shown}"
                        + (f" (it holds: {shown})" if names else " (it holds none)"))
    study = optuna.load_study(study_name=study_name, storage=opened)
    settings = study.user_attrs.get(ATTR_SETTINGS)
    if not isinstance(settings, dict) or not settings.get("scenario"):
        raise UserError(f"--study {printable(study_name)}: records no settings (created by an older kvtune or not by "
                        "kvtune recommend); run kvtune recommend with the same --storage and --study-name instead")
    return settings


def fingerprint_mismatch(recorded: dict[str, Any] | None, own: dict[str, Any]) -> str:
    """Which fingerprint fields differ, as ``field: study X, this worker Y`` (empty when none or unknown)."""
    if not recorded:
        return ""
    diffs = [f"{k}: study {printable(str(recorded.get(k)), 60)}, this worker {printable(str(own.get(k)), 60)}"
             for k in sorted(set(recorded) | set(own)) if recorded.get(k) != own.get(k)]
    return "; ".join(diffs)


def worker_seed(seed: int, who: str) -> int:
    """The sampler seed of one worker: the study's seed mixed with ``host:pid`` (stable within the process)."""
    return (seed * 1_000_003 + zlib.crc32(who.encode())) % 2**31


def worker(
    storage: Annotated[str, typer.Option(help="the study's Optuna storage URL (PostgreSQL, MySQL, journal file, SQLite)")],
    study: Annotated[str, typer.Option(help="study name, as given to (or printed by) kvtune recommend")],
    trials: Annotated[int, typer.Option(min=1, help="new candidates this worker measures (repeats do not count; at most 3x as many trials)")] = 24,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    profile: Annotated[Optional[str], typer.Option(help="this host's copy of the study's --profile file (default: the recorded path)")] = None,
    calibration: Annotated[Optional[list[str]], typer.Option(help="this host's copies of the study's --calibration files (default: the recorded paths)")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="allow the model's own Python code to run (needed when the study was created with it)")] = False,
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="stdout: table, json or yaml")] = OutputFormat.table,
) -> None:
    """Join a study kvtune recommend created (shared storage) and run trials on it, from this or another host."""
    import optuna

    from kvtune.search import SearchContext, choose, fingerprint_fields, run_study

    settings = read_settings(storage, study)
    if settings.get("trust_remote_code") and not trust_remote_code:
        raise UserError(f"--study {printable(study)}: was created with --trust-remote-code; pass it to this worker "
                        "too if you trust the model's code")
    scen = get_scenario(str(settings["scenario"]))
    if settings.get("stack"):  # recommend --stack: the same narrowed space
        scen = narrow(scen, get_profile(str(settings["stack"]), where=f"study {printable(study)}: stack"))
    me = worker_id()
    needs_sums = any(needs_attention_sums(m) for m in scen.selection)
    prep = prepare(model=settings.get("model"), trust_remote_code=trust_remote_code,
                   profile=profile or settings.get("profile"), hardware=settings.get("hardware"),
                   target=settings.get("target"), context=settings.get("context"), quick=bool(settings.get("quick")),
                   attention_sums=needs_sums, seed=int(settings.get("seed", 0)), device=device,
                   tpot_ms=settings.get("tpot_ms"), default_tpot_ms=scen.tpot_ms,
                   calibration=calibration or settings.get("calibration"),
                   codecs=tuple(k for c in scen.codecs for k in codec_keys(c)))
    scen, note = searched_scenario(scen, prep.target_model)
    if note:
        stderr.print(f"note: {note}")
    ctx = SearchContext(model=prep.loaded.model, evalset=prep.evalset, eval_config=prep.eval_config,
                        target=prep.target_model, scenario=scen, seed=int(settings.get("seed", 0)))
    own = fingerprint_fields(ctx, prep.loaded.identity)
    recorded = optuna.load_study(study_name=study, storage=open_storage(storage)).user_attrs.get("fingerprint_fields")
    diff = fingerprint_mismatch(recorded, own)
    if diff:
        raise UserError(f"--study {printable(study)}: this worker would measure something else ({diff}); "
                        "workers must price the same target with the same model and evaluation set")
    stderr.print(f"worker {escape(me)} joins study '{escape(printable(study))}' (scenario {scen.name}) for "
                 f"{trials} trials")

    def on_trial(number: int, measured: Pipeline | None, label: str, _new: bool) -> None:
        if measured is None:
            stderr.print(f"trial {number}: {escape(label)}")
            return
        m = measured.measured
        assert m is not None
        stderr.print(f"trial {number}: {escape(label)}: loss {m.quality.quality_loss:.4f}, "
                     f"{m.cost.compression_ratio:.2f}x")

    outcome = run_study(ctx, trials=trials, storage=storage, study_name=study, model_source=prep.loaded.identity,
                        on_trial=on_trial, sampler_seed=worker_seed(int(settings.get("seed", 0)), me))
    for number, reason in outcome.failed:
        stderr.print(f"trial {number} failed: {escape(printable(str(reason)))}")
    best, feasible = choose(outcome.trials, scen)
    summary = {"study": study, "worker": me, "trials_run": outcome.new_trials, "new_candidates": outcome.new_candidates,
               "measured_in_study": len(outcome.trials),
               "rejected": len(outcome.pruned), "failed": len(outcome.failed),
               "recommended_now": best.label() if best is not None else None, "feasible": feasible}
    if format is OutputFormat.table:
        if outcome.trials:
            Console(width=200).print(front_table(outcome.pareto(scen.prefer), best, scen.max_quality_loss,
                                                 title=f"Pareto front of {len(outcome.trials)} trials ({scen.name})"))
    else:
        emit(summary, format)
    stderr.print(f"worker {escape(me)}: {outcome.new_trials} trials ({outcome.new_candidates} new candidates) in "
                 f"{outcome.seconds:.0f} s; the study holds "
                 f"{len(outcome.trials)} measured trials; write the pipeline with kvtune recommend --storage ... "
                 f"--study-name {escape(printable(study))}")
