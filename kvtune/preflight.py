"""Checks that run before any work: everything a command can know to be wrong without loading a model.

``recommend`` and ``evaluate`` spend 20-60 s loading the model and prefilling the evaluation set before their
first measurement, and ``recommend`` then searches for minutes. Each calls one function here at its very top,
so a bad ``--storage``, an unwritable output, an export that would collide with existing files or an impossible
``--context`` is one line within a second, and nothing (no study file, no output) is left behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvtune.errors import UserError
from kvtune.export import parse_targets, render_pipeline
from kvtune.io import check_folder_writable, check_writable, show
from kvtune.pipeline import MAX_CONTEXT_TOKENS, Pipeline, load_pipeline
from kvtune.storage import StorageSpec, check_storage


@dataclass(frozen=True)
class RecommendInputs:
    storage: StorageSpec
    targets: list[str] | None  # export targets, parsed


def check_context(context: int | None) -> None:
    if context is not None and not 1 <= context <= MAX_CONTEXT_TOKENS:
        raise UserError(f"--context {context}: must be in 1..{MAX_CONTEXT_TOKENS} tokens")


def export_filenames(targets: list[str]) -> list[str]:
    """The files an export to ``targets`` writes (they do not depend on the pipeline)."""
    return [r.filename for _, r in render_pipeline(Pipeline(), targets)]


def check_export_dir(export_dir: Path, targets: list[str], *, force: bool) -> None:
    """``--export-dir`` can be written (or created) and holds none of the files the export will write."""
    check_folder_writable(export_dir, flag="--export-dir")
    if force or not export_dir.is_dir():
        return
    for name in export_filenames(targets):
        if (export_dir / name).exists():
            raise UserError(f"--export {','.join(targets)}: {show(export_dir / name)} already exists "
                            "(pass --force to overwrite, or another --export-dir)")


def recommend_inputs(*, storage: str, export: str | None, export_dir: Path, context: int | None,
                     force: bool) -> RecommendInputs:
    """Everything ``recommend`` checks before loading the model (the output file is guarded by the command)."""
    check_context(context)
    targets = parse_targets([export], where="--export") if export else None
    if targets:
        check_export_dir(export_dir, targets, force=force)
    spec = check_storage(storage)  # last: it may open a database, and nothing above creates anything
    return RecommendInputs(storage=spec, targets=targets)


def evaluate_inputs(*, pipeline: Path, output: Path | None, force: bool, context: int | None) -> Pipeline:
    """Everything ``evaluate`` checks before loading the model; returns the validated pipeline."""
    check_context(context)
    given = load_pipeline(pipeline)
    if output is not None:
        if os.path.exists(output) and Path(output).resolve() == Path(pipeline).resolve() and not force:
            raise UserError(f"-o {show(output)}: is the input pipeline; pass --force to replace it with the "
                            "measured copy")
        check_writable(output, overwrite=force, flag="-o")
    return given
