"""Shared pieces of the exporters: notes, budgets, capacity, headers and deterministic rendering.

Three rules every exporter follows (docs/exports.md spells them out per stack):

1. *Expressible* — the stage or switch maps to a stack option; the option is written.
2. *Partly expressible* — the method maps but one of its parameters does not; the option is written with the
   nearest value the stack accepts, and a note says what changed.
3. *Not expressible* — nothing is written for it, so the stack keeps its lossless behaviour (every token kept,
   KV in the model dtype); a note names what was left out and the nearest supported setting, which is *not*
   applied, because kvtune never measured its quality.

Notes end up in the exported file (as comments) and on stderr (the command prints them); never silently.
Rendering is deterministic: no clocks, no hostnames, keys in a fixed order, floats written with fixed rules.

Safe emission: text that comes from the pipeline (its name, the model source, string parameters inside stage
labels) reaches files only through the emitters below. YAML values go through ``yaml.safe_dump``; comment lines
through :func:`comment_block`, which escapes every character a YAML parser treats as a line break (``\n``,
``\r``, NEL, U+2028/9) and every other control character (:func:`kvtune.errors.printable`), so no value can end
a comment and start a key; Python docstrings through :func:`python_docstring` and Python values through
:func:`python_literal`, so no value can end a string and start a statement.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from kvtune.errors import printable
from kvtune.io import dump_yaml
from kvtune.pipeline import Pipeline, Stage
from kvtune.report import measured_lines

GIB = 1024**3

IDENTITY_CODECS = ("fp16", "bf16")
# kvtune's own selectors (a plugin's name is an unknown method here). Spelled out rather than read from the
# registry, which imports torch, so `kvtune export --help` stays fast; a test keeps it equal to the registry.
KNOWN_SELECTIONS = (
    "none", "streaming_llm", "snapkv", "h2o", "pyramidkv", "ada_kv", "tova", "knorm", "sliding_window", "random",
    "snapkv_agnostic", "spill_recall",
)


@dataclass(frozen=True)
class Rendered:
    """One file an exporter produces: its name inside the output folder, its text, and its notes."""

    filename: str
    text: str
    notes: tuple[str, ...] = ()


@dataclass
class Notes:
    """Collects what a stack cannot express (``dropped``) and other facts the user must know (``info``)."""

    stack: str
    dropped: list[str] = field(default_factory=list)
    info: list[str] = field(default_factory=list)

    def not_expressible(self, what: str, nearest: str) -> None:
        self.dropped.append(f"{what}: not expressible in {self.stack}; nearest supported: {nearest}")

    def approximated(self, what: str, how: str) -> None:
        self.dropped.append(f"{what}: approximated in {self.stack}: {how}")

    def note(self, text: str) -> None:
        self.info.append(text)

    def all(self) -> tuple[str, ...]:
        return tuple(self.dropped)


# -- pipeline facts ---------------------------------------------------------------------------------------


def context_tokens(p: Pipeline) -> int | None:
    """The context length the pipeline was measured at (cost), else the workload's p90, else None."""
    if p.measured is not None:
        return p.measured.cost.context_tokens
    wl = p.provenance.workload if p.provenance is not None else None
    if wl is not None and wl.context_p90:
        return wl.context_p90
    return None


def budget_of(stage: Stage) -> float | int | None:
    value = stage.params.get("budget")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def keep_fraction(stage: Stage, ctx: int | None) -> tuple[float | None, str | None]:
    """Fraction of the context a selection keeps, and how it was derived when it needed a conversion.

    A float budget is the fraction itself; an int budget is a token count, turned into a fraction of ``ctx``.
    Returns ``(None, reason)`` when no fraction can be derived.
    """
    budget = budget_of(stage)
    if budget is None:
        return None, "no 'budget' parameter"
    if isinstance(budget, float):
        return budget, None
    if ctx is None:
        return None, f"budget is {budget} tokens and no context length is known to turn it into a fraction"
    frac = min(1.0, budget / ctx)
    return frac, f"budget {budget} tokens = {fmt_num(frac)} of the {ctx}-token context it was measured at"


def keep_tokens(stage: Stage, ctx: int | None) -> tuple[int | None, str | None]:
    """Tokens a selection keeps, and how it was derived when it needed a conversion (see :func:`keep_fraction`)."""
    budget = budget_of(stage)
    if budget is None:
        return None, "no 'budget' parameter"
    if isinstance(budget, int):
        return budget, None
    if ctx is None:
        return None, f"budget is a fraction ({fmt_num(budget)}) and no context length is known to turn it into tokens"
    tokens = min(ctx, max(1, math.ceil(budget * ctx)))
    return tokens, f"budget {fmt_num(budget)} of the {ctx}-token context it was measured at = {tokens} tokens"


def int_param(stage: Stage, name: str, default: int | None = None) -> int | None:
    value = stage.params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        return default
    return value


def float_param(stage: Stage, name: str, default: float | None = None) -> float | None:
    value = stage.params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return float(value)


def str_param(stage: Stage, name: str, default: str | None = None) -> str | None:
    value = stage.params.get(name, default)
    return value if isinstance(value, str) else default


def host_bytes(p: Pipeline) -> int | None:
    """Host memory for the offloaded KV: ``placement.params.host_bytes``, else derived from measurements.

    Derived as ``capacity_seqs * context_tokens * bytes_per_token * (1 - gpu_fraction)``: the share of the KV of a
    full batch that the pipeline keeps off the GPU. None when neither is available.
    """
    if p.placement.method != "offload":
        return None
    explicit = int_param(p.placement, "host_bytes")
    if explicit is not None and explicit > 0:
        return explicit
    if p.measured is None:
        return None
    cost = p.measured.cost
    share = 1.0 - (float_param(p.placement, "gpu_fraction", 0.25) or 0.0)
    derived = int(cost.capacity_seqs * cost.context_tokens * cost.bytes_per_token * share)
    return derived if derived > 0 else None


def profile_kv_dtype(profile: Any, p: Pipeline, notes: "Notes", *, fallback_note: str
                     ) -> tuple[str | None, str | None, bool]:
    """The KV dtype ``profile`` (a :class:`kvtune.stacks.StackProfile`) stores ``p.codec`` in: ``(value or None for
    the model dtype, the attention backend that value needs or None, exact)``. ``exact``: the stack runs the codec
    as measured (same format and scale granularity, the profile's ``kv_dtypes``). A nearest entry (another scale
    granularity or format) is written with a note; a codec with none is not expressible (``fallback_note``)."""
    codec = p.codec
    if codec.method in IDENTITY_CODECS:
        return None, None, True
    entry, exact = profile.kv_dtype(codec)
    if entry is None:
        notes.not_expressible(f"codec {codec.label()}", fallback_note)
        return None, None, False
    if not exact:
        want = ", ".join(f"{k}={v}" for k, v in entry["codec"].items() if k != "method")
        notes.approximated(
            f"codec {codec.label()}",
            f"written as {entry['value']} ({want}: {entry['numerics']}); kvtune measured the codec as given, not "
            f"this: 'kvtune recommend --stack {profile.stack}' measures what {profile.name} runs",
        )
    return str(entry["value"]), entry.get("attention_backend"), exact


def codec_factor(stack_kv_dtype: str) -> float:
    """Bytes of the stack's KV element relative to the 16-bit model dtype (8-bit dtypes: fp8*, int8_per_token_head)."""
    return 0.5 if stack_kv_dtype.startswith(("fp8", "int8")) else 1.0


def stack_capacity(p: Pipeline, *, exact: bool, stack_kv_dtype: str, kept_fraction: float = 1.0
                   ) -> tuple[int | None, str]:
    """Concurrent sequences to configure on a stack, with a sentence saying where the number comes from.

    ``exact``: the stack realizes the pipeline's stored form as measured, so the measured ``capacity_seqs``
    holds. Otherwise the stack keeps every token on the GPU in ``stack_kv_dtype``, so the capacity is the
    measured full-cache capacity scaled by the element size and by the share of each context the stack keeps
    (``capacity_full_seqs / (factor * kept_fraction)``; ``kept_fraction`` < 1 for a window the stack realizes).
    """
    if p.measured is None:
        return None, "no measured capacity in the pipeline: the stack's default is kept"
    cost = p.measured.cost
    if exact:
        seqs = cost.capacity_seqs
        how = f"measured capacity: {seqs} sequences of {cost.context_tokens} tokens"
    else:
        kept = min(1.0, max(kept_fraction, 1e-9))
        seqs = int(cost.capacity_full_seqs / (codec_factor(stack_kv_dtype) * kept))
        share = "every token" if kept >= 1.0 else f"{fmt_num(kept)} of each context"
        how = (
            f"the stack keeps {share} on the GPU in its KV dtype, so capacity is the measured full-cache capacity "
            f"({cost.capacity_full_seqs} sequences of {cost.context_tokens} tokens) scaled to that: {seqs}"
        )
    if seqs < 1:
        return None, f"measured capacity is {seqs} sequences: the stack's default is kept"
    return seqs, how


def model_id(p: Pipeline) -> str | None:
    """The model as a hub id ``org/name`` when provenance has one (a local path is not portable)."""
    if p.provenance is None or p.provenance.model is None:
        return None
    source = p.provenance.model.source
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) and not source.endswith((".gguf", ".safetensors")):
        return source
    return None


# -- rendering --------------------------------------------------------------------------------------------


def fmt_num(value: float) -> str:
    """A float written the same way on every run: up to 6 significant digits, no exponent for usual sizes."""
    text = f"{value:.6g}"
    return text


def round_gib(n_bytes: int) -> float:
    """Bytes to GiB, rounded up to 2 decimals (never under-provision the host tier)."""
    return math.ceil(n_bytes / GIB * 100) / 100


def header_lines(*, title: str, p: Pipeline, stack: str, version: str, options_file: str | None,
                 usage: list[str], notes: Notes, kvtune_version: str, measured_title: str | None = None) -> list[str]:
    """The comment block at the top of every exported file (without comment markers).

    A measured pipeline's figures follow, as the recommend report prints them (:func:`kvtune.report.measured_lines`),
    under a title saying whether the file runs exactly what was measured (nothing left out or changed) or not;
    ``measured_title`` replaces that title where the file's own rule differs (the HF script runs kvtune's cache)."""
    lines = [title, f"checked against {stack} {version}"]
    if options_file:
        lines[-1] += f" (option list: kvtune/export/options/{options_file})"
    lines.append(f"generated by kvtune {kvtune_version} from pipeline: {p.label()}")
    if p.name:
        lines.append(f"pipeline name: {p.name}")
    if p.provenance is not None and p.provenance.model is not None:
        m = p.provenance.model
        lines.append(
            f"model: {m.name} ({m.source}; {m.layers} layers, {m.kv_heads} KV heads, head_dim {m.head_dim}, {m.dtype})"
        )
    if p.provenance is not None and p.provenance.quality_model:
        lines.append(f"quality measured on: {p.provenance.quality_model}")
    lines.append("")
    lines += usage
    if p.buckets:  # one note for every stack: none switches the KV pipeline by prompt length
        bounds = ", ".join(f"<= {b.max_input_tokens:,}" if b.max_input_tokens else "longer" for b in p.buckets)
        what = f"per-length buckets ({bounds} prompt tokens)"
        if not any(d.startswith(what) for d in notes.dropped):  # header_lines may run twice for one export
            notes.not_expressible(what, f"{stack} cannot switch the KV pipeline by prompt length: this file runs "
                                  "the pipeline's top-level stages (the best single pipeline) for every request; to "
                                  "route by length, export each bucket's stages and serve one deployment per bucket "
                                  "behind a router on prompt length")
    if notes.dropped:
        lines.append("")
        lines.append(f"LEFT OUT OR CHANGED ({stack} {version} cannot express them):")
        lines += [f"  - {d}" for d in notes.dropped]
    if notes.info:
        lines.append("")
        lines.append("Notes:")
        lines += [f"  - {i}" for i in notes.info]
    if p.measured is not None:  # the figures of the recommend report / pipeline file, formatted by the same code
        lines.append("")
        if measured_title is not None:
            lines.append(measured_title)
        elif notes.dropped:
            lines.append(f"Measured by kvtune on the pipeline as given, NOT on what this file runs (see LEFT OUT OR "
                         f"CHANGED; 'kvtune recommend --stack' measures what {stack} runs):")
        else:
            lines.append(f"Measured by kvtune on exactly what this file runs ({stack} {version} numerics):")
        lines += [f"  {line}" for line in measured_lines(p)]
    return lines


def comment_block(lines: list[str], marker: str = "#") -> str:
    """Comment lines, each one line whatever it holds (line breaks and control characters escaped)."""
    return "".join(f"{marker} {printable(line)}".rstrip() + "\n" for line in lines)


def python_docstring(lines: list[str]) -> str:
    """A triple-quoted Python docstring holding ``lines``: control characters escaped, backslashes doubled,
    ``\"\"\"`` written as ``'''`` so the text cannot close the string."""
    body = "\n".join(printable(line) for line in lines).replace("\\", "\\\\").replace('"""', "'''")
    return f'"""{body}\n"""'


def python_literal(data: Any, level: int = 0, indent: int = 4) -> str:
    """A Python literal for JSON-like data, laid out as ``json.dumps(indent=4)`` (dict keys in insertion order).

    Strings are written as JSON string literals, which are valid Python literals with the same value; booleans
    and None as Python's; a non-finite float is refused (it has no literal).
    """
    pad, inner = " " * (indent * level), " " * (indent * (level + 1))
    if isinstance(data, dict):
        if not data:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {python_literal(v, level + 1, indent)}" for k, v in data.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(data, (list, tuple)):
        if not data:
            return "[]"
        return "[\n" + ",\n".join(f"{inner}{python_literal(v, level + 1, indent)}" for v in data) + f"\n{pad}]"
    if data is None or isinstance(data, bool):
        return repr(data)
    if isinstance(data, int):
        return str(data)
    if isinstance(data, float):
        if not math.isfinite(data):
            raise ValueError(f"non-finite number {data!r} has no Python literal")
        return repr(data)
    if isinstance(data, str):
        return json.dumps(data)
    raise TypeError(f"no Python literal for {type(data).__name__}")


def yaml_file(header: list[str], body: dict[str, Any]) -> str:
    text = comment_block(header)
    if body:
        text += "\n" + dump_yaml(body)
    else:
        text += "\n{}\n"
    return text


def kvtune_version() -> str:
    from kvtune import __version__

    return __version__


# -- recorded option lists --------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def load_options(filename: str) -> dict[str, Any]:
    """A recorded option list (``kvtune/export/options/<filename>``), parsed."""
    text = resources.files("kvtune.export").joinpath("options").joinpath(filename).read_text(encoding="utf-8")
    return yaml.safe_load(text)
