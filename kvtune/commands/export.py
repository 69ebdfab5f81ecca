"""``kvtune export pipeline.yaml --to vllm|sglang|trtllm|lmcache|hf|kvpress|all [-o DIR] [--force]``.

Writes one or more serving-stack configs for a pipeline (see :mod:`kvtune.export`). The paths written go to
stdout, one per line; what a stack cannot express goes to stderr, one line per note. A malformed or
future-schema pipeline, an unknown target or a file that exists without ``--force`` is one line on stderr and
exit code 2 (raised as :class:`kvtune.errors.UserError`, printed by the CLI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Iterable

import typer

from kvtune.export import TARGETS, ExportResult, export_pipeline, parse_targets
from kvtune.pipeline import Pipeline, load_pipeline


def write_exports(pipeline: Pipeline, targets: Iterable[str], out_dir: str | Path, *, force: bool = False) -> list[ExportResult]:
    """Export ``pipeline`` and report: paths on stdout, notes on stderr. Shared with ``recommend --export``."""
    results = export_pipeline(pipeline, parse_targets(targets), out_dir, overwrite=force)
    for result in results:
        typer.echo(str(result.path))
        for note in result.notes:
            typer.echo(f"kvtune: note: {result.path.name}: {note}", err=True)
    return results


def export(
    pipeline: Annotated[Path, typer.Argument(help="pipeline YAML to export", show_default=False)],
    to: Annotated[
        list[str],
        typer.Option("--to", help=f"target stack(s): {', '.join(TARGETS)} or all; comma list or repeated",
                     show_default=False),
    ],
    out_dir: Annotated[Path, typer.Option("-o", "--out-dir", help="folder to write into (created if missing)")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="overwrite files that already exist")] = False,
) -> None:
    """Turn a pipeline into serving-stack configs; say what each stack cannot express."""
    targets = parse_targets(to)  # validate flags before reading the file
    write_exports(load_pipeline(pipeline), targets, out_dir, force=force)
