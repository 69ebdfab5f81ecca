"""``recommend --report DIR``: a report people read — Markdown, the Pareto front and the workload as PNGs.

The folder holds ``report.md``, ``pareto.png`` (quality loss against output tokens/s — time to first token for
a scenario that prefers it — and against KV bytes per token; every trial, the Pareto front, the recommended
point marked, the scenario's quality-loss ceiling drawn) and ``workload.png`` (the workload's context-length
histogram from the profile's power-of-two buckets; a ``--buckets`` run draws the routing bounds on it and adds
``buckets.png``: each candidate's speed and quality loss per length bucket). The tables are :mod:`kvtune.report`'s rows (the same figures
the terminal shows), each serving figure with its provenance; nothing is computed here a second time.

The folder is written whole: staged in a hidden sibling folder, then renamed into place, so a killed run leaves
no half report under DIR. An existing DIR is replaced only when it is a report kvtune wrote (it holds the
:data:`MARKER` file) or empty, else only with ``--force``. matplotlib is optional (``pip install kvtune[plot]``):
:func:`check_report_dir` says so in one line before any model loads.
"""

from __future__ import annotations

import importlib.util
import io
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtune.errors import UserError, printable
from kvtune.io import STAGE_MARK, can_create_in, current_umask, new_file_mode, remove_stale_stages, show
from kvtune.pipeline import Pipeline
from kvtune.report import (BUCKET_COLUMNS, SIDE_BY_SIDE_COLUMNS, bucket_rows, bucket_summary, front_rows,
                           measured_lines, side_by_side_rows)
from kvtune.scenarios import Scenario
from kvtune.search import feasible, objectives, pareto_front, speed
from kvtune.storage import parse_storage

MARKER = ".kvtune-report"  # present in every report folder kvtune writes
FILES = ("report.md", "pareto.png", "workload.png", "buckets.png")  # buckets.png: --buckets runs


def check_report_dir(path: Path, force: bool) -> None:
    """Fail early (before the model loads): matplotlib missing, DIR a file, DIR a folder kvtune did not write
    (without ``--force``), or nowhere to create it."""
    if str(path) == "":
        raise UserError("--report: empty path")
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("--report: needs matplotlib (pip install 'kvtune[plot]')")
    if path.exists() and not path.is_dir():
        raise UserError(f"--report {show(path)}: is a file, expected a folder")
    if path.is_dir() and not force and not (path / MARKER).exists() and any(path.iterdir()):
        raise UserError(f"--report {show(path)}: exists and is not a report kvtune wrote; pass --force to replace it")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise UserError(f"--report {show(path)}: folder {show(parent)} does not exist")
    if not can_create_in(parent):
        raise UserError(f"--report {show(path)}: folder {show(parent)} is not writable")


@dataclass
class ReportInput:
    """What the report shows: every measured trial of the study and the scenario's pick."""

    trials: list[Pipeline]
    best: Pipeline  # with provenance
    feasible: bool
    scenario: Scenario
    workload: Any  # kvtune.profile.schema.WorkloadProfile | None
    study: str
    storage: str  # already redacted
    rejected: int = 0
    buckets: Any = None  # kvtune.buckets.BucketResult of a --buckets run (its study is ``trials``' bucket)


def _cell(text: str) -> str:
    return printable(str(text), 300).replace("|", "\\|").replace("\n", " ")


def _md_table(columns: list[tuple[str, str]] | tuple[tuple[str, str], ...], rows: list[tuple[str, ...]]) -> str:
    head = "| " + " | ".join(_cell(c) or " " for c, _ in columns) + " |"
    rule = "| " + " | ".join("---:" if just == "right" else "---" for _, just in columns) + " |"
    body = ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _speed_axis(prefer: str) -> tuple[str, float]:
    """(label, sign) of the speed objective as plotted: tokens/s (objective is minus it) or TTFT."""
    return ("time to first token, ms (lower is better)", 1.0) if prefer == "ttft" else \
        ("output tokens/s at the TPOT target (higher is better)", -1.0)


def pareto_png(inp: ReportInput) -> bytes:
    """Two panels: quality loss vs speed and vs KV bytes per token; all trials, the front, the pick, the ceiling."""
    from matplotlib.figure import Figure  # deferred: matplotlib is optional and slow to import

    prefer = inp.scenario.prefer
    measured = [p for p in inp.trials if p.measured is not None]
    front = {p.label() for p in pareto_front(measured, prefer)}
    speed_label, sign = _speed_axis(prefer)
    sv = inp.best.measured.serving if inp.best.measured else None  # type: ignore[union-attr]
    fig = Figure(figsize=(11, 4.6), dpi=110)
    axes = fig.subplots(1, 2, sharey=True)
    ceiling = inp.scenario.max_quality_loss
    for ax, index, xlabel in ((axes[0], 1, speed_label), (axes[1], 2, "KV bytes per token (lower is better)")):
        pts = [(objectives(p, prefer), p) for p in measured]
        xs = [(sign * o[index] if index == 1 else o[index]) for o, _ in pts]
        ys = [o[0] for o, _ in pts]
        on = [i for i, (_, p) in enumerate(pts) if p.label() in front]
        ax.scatter(xs, ys, s=22, c="#9aa5b1", label="trial", zorder=2)
        ax.scatter([xs[i] for i in on], [ys[i] for i in on], s=40, c="#1f77b4", label="Pareto front", zorder=3)
        bo = objectives(inp.best, prefer)
        bx = sign * bo[1] if index == 1 else bo[2]
        ax.scatter([bx], [bo[0]], s=260, marker="*", c="#d62728", edgecolors="black", linewidths=0.6,
                   label="recommended", zorder=4)
        ax.axhline(ceiling, color="#d62728", linestyle="--", linewidth=1,
                   label=f"{inp.scenario.name} ceiling {ceiling:g}")
        ax.set_xlabel(xlabel)
        ax.set_yscale("symlog", linthresh=min(0.01, ceiling))
        ax.grid(True, alpha=0.3)
        if index == 2:
            ax.set_xscale("log")
    axes[0].set_ylabel("quality loss vs the full cache (lower is better)")
    axes[0].legend(loc="best", fontsize=8)
    where = f"serving model for {sv.target}" if sv is not None else "no serving figures"
    fig.suptitle(f"{inp.scenario.name}: {len(measured)} trials, {len(front)} on the front ({where}; quality measured "
                 "on the model)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def workload_png(workload: Any, context_tokens: int | None, routed: Any = None) -> bytes:
    """The workload's context-length histogram (total and prompt tokens per request, power-of-two buckets); a
    ``--buckets`` run (``routed``: its BucketResult) draws the routing bounds and each bucket's measured lengths."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8), dpi=110)
    ax = fig.subplots()
    for stats, label, color, second in ((workload.total_tokens, "context (prompt + output)", "#1f77b4", False),
                                        (workload.input_tokens, "prompt", "#ff7f0e", True)):
        buckets = stats.histogram
        if not buckets:
            continue
        # each bucket [lo, hi) split at its geometric middle (the middle on the log axis): context left, prompt right
        edges = [(max(b.lo, 1), (max(b.lo, 1) * b.hi) ** 0.5, b.hi) for b in buckets]
        lefts = [mid if second else lo for lo, mid, _ in edges]
        widths = [(hi - mid) if second else (mid - lo) for lo, mid, hi in edges]
        shares = [b.count / stats.count for b in buckets]
        ax.bar(lefts, shares, width=widths, align="edge", color=color, alpha=0.9, label=label,
               edgecolor="white", linewidth=0.5)
    t = workload.total_tokens
    for value, name in ((t.p50, "p50"), (t.p90, "p90"), (t.p99, "p99")):
        ax.axvline(max(value, 1), color="#444444", linestyle=":", linewidth=1)
        ax.text(max(value, 1), ax.get_ylim()[1] * 0.95, f" {name}", fontsize=8, va="top")
    if context_tokens:
        ax.axvline(context_tokens, color="#d62728", linestyle="--", linewidth=1,
                   label=f"cost measured at {context_tokens:,} tokens")
    for i, b in enumerate(routed.buckets if routed is not None else ()):
        if b.max_input_tokens is not None:
            ax.axvline(b.max_input_tokens, color="#2ca02c", linestyle="-", linewidth=1.5,
                       label="bucket bound (prompt tokens)" if i == 0 else None)
        ax.plot([b.representative], [0], marker="^", markersize=9, color="#d62728", clip_on=False, zorder=5,
                label="bucket median prompt (cost)" if i == 0 else None)
        if b.measured_at != b.representative:
            ax.plot([b.measured_at], [0], marker="^", markersize=9, color="#9467bd", clip_on=False, zorder=5,
                    label="quality measured at (capped)" if not any(c.cap_reason for c in routed.buckets[:i]) else None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per request")
    ax.set_ylabel("share of requests")
    ax.set_title(printable(f"workload {workload.name}: {workload.requests:,} requests", 100), fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


BUCKETS_HOOK = "<!-- kvtune:buckets -->"


def buckets_section(inp: ReportInput) -> list[str]:
    """The per-length-bucket table and the routed set against the best single pipeline (a ``--buckets`` run), else
    the marked hook."""
    lines = ["## Per length bucket", "", BUCKETS_HOOK]
    r = inp.buckets
    if r is None:
        return lines + ["One pipeline serves every length: this recommendation has no `buckets` section "
                        "(`kvtune recommend --buckets auto` recommends one pipeline per prompt-length bucket).", ""]
    out = lines + ["A prompt runs the first bucket whose bound holds. Each bucket's quality is measured on the model at "
                   "the length shown (its median prompt, capped where the model cannot answer longer ones), its cost "
                   "and serving figures at its median prompt over its own requests; every bucket chooses among the "
                   "same candidates, each measured in every bucket.", "",
                   _md_table(BUCKET_COLUMNS, bucket_rows(r)), "", *(f"- {_cell(line)}" for line in bucket_summary(r)),
                   "", "![Per-bucket candidates](buckets.png)", "",
                   "Each candidate in each bucket: output tokens/s on the target (left) and quality loss (right, the "
                   "scenario's ceiling dashed); the bucket's pick outlined in black, candidates over the ceiling "
                   "hatched. The Pareto front above is the study of bucket "
                   f"{_largest(r) + 1} (the most requests); its star is the document's top-level pipeline (the best "
                   "single one, what a stack that cannot route runs).", ""]
    return out


def _largest(r: Any) -> int:
    return max(range(len(r.buckets)), key=lambda i: r.buckets[i].share)


def buckets_png(inp: ReportInput) -> bytes:
    """Per bucket, every candidate of the pool: tokens/s and quality loss, the pick outlined, infeasible hatched."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    r, scen = inp.buckets, inp.scenario
    speed_label, sign = _speed_axis(scen.prefer)
    n, k = len(r.buckets), len(r.pool)
    width = 0.8 / max(1, k)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
    fig = Figure(figsize=(11, 5.2), dpi=110)
    axes = fig.subplots(1, 2)
    low, ticks = 0, []
    for b in r.buckets:
        ticks.append(f"bucket {b.index + 1}\n{b.label(low)}\n{b.share:.0%} of requests")
        low = b.max_input_tokens or low
    for j, label in enumerate(r.pool):
        color = colors[j % len(colors)]
        for i, b in enumerate(r.buckets):
            p = r.measured[i][label]
            m = p.measured
            x = i - 0.4 + (j + 0.5) * width
            pick = r.picks[i].label() == label
            ok = feasible(p, scen)
            style = dict(width=width, color=color, edgecolor="black" if pick else "white",
                         linewidth=1.8 if pick else 0.5, hatch=None if ok else "//")
            axes[0].bar(x, sign * speed(p, scen.prefer), **style)
            axes[1].bar(x, m.quality.quality_loss, **style)
    for ax in axes:
        ax.set_xticks(range(n), ticks, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel(speed_label, fontsize=9)
    axes[1].set_ylabel("quality loss vs the full cache", fontsize=9)
    axes[1].axhline(scen.max_quality_loss, color="#d62728", linestyle="--", linewidth=1,
                    label=f"{scen.name} ceiling {scen.max_quality_loss:g}")
    axes[1].set_yscale("symlog", linthresh=min(0.01, scen.max_quality_loss))
    handles = [Patch(color=colors[j % len(colors)], label=_short(label)) for j, label in enumerate(r.pool)]
    handles += [Patch(facecolor="white", edgecolor="black", linewidth=1.8, label="the bucket's pick"),
                Patch(facecolor="white", edgecolor="#555555", hatch="//", label="over the ceiling (infeasible)")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    axes[1].legend(fontsize=7, loc="upper right")
    gain = r.gain
    distinct = len({p.label() for p in r.picks})
    fig.suptitle(f"{scen.name}: {distinct} different pipeline{'s' if distinct != 1 else ''} over {n} length buckets; "
                 f"routing vs the best single pipeline: {'-' if gain is None else f'{gain:+.1%}'} tokens/s\n"
                 "(speed: serving model on the target; quality: measured on the model)", fontsize=10)
    fig.tight_layout(rect=(0, 0.03 + 0.035 * math.ceil((k + 2) / 3), 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _short(label: str, width: int = 48) -> str:
    return label if len(label) <= width else label[: width - 3] + "..."


def provenance_lines(inp: ReportInput) -> list[str]:
    """Where every figure came from: quality (measured on the model), bytes, each serving figure, the workload."""
    best = inp.best
    m = best.measured
    assert m is not None
    prov = best.provenance
    model = prov.quality_model if prov is not None and prov.quality_model else "the model"
    hw = prov.hardware if prov is not None else None
    lines = [f"- **quality** (loss, KL, top-1, probes): measured: {model} run with the pipeline against the full cache "
             f"({m.quality.eval_tokens:,} evaluation tokens; the trial's kernels ran on {m.cost.device})",
             f"- **bytes per token, capacity**: measured: the stored form at the target's shapes "
             f"({m.cost.backend} on {m.cost.device})"]
    if m.cost.decode_latency_ms is not None:
        lines.append(f"- **attention ms/step**: measured: {m.cost.backend} on {m.cost.device}")
    if m.serving is not None:
        lines += [f"- **{k}**: {v}" for k, v in m.serving.provenance.items()]
    if hw is not None:
        lines.append(f"- **hardware** {hw.name}: {hw.source}")
    if inp.workload is not None:
        w = inp.workload
        lines.append(f"- **workload histogram** {w.name}: {w.requests:,} requests read from {w.source} "
                     f"(token counts: {w.token_counts})")
    return [printable(line, 600) for line in lines]


def _measured_count(measured: list[Pipeline]) -> str:
    """"N measured trials", or "P pipelines measured in N trials" when the sampler proposed some again."""
    distinct = len({p.label() for p in measured})
    if distinct == len(measured):
        return f"{len(measured)} measured trials"
    return f"{distinct} pipelines measured in {len(measured)} trials (the rest repeats, recorded at no cost)"


def render_markdown(inp: ReportInput) -> str:
    best, scen = inp.best, inp.scenario
    m = best.measured
    assert m is not None
    measured = [p for p in inp.trials if p.measured is not None]
    front = pareto_front(measured, scen.prefer)
    prov = best.provenance
    full = next((p for p in measured if p.is_identity()), None)
    out = [f"# kvtune report: {_cell(scen.name)}", "",
           f"Study `{_cell(inp.study)}` in `{_cell(inp.storage)}`: {_measured_count(measured)}"
           f"{f', {inp.rejected} rejected before running or stopped by the probe slice' if inp.rejected else ''}. "
           f"Scenario {_cell(scen.name)}: "
           f"{_cell(scen.summary)}; quality-loss ceiling {scen.max_quality_loss:g}; prefers {scen.prefer}.", ""]
    if prov is not None:
        bits = [f"kvtune {prov.kvtune_version}", f"created {prov.created}"]
        if prov.model is not None:
            bits.append(f"costs priced at {prov.model.name}'s shapes ({prov.model.layers} layers, "
                        f"{prov.model.kv_heads} KV heads, head dim {prov.model.head_dim})")
        if prov.quality_model:
            bits.append(f"quality measured on {prov.quality_model}")
        if prov.hardware is not None:
            bits.append(f"hardware {prov.hardware.name} ({prov.hardware.source})")
        if prov.workload is not None:
            bits.append(f"workload {prov.workload.name}")
        out += [_cell("; ".join(bits)), ""]
    out += ["## Recommendation", "",
            f"**{_cell(best.label())}** — {'meets' if inp.feasible else 'MISSES'} the scenario's quality-loss ceiling "
            f"({scen.max_quality_loss:g}).", "", "```text", *measured_lines(best), "```", ""]
    out += ["## Pareto front", "", "![Pareto front](pareto.png)", "",
            "Grey: every measured trial; blue: the Pareto front (quality loss, speed, bytes per token); red star: the "
            "recommendation; dashed line: the scenario's quality-loss ceiling. Quality is measured on the model; "
            "speed and bytes are the serving model's figures for the target (sources below).", ""]
    target, columns, rows = front_rows(front, best, scen.max_quality_loss)
    out += [_md_table(columns, rows), "", "`*` recommended; `(over loss)` above the ceiling.", ""]
    if full is not None and full.measured is not None and full.measured.serving is not None and m.serving is not None:
        title, srows = side_by_side_rows(best, full)
        out += [f"## {_cell(title)}", "", _md_table(SIDE_BY_SIDE_COLUMNS, srows), ""]
    out += buckets_section(inp)
    if inp.workload is not None:
        w = inp.workload
        t = w.total_tokens
        out += ["## Workload", "", "![Workload context lengths](workload.png)", "",
                _cell(f"{w.requests:,} requests from {w.source}: context p50 {t.p50:,}, p90 {t.p90:,}, p99 {t.p99:,} "
                      f"tokens" + (f"; prefix reuse {w.prefix_reuse_ratio:.0%}" if w.prefix_reuse_ratio is not None
                                   else "") + "."), ""]
    out += ["## Where each figure comes from", "", *provenance_lines(inp), "",
            "## Browse the study", "",
            "The study is an ordinary Optuna study; `optuna-dashboard` reads it (every trial's measured pipeline is "
            "in its user attributes):", "", "```bash", "pip install optuna-dashboard",
            f"optuna-dashboard {dashboard_arg(inp.storage)}", "```", ""]
    if "***" in inp.storage:
        out += ["(the password is not written here: put it back in the URL).", ""]
    return "\n".join(out)


def dashboard_arg(storage: str) -> str:
    """What ``optuna-dashboard`` takes for a storage: the file for a journal, else the URL (already redacted)."""
    spec = parse_storage(storage)
    return _cell(str(spec.file) if spec.kind == "journal" and spec.file is not None else storage)


def write_report(folder: Path, inp: ReportInput, *, force: bool) -> Path:
    """Write the report folder atomically (staged, then renamed into place); returns ``folder/report.md``."""
    check_report_dir(folder, force)
    context = inp.best.measured.cost.context_tokens if inp.best.measured else None
    files: dict[str, bytes] = {"report.md": render_markdown(inp).encode("utf-8"), "pareto.png": pareto_png(inp)}
    if inp.workload is not None:
        files["workload.png"] = workload_png(inp.workload, None if inp.buckets else context, inp.buckets)
    if inp.buckets is not None:
        files["buckets.png"] = buckets_png(inp)
    parent = folder.resolve().parent
    prefix = f".{folder.name}{STAGE_MARK}"
    remove_stale_stages(parent, prefix=prefix)
    stage = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    old: Path | None = None
    try:
        mode = new_file_mode()
        for name, data in {**files, MARKER: b"written by kvtune recommend --report\n"}.items():
            fd = os.open(stage / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        os.chmod(stage, 0o777 & ~current_umask())
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-old-", dir=parent))
            os.rename(folder, old / "previous")
        os.rename(stage, folder)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None and not folder.exists() and (old / "previous").exists():
            os.rename(old / "previous", folder)  # put the earlier report back
        raise UserError(f"--report {show(folder)}: cannot write the report ({exc.strerror})") from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return folder / "report.md"
