"""Human-readable reports: the Pareto front table and one pipeline's measured numbers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from kvtune.pipeline import Pipeline

if TYPE_CHECKING:  # kvtune.buckets imports the measurement modules (torch); the rows only read its result
    from kvtune.buckets import BucketResult


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _speed(p: Pipeline) -> tuple[str, str, str, str]:
    sv = p.measured.serving if p.measured else None
    if sv is None:
        return "-", "-", "-", "-"
    return f"{sv.tokens_per_s:,.1f}", f"{sv.tpot_ms:,.2f}", f"{sv.ttft_ms:,.0f}", f"{sv.batch:,}"


def front_rows(front: list[Pipeline], recommended: Pipeline | None,
               max_loss: float | None = None) -> tuple[str, list[tuple[str, str]], list[tuple[str, ...]]]:
    """The Pareto front's figures: (serving target, [(column, justify)], rows); the table and the Markdown report
    both render these."""
    target = next((p.measured.serving for p in front if p.measured and p.measured.serving), None)
    at = f" @ {target.tpot_target_ms:g} ms" if target is not None and target.tpot_target_ms else ""
    columns = [("", "left"), ("pipeline", "left"), ("quality loss", "right"), ("KL", "right"),
               ("top-1", "right"), ("passkey", "right"), ("follow-ups", "right"), ("bytes/token", "right"),
               ("x smaller", "right"), (f"tokens/s{at}", "right"), ("TPOT ms", "right"), ("TTFT ms", "right"),
               ("batch", "right")]
    rows = []
    for p in front:
        m = p.measured
        assert m is not None
        mark = "*" if recommended is not None and p.label() == recommended.label() else ""
        if max_loss is not None and m.quality.quality_loss > max_loss + 1e-12:
            mark += " (over loss)"
        rows.append((
            mark, p.label(), f"{m.quality.quality_loss:.4f}", f"{m.quality.kl_mean:.4f}",
            _pct(m.quality.top1_agreement), _pct(m.quality.passkey_accuracy), _pct(m.quality.followup_retention),
            f"{m.cost.bytes_per_token:,.0f}",
            f"{m.cost.compression_ratio:.2f}", *_speed(p),
        ))
    return (target.target if target is not None else ""), columns, rows


def front_table(front: list[Pipeline], recommended: Pipeline | None, max_loss: float | None = None,
                title: str = "Pareto front") -> Table:
    target, columns, rows = front_rows(front, recommended, max_loss)
    table = Table(title=title + (f" - serving figures for {target}" if target else ""))
    for col, just in columns:
        table.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    return table


SIDE_BY_SIDE_COLUMNS = (("figure", "left"), ("recommended", "right"), ("full cache", "right"), ("source", "left"))


def side_by_side(best: Pipeline, full: Pipeline) -> Table:
    """The recommendation and the full cache on the target, each figure with its provenance."""
    title, rows = side_by_side_rows(best, full)
    table = Table(title=title)
    for col, just in SIDE_BY_SIDE_COLUMNS:
        table.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*row)
    return table


def side_by_side_rows(best: Pipeline, full: Pipeline) -> tuple[str, list[tuple[str, str, str, str]]]:
    """(title, rows) of :func:`side_by_side`: figure, recommended, full cache, source."""
    b, f = best.measured.serving, full.measured.serving  # type: ignore[union-attr]
    assert b is not None and f is not None
    title = (f"On {b.target} over the workload (TPOT target {b.tpot_target_ms:g} ms)"
             if b.tpot_target_ms else f"On {b.target} over the workload")

    def src(key: str) -> str:
        return b.provenance.get(key, "-")

    bc, fc = best.measured.cost, full.measured.cost  # type: ignore[union-attr]
    rows = [
        ("KV bytes/token", f"{bc.bytes_per_token:,.0f}", f"{fc.bytes_per_token:,.0f}", src("bytes_per_token")),
        ("batch (fits / at target)", f"{b.max_batch:,} / {b.batch:,}", f"{f.max_batch:,} / {f.batch:,}", src("max_batch")),
        ("TPOT ms", f"{b.tpot_ms:,.2f}", f"{f.tpot_ms:,.2f}", src("tpot_ms")),
        ("  weights / KV / compute ms", f"{b.weights_ms:,.2f} / {b.kv_ms:,.2f} / {b.compute_ms:,.2f}",
         f"{f.weights_ms:,.2f} / {f.kv_ms:,.2f} / {f.compute_ms:,.2f}", "parts of the step"),
        ("  offload copy (exposed) ms", f"{b.copy_ms:,.2f} ({b.exposed_copy_ms:,.2f})",
         f"{f.copy_ms:,.2f} ({f.exposed_copy_ms:,.2f})", "tier read rate from the profile (kvtune.measure.tiers)"),
        ("output tokens/s", f"{b.tokens_per_s:,.1f}", f"{f.tokens_per_s:,.1f}", src("tokens_per_s")),
        ("TTFT ms (median prompt)", f"{b.ttft_ms:,.0f}", f"{f.ttft_ms:,.0f}", src("ttft_ms")),
        ("prefix hits device / host+disk", f"{_pct(b.hit_rate_device)} / {_pct(b.hit_rate_lower)}",
         f"{_pct(f.hit_rate_device)} / {_pct(f.hit_rate_lower)}", src("hit_rates")),
        ("decode context, tokens", f"{b.decode_context:,.0f}", f"{f.decode_context:,.0f}", src("decode_context")),
    ]
    return title, rows


def multiturn_lines(q) -> list[str]:
    """Per-turn accuracy of a candidate and of the full cache on the multi-turn probes (none if not run)."""
    if q.turn_accuracy is None or q.turn_accuracy_full is None:
        return []
    per = " / ".join(_pct(x) for x in q.turn_accuracy)
    full = " / ".join(_pct(x) for x in q.turn_accuracy_full)
    return [f"multi-turn    accuracy by turn {per} (full cache {full}); of the turns the full cache answers, "
            f"turn 1 {_pct(q.turn1_retention)} and follow-ups {_pct(q.followup_retention)} kept (full cache: all); "
            f"answer KL {q.multiturn_kl:.3f}"]


def measured_lines(p: Pipeline) -> list[str]:
    m = p.measured
    assert m is not None
    q, c = m.quality, m.cost
    lines = [
        f"pipeline      {p.label()}",
        f"quality       loss {q.quality_loss:.4f} = KL {q.kl_mean:.4f} (max {q.kl_max:.3f})"
        + (f" + probe misses {1 - q.probe_retention:.3f}" if q.probe_retention is not None else "")
        + (f" + weight x follow-up misses {1 - q.followup_retention:.3f}" if q.followup_retention is not None else "")
        + f"; top-1 agreement {_pct(q.top1_agreement)}; perplexity {q.perplexity:.3f} (full {q.perplexity_full:.3f})",
        f"probes        passkey {_pct(q.passkey_accuracy)} (full {_pct(q.passkey_full_accuracy)}), "
        f"kv-retrieval {_pct(q.kv_retrieval_accuracy)} (full {_pct(q.kv_retrieval_full_accuracy)})",
        *multiturn_lines(q),
        f"memory        {c.bytes_per_token:,.0f} bytes/token vs {c.bytes_per_token_full:,.0f} full "
        f"({c.compression_ratio:.2f}x smaller)",
        f"capacity      {c.capacity_seqs:,} sequences of {c.context_tokens:,} tokens vs {c.capacity_full_seqs:,} "
        f"full, in a {c.memory_budget_bytes / 2**30:.2f} GiB device pool",
    ]
    if c.decode_latency_ms is not None and c.decode_latency_full_ms is not None:
        lines.append(f"attention     {c.decode_latency_ms:.3f} ms/step vs {c.decode_latency_full_ms:.3f} ms full, one "
                     f"sequence (measured: {c.backend} on {c.device})")
    sv = m.serving
    if sv is not None:
        target = f" (target {sv.tpot_target_ms:g} ms)" if sv.tpot_target_ms else ""
        lines += [
            f"serving       {sv.tokens_per_s:,.1f} output tokens/s on {sv.target} at batch {sv.batch:,} "
            f"(fits {sv.max_batch:,}, bound: {sv.batch_bound}); TPOT {sv.tpot_ms:,.2f} ms{target}; "
            f"TTFT {sv.ttft_ms:,.0f} ms",
            f"prefix cache  {_pct(sv.hit_rate_device)} of prompt tokens from the device, "
            f"{_pct(sv.hit_rate_lower)} from host/disk, {_pct(sv.prompt_recomputed)} prefilled again",
        ]
        lines += [f"source        {k}: {v}" for k, v in sv.provenance.items()]
        lines += [f"note          {n}" for n in sv.notes]
    lines += [f"note          {n}" for n in c.notes]
    return lines


def print_measured(console: Console, p: Pipeline) -> None:
    for line in measured_lines(p):
        console.print(line, highlight=False, markup=False)


# -- per-length-bucket recommendation (kvtune.buckets); the terminal and the Markdown report render these rows --

BUCKET_COLUMNS = (("bucket (prompt tokens)", "left"), ("requests", "right"), ("tokens", "right"),
                  ("median prompt", "right"), ("quality measured at", "right"), ("pipeline", "left"),
                  ("quality loss", "right"), ("tokens/s", "right"), ("bytes/token", "right"),
                  ("best single: loss", "right"), ("best single: tokens/s", "right"))


def bucket_rows(result: "BucketResult") -> list[tuple[str, ...]]:
    """One row per bucket (:data:`BUCKET_COLUMNS`): its range, share of requests and of prompt + output tokens, the
    median prompt and the length quality was measured at, the pick's figures there, the best single pipeline's."""
    single = result.single.label() if result.single is not None else None
    rows, low = [], 0
    for b, p in zip(result.buckets, result.picks):
        m = p.measured
        assert m is not None
        s = result.measured[b.index][single].measured if single is not None else None
        tps = f"{m.serving.tokens_per_s:,.0f}" if m.serving is not None else "-"
        rows.append((b.label(low), _pct(b.share), _pct(result.token_share(b)), f"{b.representative:,}",
                     f"{b.measured_at:,}" + (" (capped)" if b.cap_reason else ""), p.label(),
                     f"{m.quality.quality_loss:.4f}", tps, f"{m.cost.bytes_per_token:,.0f}",
                     "-" if s is None else f"{s.quality.quality_loss:.4f}",
                     "-" if s is None or s.serving is None else f"{s.serving.tokens_per_s:,.0f}"))
        low = b.max_input_tokens or low
    return rows


def bucket_summary(result: "BucketResult") -> list[str]:
    """What the table means: how many different pipelines, the routed set against the best single pipeline over
    the workload mix (figures from :func:`kvtune.buckets.aggregate`), and the notes (capped lengths)."""
    r, single = result, result.single
    distinct = len({p.label() for p in r.picks})
    target = next((p.measured.serving.target for p in r.picks if p.measured and p.measured.serving), "the target")
    lines = [f"{distinct} different pipeline{'s' if distinct != 1 else ''} over {len(r.buckets)} buckets"
             + (f"; best single pipeline: {single.label()}" if single is not None else
                "; no single pipeline is feasible in every bucket")
             + (" (the measurements pick the same pipeline in every bucket)" if distinct == 1 else "")]

    def agg(a) -> str:
        return (f"{a.tokens_per_s:,.0f} output tokens/s, quality loss {a.quality_loss:.4f}, "
                f"{a.bytes_per_token:,.0f} B/token, TTFT {a.ttft_ms:,.0f} ms")

    lines.append(f"over the workload mix (serving model on {target}; tokens/s = all output tokens over the time each "
                 f"bucket takes, the rest request-weighted): routed {agg(r.routed)}")
    if r.single_agg is not None and single is not None:
        gain = r.gain
        lines.append(f"best single {single.label()}: {agg(r.single_agg)}; gain of routing "
                     f"{'-' if gain is None else f'{gain:+.1%}'} tokens/s")
    return lines + list(r.notes)
