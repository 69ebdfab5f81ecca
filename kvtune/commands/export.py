"""``kvtune export pipeline.yaml --to vllm|sglang|trtllm|lmcache|hf|kvpress|all [-o DIR] [--force]``.

Writes one or more serving-stack configs for a pipeline (see :mod:`kvtune.export`). The paths written go to
stdout, one per line; what a stack cannot express goes to stderr, one line per note. A malformed or
future-schema pipeline, one that is invalid (:func:`kvtune.pipeline.validate_pipeline`: unknown method, a method
on the wrong axis, a parameter out of range), an unknown target or a file that exists with other content without
``--force`` is one line on stderr and exit code 2 (raised as :class:`kvtune.errors.UserError`, printed by the
CLI), and nothing is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Iterable

import typer

from kvtune.export import TARGETS, ExportResult, export_pipeline, parse_targets
from kvtune.errors import printable
from kvtune.io import read_yaml, show
from kvtune.pipeline import Pipeline


def write_exports(pipeline: Pipeline, targets: Iterable[str], out_dir: str | Path, *, force: bool = False,
                  where: str = "pipeline") -> list[ExportResult]:
    """Export ``pipeline`` and report: paths on stdout, notes on stderr (control characters escaped). Shared
    with ``recommend --export``."""
    results = export_pipeline(pipeline, parse_targets(targets), out_dir, overwrite=force, where=where)
    for result in results:
        typer.echo(show(result.path))
        for note in result.notes:
            typer.echo(f"kvtune: note: {result.path.name}: {printable(note)}", err=True)
    return results


def nonempty_path(value: str | Path) -> Path:
    """Typer parser for path arguments and options: an empty string is an error (not the current folder), and
    so is a NUL byte (no file system takes one). Defaults arrive as paths already."""
    if isinstance(value, Path):
        return value
    if value == "":
        raise typer.BadParameter("empty path")
    if "\x00" in value:
        raise typer.BadParameter(f"{printable(value, 80)}: a path cannot hold a NUL byte")
    return Path(value)


def export(
    pipeline: Annotated[Path, typer.Argument(parser=nonempty_path, help="pipeline YAML to export", show_default=False)],
    to: Annotated[
        list[str],
        typer.Option("--to", help=f"target stack(s): {', '.join(TARGETS)} or all; comma list or repeated",
                     show_default=False),
    ],
    out_dir: Annotated[Path, typer.Option("-o", "--out-dir", parser=nonempty_path,
                                          help="folder to write into (created if missing)")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="overwrite files that already exist")] = False,
) -> None:
    """Turn a pipeline into serving-stack configs; say what each stack cannot express."""
    targets = parse_targets(to)  # validate flags before reading the file
    given = Pipeline.from_dict(read_yaml(pipeline), where=show(pipeline))
    write_exports(given, targets, out_dir, force=force, where=show(pipeline))  # validated before rendering
