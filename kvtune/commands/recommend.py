"""``kvtune recommend``: search composed pipelines for a scenario and write the recommended one."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvtune import __version__
from kvtune.buckets import QUALITY_CAP_TOKENS, QUICK_CAP_TOKENS, BucketResult, parse_buckets, search_buckets, split
from kvtune.commands.common import (DEVICE_HELP, OutputFormat, emit, needs_attention_sums, prefill_evalset, prepare,
                                     stderr)
from kvtune.commands.export import nonempty_path, write_exports
from kvtune.errors import UserError, printable
from kvtune.io import atomic_write_text, check_writable
from kvtune.measure.calibration import codec_keys
from kvtune.pipeline import Pipeline, Provenance, utc_now
from kvtune.preflight import recommend_inputs
from kvtune.report import BUCKET_COLUMNS, bucket_rows, bucket_summary, front_table, print_measured, side_by_side
from kvtune.report_md import ReportInput, check_report_dir, write_report
from kvtune.measure.target import Target
from kvtune.scenarios import SCENARIOS, Scenario, get_scenario
from kvtune.stacks import STACKS, default_profile, get_profile, narrow, nearest
from kvtune.storage import redact_url

DEFAULT_OUTPUT = "kvtune-pipeline.yaml"
DEFAULT_STORAGE = "sqlite:///kvtune-study.db"


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-._" else "-" for ch in text.lower()).strip("-")


def guard_output(path: Path, force: bool) -> Path | None:
    """Refuse to clobber a file that kvtune did not write; a kvtune pipeline is kept as ``.bak``.

    Returns the backup path to move the old file to (after the search succeeds), or None.
    """
    check_writable(path)
    if not path.exists() or force:
        return None
    try:
        from kvtune.pipeline import load_pipeline

        old = load_pipeline(path)
    except UserError:
        old = None
    if old is None or old.provenance is None:
        raise UserError(f"-o {path}: exists and is not a pipeline kvtune wrote; pass --force to overwrite it")
    return path.with_name(path.name + ".bak")


def searched_scenario(scen: Scenario, tgt: Target) -> tuple[Scenario, str | None]:
    """The scenario as searched on this target: offload goes to the target's tiers, or is not searched (with the
    note to print) when there is no tier to offload to. ``recommend`` and ``worker`` both apply it."""
    if "offload" not in scen.placements:
        return scen, None
    tiers = tgt.offload_tiers()
    if tiers:
        return dataclasses.replace(scen, offload_tiers=tiers), None
    return (dataclasses.replace(scen, placements=tuple(p for p in scen.placements if p != "offload")),
            f"no tier to offload to on {tgt.hardware.name} ({tgt.tiers.host.reason or tgt.tiers.disk.reason}); "
            "offload is not searched")


def recommend(
    scenario: Annotated[str, typer.Option("--scenario", "-s", help=f"one of: {', '.join(SCENARIOS)}")] = "multi-turn",
    profile: Annotated[Optional[str], typer.Option(help="profile YAML from `kvtune profile` (hardware + workload)")] = None,
    hardware: Annotated[Optional[str], typer.Option(help="reference hardware instead of this machine, e.g. h100-sxm")] = None,
    model: Annotated[Optional[str], typer.Option(help="GGUF file, HF model folder or cached hub id (default: bundled SmolLM2-135M-Instruct)")] = None,
    target: Annotated[Optional[str], typer.Option(help="model preset whose shapes cost is measured at (default: --model's)")] = None,
    trials: Annotated[int, typer.Option(min=1, help="new candidates to measure (repeats the sampler proposes do not count; at most 3x as many trials)")] = 24,
    storage: Annotated[str, typer.Option(help="Optuna storage URL (SQLite file, PostgreSQL, journal)")] = DEFAULT_STORAGE,
    study_name: Annotated[Optional[str], typer.Option(help="study to create or resume (default: from model, hardware, workload, scenario)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the sampler and the evaluation data")] = 0,
    context: Annotated[Optional[int], typer.Option(min=1, help="context length cost is measured at (default: workload p50)")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", parser=nonempty_path, help="where to write the recommended pipeline")] = Path(DEFAULT_OUTPUT),
    force: Annotated[bool, typer.Option(help="overwrite --output even if kvtune did not write it")] = False,
    export: Annotated[Optional[str], typer.Option(help="also export to these stacks (comma list or 'all')")] = None,
    export_dir: Annotated[Path, typer.Option(parser=nonempty_path, help="folder for --export files")] = Path("."),
    quick: Annotated[bool, typer.Option(help="tiny evaluation set (seconds; for smoke tests, not decisions)")] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    tpot_ms: Annotated[Optional[float], typer.Option("--tpot-ms", min=0.001, help="time-per-output-token target in ms throughput is measured at (default: the scenario's)")] = None,
    calibration: Annotated[Optional[list[str]], typer.Option(help="kernel calibration YAML from benchmarks/kernels.py --calibration-out (repeatable)")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="allow the model's own Python code to run")] = False,
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="stdout: table, json or yaml")] = OutputFormat.table,
    stack: Annotated[Optional[str], typer.Option("--stack", help=f"search only what one serving stack runs, with its numerics: {'|'.join(STACKS)}[@VERSION]")] = None,
    buckets: Annotated[Optional[str], typer.Option("--buckets", help="one pipeline per prompt-length bucket of the workload trace: 'auto' or a bucket count; --trials is per bucket")] = None,
    bucket_eval_tokens: Annotated[Optional[int], typer.Option("--bucket-eval-tokens", min=64, help=f"with --buckets: the longest context a bucket's quality is measured at (default {QUALITY_CAP_TOKENS:,}, the bundled model's reliable pass-key range; --quick {QUICK_CAP_TOKENS}); longer buckets are measured there and the run says so")] = None,
    report: Annotated[Optional[Path], typer.Option("--report", parser=nonempty_path, help="also write a report folder: report.md, pareto.png, workload.png, buckets.png with --buckets (needs matplotlib)")] = None,
) -> None:
    """Search KV-cache pipelines for a scenario, measuring every candidate on a real model; write the best."""
    scen = get_scenario(scenario)
    stack_profile = get_profile(stack) if stack is not None else None
    if stack_profile is not None:
        scen = narrow(scen, stack_profile)
    bucket_count = parse_buckets(buckets) if buckets is not None else None
    if bucket_eval_tokens is not None and buckets is None:
        raise UserError("--bucket-eval-tokens: only with --buckets")
    backup = guard_output(output, force)
    if report is not None:
        check_report_dir(report, force)
    targets = recommend_inputs(storage=storage, export=export, export_dir=export_dir, context=context,
                               force=force).targets  # storage, exports, context: before the model loads
    from kvtune.search import SearchContext, choose, run_study

    needs_sums = any(needs_attention_sums(m) for m in scen.selection)
    prep = prepare(model=model, trust_remote_code=trust_remote_code, profile=profile, hardware=hardware,
                   target=target, context=context, quick=quick, attention_sums=needs_sums, seed=seed,
                   device=device, tpot_ms=tpot_ms, default_tpot_ms=scen.tpot_ms, calibration=calibration,
                   codecs=tuple(k for c in scen.codecs for k in codec_keys(c)),
                   evalset=buckets is None)  # --buckets: one evaluation set per bucket length instead
    tgt = prep.target_model
    scen, note = searched_scenario(scen, tgt)
    if note:
        stderr.print(f"note: {note}")
    name = study_name or "/".join(_slug(x) for x in (prep.loaded.name, prep.target.name, prep.hardware.name,
                                                     prep.workload.name if prep.workload else "none", scen.name,
                                                     *((stack_profile.spec,) if stack_profile else ()),
                                                     "quick" if quick else "full"))
    ctx = SearchContext(model=prep.loaded.model, evalset=prep.evalset, eval_config=prep.eval_config,
                        target=tgt, scenario=scen, seed=seed)
    stderr.print(f"study '{escape(printable(name))}' in {escape(redact_url(storage))}; scenario {scen.name}: {scen.summary}")
    if stack_profile is not None:
        stderr.print(f"--stack {stack_profile.spec}: searching what {stack_profile.label} runs, with its numerics "
                     f"(selection {', '.join(scen.selection)}; codec {', '.join(scen.codecs)}; placement "
                     f"{', '.join(scen.placements)}; from profiles/stacks/{stack_profile.stack}.yaml)")
    if buckets is not None:
        replay = tgt.serving.replay
        if replay is None:
            raise UserError("--buckets: the workload has no trace on disk to split by prompt length")
        cap = bucket_eval_tokens or (QUICK_CAP_TOKENS if quick else QUALITY_CAP_TOKENS)
        why = (f"--bucket-eval-tokens caps evaluation contexts at {cap:,} tokens" if bucket_eval_tokens else
               f"--quick caps evaluation contexts at {cap:,} tokens" if quick else
               f"quality measured at most at {cap:,} tokens: the bundled model answers the pass key reliably up to ~4K")
        parts = split(replay.mix(), bucket_count, cap, why)
        if len(parts) > 1:
            result = search_buckets(ctx, parts, prep.loaded.tokenizer, trials=trials, storage=storage, study_name=name,
                                    model_source=prep.loaded.identity, attention_sums=needs_sums,
                                    on_trial=_trial_line, progress=lambda msg: stderr.print(escape(msg)))
            if result.single is None:
                raise UserError("--buckets: no candidate is feasible in every bucket; run without --buckets")
            doc = result.document(result.single).model_copy(update={
                "measured": result.measured[max(range(len(parts)), key=lambda i: parts[i].share)][result.single.label()].measured,
                "name": f"{scen.name} recommendation, {len(parts)} length buckets",
                "provenance": Provenance(kvtune_version=__version__, created=utc_now(), scenario=scen.name, study=name,
                                         seed=seed, model=prep.model_info(), quality_model=prep.quality_model(),
                                         hardware=prep.hardware_info(),
                                         workload=prep.workload_info())})
            if backup is not None:
                output.replace(backup)
                stderr.print(f"previous {output} kept as {backup}")
            atomic_write_text(output, doc.to_yaml())
            _print_buckets(result, format, doc)
            if report is not None:  # the plot shows the largest bucket's study, whose figures doc carries
                main = result.outcomes[max(range(len(parts)), key=lambda i: parts[i].share)]
                written = write_report(report, ReportInput(
                    trials=main.trials, best=doc, feasible=True, scenario=scen, workload=prep.workload,
                    study=main.study_name, storage=redact_url(storage), rejected=len(main.pruned), buckets=result),
                    force=force)
                stderr.print(f"wrote the report {escape(printable(str(written)))}")
            stderr.print(f"wrote {output} ({len(parts)} buckets, routing by prompt length)")
            if targets:
                write_exports(doc, targets, export_dir, force=force)
            return
        stderr.print("note: --buckets: the trace's prompt lengths span too narrow a range to split; one pipeline")
        ctx = dataclasses.replace(ctx, evalset=prefill_evalset(prep.loaded, prep.eval_config, needs_sums))
    started = time.perf_counter()
    with Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=stderr, transient=False) as bar:
        task = bar.add_task("", total=trials)

        def on_trial(number: int, measured: Pipeline | None, label: str, new: bool) -> None:
            desc = label if measured is None else (
                f"#{number} {label}: loss {measured.measured.quality.quality_loss:.4f}, "  # type: ignore[union-attr]
                f"{measured.measured.cost.compression_ratio:.2f}x")  # type: ignore[union-attr]
            bar.update(task, advance=int(new), description=desc[:90])

        outcome = run_study(ctx, trials=trials, storage=storage, study_name=name, model_source=prep.loaded.identity,
                            on_trial=on_trial, settings={  # what `kvtune worker` rebuilds the setup from
                                "scenario": scen.name, "stack": stack_profile.spec if stack_profile else None,
                                "target": target,
                                "model": str(Path(model).resolve()) if model and Path(model).exists() else model,
                                "hardware": hardware, "profile": str(Path(profile).resolve()) if profile else None,
                                "context": context, "tpot_ms": tpot_ms, "quick": quick, "seed": seed,
                                "calibration": [str(Path(c).resolve()) for c in calibration or ()],
                                "trust_remote_code": trust_remote_code, "kvtune_version": __version__})
    elapsed = time.perf_counter() - started
    for number, reason in outcome.failed:
        stderr.print(f"trial {number} failed: {reason}")
    if not outcome.trials:
        raise UserError(f"study '{name}': no trial completed; see the failures above")
    best, feasible = choose(outcome.trials, scen)
    assert best is not None
    if not feasible:
        stderr.print(f"[yellow]no candidate met the scenario's quality-loss ceiling ({scen.max_quality_loss}); "
                     "showing the lowest-loss one[/yellow]")
        for line in scen.advice:
            stderr.print(f"advice: {line}")
    best = best.model_copy(update={
        "name": f"{scen.name} recommendation" + (f" for {stack_profile.label}" if stack_profile else ""),
        "provenance": Provenance(kvtune_version=__version__, created=utc_now(), scenario=scen.name, study=name,
                                 seed=seed, model=prep.model_info(), quality_model=prep.quality_model(),
                                 hardware=prep.hardware_info(), workload=prep.workload_info()),
    })
    if backup is not None:
        output.replace(backup)
        stderr.print(f"previous {output} kept as {backup}")
    atomic_write_text(output, best.to_yaml())
    front = outcome.pareto(scen.prefer)
    full = next((p for p in outcome.trials if p.is_identity()), None)
    if format is OutputFormat.table:
        out = Console(width=200)
        out.print(front_table(front, best, scen.max_quality_loss,
                              title=f"Pareto front of {len(outcome.trials)} trials ({scen.name})"))
        out.print(f"[bold]Recommended for {scen.name}[/bold] ({'meets' if feasible else 'MISSES'} max quality "
                  f"loss {scen.max_quality_loss:g}; prefers {scen.prefer}):")
        print_measured(out, best)
        if full is not None and full.measured is not None and full.measured.serving is not None:
            out.print(side_by_side(best, full))
    else:
        emit({"recommended": best.to_dict(), "pareto_front": [p.to_dict() for p in front],
              "trials": len(outcome.trials), "tried": [p.label() for p in outcome.trials],
              "new_trials": outcome.new_trials, "new_candidates": outcome.new_candidates,
              "pruned": [{"trial": n, "reason": r} for n, r in outcome.pruned]}, format)
    stderr.print(f"{outcome.new_trials} trials, {outcome.new_candidates} of them new candidates, in {elapsed:.0f} s "
                 f"({len(outcome.trials)} measured in the study, "
                 f"{len(outcome.pruned)} rejected before running or stopped after the probe slice); wrote {output}")
    if report is not None:
        written = write_report(report, ReportInput(trials=outcome.trials, best=best, feasible=feasible, scenario=scen,
                                                   workload=prep.workload, study=name, storage=redact_url(storage),
                                                   rejected=len(outcome.pruned)), force=force)
        stderr.print(f"wrote the report {escape(printable(str(written)))}")
    if stack_profile is not None:
        stderr.print(f"measured with {stack_profile.label}'s numerics: an export to {stack_profile.stack} runs exactly "
                     "the pipeline these figures were measured on")
    if targets:
        _measure_nearest(ctx, best, targets, stack_profile)
        write_exports(best, targets, export_dir, force=force)


def _measure_nearest(ctx, best: Pipeline, targets: list[str], stack_profile) -> None:
    """For each export target that cannot run ``best`` as measured, measure what its export really runs (the
    nearest supported setting, :func:`kvtune.stacks.nearest`) and print both, so the degradation has a number."""
    from kvtune.search import measure

    done: dict[str, Pipeline] = {}
    for target in targets:
        same = stack_profile is not None and stack_profile.stack == target
        profile = stack_profile if same else default_profile(target)
        near, changes = nearest(best, profile)
        if not changes:
            continue
        key = near.label()
        if key not in done:
            stderr.print(escape(f"measuring what the {profile.label} export runs: {key} ({'; '.join(changes)})"))
            done[key] = measure(ctx, near)
        m, b = done[key].measured, best.measured
        assert m is not None and b is not None
        line = (f"{profile.label} export runs {key}: quality loss {m.quality.quality_loss:.4f} "
                f"(recommended {b.quality.quality_loss:.4f}), KV {m.cost.bytes_per_token:,.0f} B/token "
                f"(recommended {b.cost.bytes_per_token:,.0f})")
        if m.serving is not None and b.serving is not None:
            line += f", {m.serving.tokens_per_s:,.0f} output tokens/s (recommended {b.serving.tokens_per_s:,.0f})"
        stderr.print(escape(line))


def _trial_line(number: int, measured: Pipeline | None, label: str, new: bool) -> None:
    """One stderr line per finished trial of a bucket study (the bucket studies run one after another)."""
    if measured is None or measured.measured is None:
        stderr.print(escape(f"  trial {number}: {label}"))
        return
    m = measured.measured
    tps = f", {m.serving.tokens_per_s:,.0f} tokens/s" if m.serving is not None else ""
    took = f"({m.seconds:.0f} s)" if new else f"(trial {m.trial}'s figures)"
    stderr.print(escape(f"  trial {number}: {label}: loss {m.quality.quality_loss:.4f}, "
                        f"{m.cost.bytes_per_token:,.0f} B/token{tps} {took}"))


def _print_buckets(result: BucketResult, format: OutputFormat, doc: Pipeline) -> None:
    """The per-bucket table, the routing rule and the routed set against the best single pipeline."""
    from rich.table import Table

    r, single = result, result.single
    assert single is not None
    if format is not OutputFormat.table:
        emit({"recommended": doc.to_dict(), "best_single": single.label(),
              "routed": dataclasses.asdict(r.routed), "best_single_aggregate": dataclasses.asdict(r.single_agg),
              "gain_tokens_per_s": r.gain, "notes": r.notes,
              "buckets": [dict(zip((c for c, _ in BUCKET_COLUMNS), row)) for row in bucket_rows(r)]}, format)
        return
    out = Console(width=200)
    table = Table(title="Per-bucket recommendation (route each prompt to the first bucket whose bound holds)")
    for col, just in BUCKET_COLUMNS:
        table.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for row in bucket_rows(r):
        table.add_row(*(escape(c) for c in row))
    out.print(table)
    for line in bucket_summary(r):
        out.print(escape(line), highlight=False)
