"""Exports: turn a pipeline into configs for the serving stacks people run.

One module per stack. What each stack and version can express, and where each fact was read, is data: the stack
profiles ``profiles/stacks/<stack>.yaml`` (:mod:`kvtune.stacks`), which ``recommend --stack`` reads too. Each module
targets its profile's default version (written in the module's docstring and in every file it writes):

========== ============================ ==============================================================
target     stack (version)              files
========== ============================ ==============================================================
vllm       vLLM 0.33.0                  ``vllm.yaml`` for ``vllm serve --config``
sglang     SGLang 0.5.23                ``sglang.yaml`` for ``python -m sglang.launch_server --config``
trtllm     TensorRT-LLM 1.2.1           ``trtllm.yaml`` for ``trtllm-serve --config`` / ``--extra_llm_api_options``
lmcache    LMCache 0.5.6 (+ vLLM 0.33)  ``lmcache.yaml`` and ``lmcache-vllm.yaml``
hf         transformers 5.24.0          ``hf_generation_config.json`` and ``hf_kvtune.py``
kvpress    kvpress 0.5.5                ``kvpress_press.py``
========== ============================ ==============================================================

What a stack cannot express is never dropped silently: it is named, with the nearest supported setting, in
the file (comments) and in :attr:`ExportResult.notes` (the command prints those on stderr).

Only valid pipelines are exported: :func:`render_pipeline` and :func:`export_pipeline` run
:func:`kvtune.pipeline.validate_pipeline` first (with the model's shapes when the pipeline's provenance names
them), so an unknown method, a parameter out of range or a method on the wrong axis is one error, never a
config. Text from the pipeline reaches files only through the emitters of :mod:`kvtune.export._common`.
The files of one export are written together (:func:`kvtune.io.write_files_atomically`).

Public API: :data:`EXPORTERS`, :data:`TARGETS`, :func:`parse_targets`, :func:`render_pipeline`,
:func:`export_pipeline`, :class:`ExportResult`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable

from kvtune.errors import UserError, printable
from kvtune.export import hf, kvpress, lmcache, sglang, trtllm, vllm
from kvtune.export._common import Rendered
from kvtune.io import write_files_atomically
from kvtune.pipeline import Pipeline, validate_pipeline


@dataclass(frozen=True)
class Exporter:
    """One export target: the stack it writes for, the version it was checked against, and its renderer."""

    target: str
    stack: str
    version: str
    render: Callable[[Pipeline], list[Rendered]]
    module: ModuleType


def _exporter(target: str, module: ModuleType) -> Exporter:
    return Exporter(target=target, stack=module.STACK, version=module.VERSION, render=module.render, module=module)


EXPORTERS: dict[str, Exporter] = {
    "vllm": _exporter("vllm", vllm),
    "sglang": _exporter("sglang", sglang),
    "trtllm": _exporter("trtllm", trtllm),
    "lmcache": _exporter("lmcache", lmcache),
    "hf": _exporter("hf", hf),
    "kvpress": _exporter("kvpress", kvpress),
}
TARGETS: tuple[str, ...] = tuple(EXPORTERS)


@dataclass(frozen=True)
class ExportResult:
    """One written file: its target, its path, and the notes on what its stack could not express."""

    target: str
    path: Path
    notes: tuple[str, ...]


def parse_targets(values: Iterable[str], *, where: str = "--to") -> list[str]:
    """``["vllm,sglang", "hf"]`` -> ``["vllm", "sglang", "hf"]``; ``all`` means every target, in table order."""
    chosen: list[str] = []
    for value in values:
        for part in str(value).split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name == "all":
                names = list(TARGETS)
            elif name in EXPORTERS:
                names = [name]
            else:
                raise UserError(f"{where}: unknown export target {printable(repr(part.strip()), 80)} "
                                f"(choose from {', '.join(TARGETS)}, all)")
            chosen += [n for n in names if n not in chosen]
    if not chosen:
        raise UserError(f"{where}: no export target given (choose from {', '.join(TARGETS)}, all)")
    return chosen


def render_pipeline(pipeline: Pipeline, targets: Iterable[str], *, where: str = "pipeline"
                    ) -> list[tuple[str, Rendered]]:
    """Validate ``pipeline`` (:class:`UserError` naming ``where`` if invalid), then render every file of every
    target in memory (nothing written): ``[(target, Rendered), ...]``."""
    validate_pipeline(pipeline, where=where)  # with the model shapes its provenance records
    out: list[tuple[str, Rendered]] = []
    for target in parse_targets(targets):
        out += [(target, r) for r in EXPORTERS[target].render(pipeline)]
    return out


def export_pipeline(
    pipeline: Pipeline,
    targets: list[str],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    where: str = "pipeline",
) -> list[ExportResult]:
    """Write the configs of ``targets`` for ``pipeline`` into ``out_dir``; one :class:`ExportResult` per file.

    The pipeline is validated and every file rendered and every path checked before the first write; the files
    appear together or not at all (:func:`kvtune.io.write_files_atomically`), so a refused overwrite or a killed
    run leaves nothing a rerun trips over. ``out_dir`` is created if missing. An existing file is replaced only
    with ``overwrite=True`` (or when it already holds the same bytes); otherwise :class:`UserError`.
    """
    rendered = render_pipeline(pipeline, targets, where=where)
    files: dict[str, str] = {}
    for _, r in rendered:
        if r.filename in files:  # pragma: no cover - guarded by distinct filenames per target
            raise UserError(f"{r.filename}: two exports would write the same file")
        files[r.filename] = r.text
    paths = write_files_atomically(out_dir, files, overwrite=overwrite, flag="--out-dir")
    return [ExportResult(target=target, path=path, notes=r.notes) for (target, r), path in zip(rendered, paths)]


__all__ = ["EXPORTERS", "TARGETS", "Exporter", "ExportResult", "export_pipeline", "parse_targets", "render_pipeline"]
