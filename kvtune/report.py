"""Human-readable reports: the Pareto front table and one pipeline's measured numbers."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from kvtune.pipeline import Pipeline


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def front_table(front: list[Pipeline], recommended: Pipeline | None, max_loss: float | None = None,
                title: str = "Pareto front") -> Table:
    table = Table(title=title)
    for col, just in (("", "left"), ("pipeline", "left"), ("quality loss", "right"), ("KL", "right"),
                      ("top-1", "right"), ("passkey", "right"), ("bytes/token", "right"), ("x smaller", "right"),
                      ("decode ms", "right"), ("capacity", "right")):
        table.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for p in front:
        m = p.measured
        assert m is not None
        mark = "*" if recommended is not None and p.label() == recommended.label() else ""
        if max_loss is not None and m.quality.quality_loss > max_loss + 1e-12:
            mark += " (over loss)"
        table.add_row(
            mark, p.label(), f"{m.quality.quality_loss:.4f}", f"{m.quality.kl_mean:.4f}",
            _pct(m.quality.top1_agreement), _pct(m.quality.passkey_accuracy), f"{m.cost.bytes_per_token:,.0f}",
            f"{m.cost.compression_ratio:.2f}", f"{m.cost.decode_latency_ms + m.cost.transfer_ms:.2f}",
            f"{m.cost.capacity_seqs:,}",
        )
    return table


def measured_lines(p: Pipeline) -> list[str]:
    m = p.measured
    assert m is not None
    q, c = m.quality, m.cost
    lines = [
        f"pipeline      {p.label()}",
        f"quality       loss {q.quality_loss:.4f} = KL {q.kl_mean:.4f} (max {q.kl_max:.3f})"
        + (f" + probe misses {1 - q.probe_retention:.3f}" if q.probe_retention is not None else "")
        + f"; top-1 agreement {_pct(q.top1_agreement)}; perplexity {q.perplexity:.3f} (full {q.perplexity_full:.3f})",
        f"probes        passkey {_pct(q.passkey_accuracy)} (full {_pct(q.passkey_full_accuracy)}), "
        f"kv-retrieval {_pct(q.kv_retrieval_accuracy)} (full {_pct(q.kv_retrieval_full_accuracy)})",
        f"memory        {c.bytes_per_token:,.0f} bytes/token vs {c.bytes_per_token_full:,.0f} full "
        f"({c.compression_ratio:.2f}x smaller)",
        f"capacity      {c.capacity_seqs:,} sequences of {c.context_tokens:,} tokens vs {c.capacity_full_seqs:,} "
        f"full, in {c.memory_budget_bytes / 2**30:.2f} GiB",
        f"decode        {c.decode_latency_ms:.3f} ms attention/step vs {c.decode_latency_full_ms:.3f} ms full"
        + (f", +{c.transfer_ms:.3f} ms exposed transfer" if c.transfer_ms else "")
        + f" [{c.backend} on {c.device}]",
    ]
    lines += [f"note          {n}" for n in c.notes]
    return lines


def print_measured(console: Console, p: Pipeline) -> None:
    for line in measured_lines(p):
        console.print(line, highlight=False, markup=False)
