"""``kvtune evaluate``: measure one given pipeline the way ``recommend`` measures its trials."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from kvtune import __version__
from kvtune.commands.common import DEVICE_HELP, OutputFormat, emit, needs_attention_sums, prepare, stderr
from kvtune.commands.export import nonempty_path
from kvtune.io import atomic_write_text, show
from kvtune.measure.calibration import codec_key
from kvtune.pipeline import Provenance, utc_now, validate_pipeline
from kvtune.preflight import evaluate_inputs
from kvtune.scenarios import get_scenario
from kvtune.search import SearchContext, measure
from kvtune.report import print_measured


def evaluate(
    pipeline: Annotated[Path, typer.Argument(parser=nonempty_path, help="pipeline YAML (from `kvtune recommend` or written by hand)")],
    profile: Annotated[Optional[str], typer.Option(help="profile YAML from `kvtune profile`")] = None,
    hardware: Annotated[Optional[str], typer.Option(help="reference hardware, e.g. h100-sxm")] = None,
    model: Annotated[Optional[str], typer.Option(help="GGUF file, HF model folder or cached hub id")] = None,
    target: Annotated[Optional[str], typer.Option(help="model preset whose shapes cost is measured at")] = None,
    context: Annotated[Optional[int], typer.Option(min=1, help="context length for cost (default: workload p50)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the evaluation data")] = 0,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", parser=nonempty_path, help="write the pipeline with its new measurements here")] = None,
    force: Annotated[bool, typer.Option(help="overwrite --output if it exists")] = False,
    quick: Annotated[bool, typer.Option(help="tiny evaluation set (seconds)")] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="allow the model's own Python code to run")] = False,
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="stdout: table, json or yaml")] = OutputFormat.table,
) -> None:
    """Measure one pipeline (quality against the full cache, bytes, decode latency, capacity)."""
    given = evaluate_inputs(pipeline=pipeline, output=output, force=force, context=context)  # before any loading
    needs_sums = needs_attention_sums(given.selection.method)
    prep = prepare(model=model, trust_remote_code=trust_remote_code, profile=profile, hardware=hardware,
                   target=target, context=context, quick=quick, attention_sums=needs_sums, seed=seed,
                   device=device, default_tpot_ms=get_scenario("multi-turn").tpot_ms,
                   codecs=(codec_key(given.codec.method, given.codec.params),))
    validate_pipeline(given, spec=prep.loaded.spec, where=show(pipeline))  # shapes of the model it runs on
    ctx = SearchContext(model=prep.loaded.model, evalset=prep.evalset, eval_config=prep.eval_config,
                        target=prep.target_model, scenario=get_scenario("multi-turn"), seed=seed)
    with stderr.status(f"measuring {given.label()} ..."):
        result = measure(ctx, given.model_copy(update={"measured": None}))
    prov = (given.provenance or Provenance(kvtune_version=__version__, created=utc_now()))
    result = result.model_copy(update={"provenance": prov.model_copy(update={
        "kvtune_version": __version__, "created": utc_now(), "model": prep.model_info(),
        "quality_model": prep.quality_model(),
        "hardware": prep.hardware_info(), "workload": prep.workload_info(), "seed": seed})})
    if format is OutputFormat.table:
        print_measured(Console(width=200), result)
    else:
        emit(result.to_dict(), format)
    if output is not None:
        atomic_write_text(output, result.to_yaml(), overwrite=force)
        stderr.print(f"wrote {escape(show(output))}")
