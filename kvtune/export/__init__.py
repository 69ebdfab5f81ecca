"""Exports: turn a pipeline into configs for the serving stacks people run.

One module per stack, each pinned to the stack version it was checked against (written in the module's
docstring and in every file it writes):

========== ============================ ==============================================================
target     stack (version)              files
========== ============================ ==============================================================
vllm       vLLM 0.11.1                  ``vllm.yaml`` for ``vllm serve --config``
sglang     SGLang 0.5.4                 ``sglang.yaml`` for ``python -m sglang.launch_server --config``
trtllm     TensorRT-LLM 1.3.0rc27       ``trtllm.yaml`` for ``trtllm-serve --config`` / ``--extra_llm_api_options``
lmcache    LMCache 0.5.6 (+ vLLM)       ``lmcache.yaml`` and ``lmcache-vllm.yaml``
hf         transformers 5.23            ``hf_generation_config.json`` and ``hf_kvtune.py``
kvpress    kvpress 0.5.5                ``kvpress_press.py``
========== ============================ ==============================================================

What a stack cannot express is never dropped silently: it is named, with the nearest supported setting, in
the file (comments) and in :attr:`ExportResult.notes` (the command prints those on stderr).

Public API: :data:`EXPORTERS`, :data:`TARGETS`, :func:`parse_targets`, :func:`render_pipeline`,
:func:`export_pipeline`, :class:`ExportResult`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable

from kvtune.errors import UserError
from kvtune.export import hf, kvpress, lmcache, sglang, trtllm, vllm
from kvtune.export._common import Rendered
from kvtune.io import atomic_write_text
from kvtune.pipeline import Pipeline


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
                raise UserError(f"{where}: unknown export target {part.strip()!r} (choose from {', '.join(TARGETS)}, all)")
            chosen += [n for n in names if n not in chosen]
    if not chosen:
        raise UserError(f"{where}: no export target given (choose from {', '.join(TARGETS)}, all)")
    return chosen


def render_pipeline(pipeline: Pipeline, targets: Iterable[str]) -> list[tuple[str, Rendered]]:
    """Render every file of every target in memory (nothing written): ``[(target, Rendered), ...]``."""
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
) -> list[ExportResult]:
    """Write the configs of ``targets`` for ``pipeline`` into ``out_dir``; one :class:`ExportResult` per file.

    All files are rendered and all paths checked before the first write, so a refused overwrite leaves nothing
    behind; each file is written atomically (temp file + rename). ``out_dir`` is created if missing. An existing
    file is replaced only with ``overwrite=True``; otherwise :class:`UserError`.
    """
    rendered = render_pipeline(pipeline, targets)
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: is not a directory (--out-dir)")
    paths = [folder / r.filename for _, r in rendered]
    seen: set[Path] = set()
    for path in paths:
        if path in seen:  # pragma: no cover - guarded by distinct filenames per target
            raise UserError(f"{path}: two exports would write the same file")
        seen.add(path)
        if path.is_dir():
            raise UserError(f"{path}: is a directory, expected a file path")
        if path.exists() and not overwrite:
            raise UserError(f"{path}: already exists (pass --force to overwrite)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{folder}: cannot create the output folder ({exc.strerror})") from None
    results = []
    for (target, r), path in zip(rendered, paths):
        atomic_write_text(path, r.text, overwrite=overwrite)
        results.append(ExportResult(target=target, path=path, notes=r.notes))
    return results


__all__ = ["EXPORTERS", "TARGETS", "Exporter", "ExportResult", "export_pipeline", "parse_targets", "render_pipeline"]
