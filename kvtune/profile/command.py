"""``kvtune profile``: this machine (or a reference GPU), a request trace and a model, in one profile YAML."""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from kvtune.errors import UserError, printable
from kvtune.io import atomic_write_text, check_writable
from kvtune.profile.readers import FORMATS, check_regular
from kvtune.profile.schema import Profile, dump_profile, now_iso

DEFAULT_OUTPUT = "kvtune-profile.yaml"


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


# the choices come from the reader registry (one source of truth)
TraceFormat = Enum("TraceFormat", {name: name for name in ("auto", *FORMATS)}, type=str)


def _tokenizer_for(tokenizer: str | None, model: str | None) -> str | None:
    """``--tokenizer`` if given, else a ``--model`` folder that holds tokenizer files, else none."""
    if tokenizer:
        return tokenizer
    if model:
        folder = Path(model).expanduser()
        if folder.is_file():
            folder = folder.parent
        if folder.is_dir() and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            return str(folder)
    return None


def profile(
    trace: Annotated[Optional[list[Path]], typer.Option(
        "--trace", "-t", help="Request trace to profile (repeatable; pooled into one distribution).")] = None,
    trace_format: Annotated[TraceFormat, typer.Option(  # type: ignore[valid-type]
        "--trace-format", help="Trace format; auto detects it from the header or first record.")] = TraceFormat["auto"],
    columns: Annotated[Optional[str], typer.Option(
        "--columns", help="Generic traces: input=COL,output=COL[,time=COL|time_ms=COL][,session=COL].")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first malformed trace row.")] = False,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Preset name, folder or config.json, or .gguf file: adds KV bytes and capacity.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", help="Local tokenizer folder for text traces (ShareGPT, vLLM custom).")] = None,
    hardware: Annotated[Optional[str], typer.Option(
        "--hardware", help="Use a reference GPU's datasheet profile instead of probing ('list' lists them). "
                           "Alone, it only prints that profile.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer sizes and repeats (seconds, not tens).")] = False,
    offload_dir: Annotated[Optional[Path], typer.Option(
        "--offload-dir", help="Folder an offload tier would use; its disk is measured. Default: the temp dir.")] = None,
    memory_fraction: Annotated[float, typer.Option(
        "--memory-fraction", help="Share of GPU memory the server may use, in (0, 1].")] = 0.9,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write length histograms to this PNG.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help=f"Profile YAML to write (default {DEFAULT_OUTPUT}).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="What stdout shows.")] = OutputFormat.table,
) -> None:
    """Probe the GPU(s), host and disk; read request traces; write one profile YAML for `recommend`."""
    from kvtune import __version__
    from kvtune.profile.hardware import list_reference_hardware, probe_hardware, reference_hardware

    err = Console(stderr=True, highlight=False, soft_wrap=True)  # one message, one line (no wrapping at 80 columns)
    out = Console(highlight=False, soft_wrap=False)

    if hardware and hardware.strip().lower() == "list":
        names = list_reference_hardware()
        out.print("\n".join(names) if fmt is OutputFormat.table else (
            json.dumps(names) if fmt is OutputFormat.json else "\n".join(f"- {n}" for n in names)))
        return
    print_only = hardware is not None and not trace and not model and output is None and plot is None
    target = None if print_only else Path(output or DEFAULT_OUTPUT)
    # fail before minutes of work: unwritable output, missing matplotlib, missing inputs
    if target is not None:
        check_writable(target, overwrite=force)
    if plot is not None:
        if not trace:
            raise UserError("--plot: needs --trace (it plots the trace's length distribution)")
        from kvtune.profile.report import require_matplotlib

        require_matplotlib()
        check_writable(plot, overwrite=True)
    for p in trace or []:
        check_regular(p)  # missing, a directory, a FIFO or a device: refused before anything opens it
    if not 0 < memory_fraction <= 1:
        raise UserError(f"--memory-fraction {memory_fraction}: expected a value in (0, 1]")
    if offload_dir is not None and not offload_dir.is_dir():
        raise UserError(f"{offload_dir}: no such folder (--offload-dir)")
    spec = None
    if model:
        from kvtune.modelspec import resolve_model

        spec = resolve_model(model)  # unknown names fail here, before probing
    ref = reference_hardware(hardware) if hardware else None

    t0 = time.perf_counter()
    workload = None
    if trace:
        from kvtune.profile.workload import read_trace

        sizes = sum(p.stat().st_size for p in trace)
        err.print(f"reading {len(trace)} trace file(s), {sizes / 1e6:,.1f} MB ...")
        workload = read_trace(list(trace), fmt=trace_format.value, columns=columns, strict=strict,
                              tokenizer=_tokenizer_for(tokenizer, model))
        if workload.malformed_rows:
            first = workload.malformed_examples[0]
            err.print(f"warning: {workload.malformed_rows:,} malformed rows skipped (first: {first.file}:{first.line}: "
                      f"{first.reason}); --strict fails on them", markup=False)

    if ref is not None:
        hw = ref
        err.print(f"hardware: reference profile {hw.name} (datasheet)")
    else:
        err.print("profiling this machine" + (" (quick)" if quick else "") + " ...")
        hw = probe_hardware(quick=quick, offload_dir=str(offload_dir) if offload_dir else None,
                            progress=lambda msg: err.print(f"  {msg}"))

    record = capacity = None
    if spec is not None:
        from kvtune.profile.models import capacity_table, model_record
        from kvtune.profile.workload import default_workload

        record = model_record(spec)
        basis = workload
        if basis is None:
            basis = default_workload()
            err.print(f"capacity: no --trace, using the bundled sample workload ({basis.name})")
        capacity = capacity_table(spec, hw, basis, memory_fraction=memory_fraction)

    prof = Profile(kvtune_version=__version__, created=now_iso(), hardware=hw, workload=workload, model=record,
                   capacity=capacity)
    text = dump_profile(prof)
    if target is not None:
        atomic_write_text(target, text, overwrite=force)
    if plot is not None and workload is not None:
        from kvtune.profile.report import plot_workload

        plot_workload(workload, plot)

    if fmt is OutputFormat.yaml:
        sys.stdout.write(text)
    elif fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(prof.model_dump(mode="json"), indent=2) + "\n")
    else:
        from kvtune.profile.report import render

        render(prof, out)
    done = f"done in {time.perf_counter() - t0:.1f} s"
    if target is not None:
        err.print(f"wrote {printable(target)} ({done})" + (f"; plot {printable(plot)}" if plot else ""), markup=False)
    else:
        err.print(done)
