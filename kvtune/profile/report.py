"""Rendering a profile for people: rich tables and a terminal histogram (stdout), and an optional PNG."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kvtune.errors import UserError
from kvtune.profile.models import human_bytes, human_tokens
from kvtune.profile.schema import HardwareProfile, LengthStats, Profile, WorkloadProfile

BAR_WIDTH = 40


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f} GB/s"


def hardware_tables(hw: HardwareProfile) -> list[Table]:
    t = Table(title=Text(f"Hardware: {hw.name} ({hw.source})", style="italic"), show_header=False,
              title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value")
    rows: list[tuple[str, str]] = []
    if hw.accelerator:
        g = hw.gpus[0] if hw.gpus else None
        rows.append(("GPU", f"{hw.accelerator}" + (f" x{len(hw.gpus)}" if len(hw.gpus) > 1 else "")))
        rows.append(("GPU memory", f"{human_bytes(hw.gpu_memory_total_bytes)} total"
                     + (f", {human_bytes(hw.gpu_memory_free_bytes)} free" if hw.gpu_memory_free_bytes else "")))
        rows.append(("compute capability / SMs", f"{hw.compute_capability or '-'} / {hw.sm_count or '-'}"))
        if g is not None:
            rows.append(("clocks (max SM / mem)", f"{g.clock_sm_max_mhz or '-'} / {g.clock_mem_max_mhz or '-'} MHz"))
            rows.append(("PCIe (current / max)", f"Gen{g.pcie_gen_current or '?'} x{g.pcie_width_current or '?'} / "
                                                 f"Gen{g.pcie_gen_max or '?'} x{g.pcie_width_max or '?'}"))
            rows.append(("NVLink links active", "-" if g.nvlink_links_active is None else str(g.nvlink_links_active)))
        if hw.power_limit_w:
            rows.append(("power limit", f"{hw.power_limit_w:.0f} W"))
        if hw.driver_version or hw.cuda_driver_version:
            rows.append(("driver / CUDA", f"{hw.driver_version or '-'} / {hw.cuda_driver_version or '-'}"))
        rows.append(("GPU memory bandwidth", _rate(hw.hbm_bandwidth_gbps)))
        rows.append(("host link", f"{hw.host_link or '-'} ({_rate(hw.host_link_theoretical_gbps)} per direction)"))
        rows.append(("H2D / D2H pinned", f"{_rate(hw.h2d_pinned_gbps)} / {_rate(hw.d2h_pinned_gbps)}"))
        if hw.h2d_pageable_gbps is not None:
            rows.append(("H2D / D2H pageable", f"{_rate(hw.h2d_pageable_gbps)} / {_rate(hw.d2h_pageable_gbps)}"))
    else:
        rows.append(("GPU", "none"))
    cores = f"{hw.cpu_cores_physical or '-'} cores / {hw.cpu_cores_logical or '-'} threads"
    rows.append(("CPU", f"{hw.cpu_model or '-'} ({cores}, NUMA nodes: {hw.numa_nodes or '-'})"))
    rows.append(("RAM", f"{human_bytes(hw.cpu_ram_total_bytes)} total, {human_bytes(hw.cpu_ram_available_bytes)} available"))
    rows.append(("host memory copy", _rate(hw.cpu_memory_bandwidth_gbps)))
    if hw.offload_dir:
        rows.append(("offload dir", f"{hw.offload_dir} ({hw.offload_fs_type or '?'}), "
                                    f"{human_bytes(hw.disk_free_bytes)} free, read {_rate(hw.disk_read_gbps)}"))
    for k, v in rows:
        t.add_row(k, Text(v))
    out = [t]
    if hw.bandwidth:
        b = Table(title="Measured copy rates (median of repeats; min-max)", title_justify="left")
        for col in ("copy", "size", "median", "min-max", "of link"):
            b.add_column(col, justify="right" if col != "copy" else "left")
        for s in hw.bandwidth:
            frac = f"{s.fraction_of_theoretical:.0%}" if s.fraction_of_theoretical is not None else "-"
            b.add_row(s.kind, human_bytes(s.size_bytes), f"{s.median_gbps:,.2f} GB/s",
                      f"{s.min_gbps:,.2f}-{s.max_gbps:,.2f}", frac)
        out.append(b)
    return out


def length_table(w: WorkloadProfile) -> Table:
    t = Table(title=Text(f"Workload: {w.name} ({w.requests:,} requests, {w.format})", style="italic"),
              title_justify="left")
    t.add_column("tokens")
    for col in ("mean", "p50", "p90", "p99", "max"):
        t.add_column(col, justify="right")
    for label, s in (("input", w.input_tokens), ("output", w.output_tokens), ("total", w.total_tokens)):
        t.add_row(label, human_tokens(s.mean), human_tokens(s.p50), human_tokens(s.p90), human_tokens(s.p99),
                  human_tokens(s.max))
    if w.turns_per_session is not None:
        s = w.turns_per_session
        t.add_row("turns/session", f"{s.mean:.1f}", str(s.p50), str(s.p90), str(s.p99), str(s.max))
    return t


def workload_facts(w: WorkloadProfile) -> Table:
    t = Table(show_header=False, box=None)
    t.add_column("field", style="bold")
    t.add_column("value")
    if w.time_span_s is not None:
        t.add_row("time span", f"{w.time_span_s:,.1f} s")
    if w.arrival_rate_per_s is not None:
        cv = f" (inter-arrival CV {w.interarrival_cv:.2f})" if w.interarrival_cv is not None else ""
        t.add_row("arrival rate", f"{w.arrival_rate_per_s:,.2f} requests/s{cv}")
    if w.sessions:
        t.add_row("sessions", f"{w.sessions:,}")
    if w.prefix_reuse_ratio is not None:
        t.add_row("prefix reuse", Text(f"{w.prefix_reuse_ratio:.1%} of input tokens ({w.prefix_reuse_method})"))
    t.add_row("token counts", w.token_counts)
    t.add_row("percentiles", "exact (nearest rank)" if w.percentile_relative_error == 0 else
              f"within {w.percentile_relative_error:.1%} (nearest rank)")
    if w.malformed_rows:
        first = "; ".join(f"{e.file}:{e.line}: {e.reason}" for e in w.malformed_examples[:3])
        t.add_row("malformed rows", Text(f"{w.malformed_rows:,} skipped (first: {first})"))
    for n in w.notes:
        t.add_row("note", Text(n))
    return t


def _pow2(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    return str(n)


def histogram_table(s: LengthStats, title: str) -> Table:
    """One bar per power-of-two bucket, scaled to the largest bucket."""
    t = Table(title=title, title_justify="left", box=None, show_header=False, pad_edge=False)
    t.add_column("bucket", justify="right")
    t.add_column("bar")
    t.add_column("count", justify="right")
    t.add_column("share", justify="right")
    top = max((b.count for b in s.histogram), default=1)
    for b in s.histogram:
        width = b.count / top * BAR_WIDTH
        bar = "█" * int(width) + ("▌" if width - int(width) >= 0.5 else "")
        t.add_row(f"{_pow2(b.lo)}-{_pow2(b.hi)}", bar or "▏", f"{b.count:,}", f"{b.count / s.count:.1%}")
    return t


def capacity_tables(p: Profile) -> list[Table]:
    out = []
    if p.model is not None:
        m = p.model
        t = Table(title=Text(f"Model: {m.name} ({m.source})", style="italic"), show_header=False,
                  title_justify="left")
        t.add_column("field", style="bold")
        t.add_column("value")
        shape = f"{m.layers} layers, {m.kv_heads} KV heads x {m.head_dim} (q heads {m.q_heads}), {m.dtype}"
        t.add_row("shape", shape)
        if m.kv_lora_rank:
            t.add_row("MLA latent", f"{m.kv_lora_rank} + rope {m.qk_rope_head_dim} per layer (K and V shared)")
        if m.sliding_window:
            t.add_row("sliding window", f"{m.sliding_window} tokens on {m.sliding_layers} of {m.layers} layers")
        t.add_row("weights", f"{human_bytes(m.weights_bytes)}" + (f" ({m.params / 1e9:,.2f}B params)" if m.params else ""))
        t.add_row("KV per token", f"{human_bytes(m.kv_bytes_per_token)} ({m.kv_bytes_per_token:,.0f} bytes, {m.dtype})")
        out.append(t)
    c = p.capacity
    if c is not None:
        title = (f"Capacity on {c.hardware}: KV budget {human_bytes(c.kv_budget_bytes)} "
                 f"({c.budget_basis} x {c.memory_fraction} - weights {human_bytes(c.weights_bytes)}); "
                 f"concurrent sequences of {c.workload} (total length p50 {human_tokens(c.length_p50)}, "
                 f"p99 {human_tokens(c.length_p99)})")
        t = Table(title=Text(title, style="italic"), title_justify="left")
        for col in ("KV codec", "bytes/token", "seqs @ mean", "@ p50", "@ p99", "longest one"):
            t.add_column(col, justify="left" if col == "KV codec" else "right", no_wrap=True)
        for r in c.rows:
            t.add_row(r.codec, f"{r.bytes_per_token:,.0f}", f"{r.sequences_at_mean:,}", f"{r.sequences_at_p50:,}",
                      f"{r.sequences_at_p99:,}",
                      "unbounded" if r.max_tokens_one_sequence is None else human_tokens(r.max_tokens_one_sequence))
        out.append(t)
    return out


def render(profile: Profile, console: Console) -> None:
    for t in hardware_tables(profile.hardware):
        console.print(t)
    for n in profile.hardware.notes:
        console.print(f"note: {n}")
    if profile.workload is not None:
        w = profile.workload
        console.print(length_table(w))
        console.print(workload_facts(w))
        console.print(histogram_table(w.input_tokens, "Input tokens (power-of-two buckets)"))
        console.print(histogram_table(w.output_tokens, "Output tokens"))
        console.print(histogram_table(w.total_tokens, "Total context (input + output)"))
    for t in capacity_tables(profile):
        console.print(t)
    if profile.capacity is not None:
        for n in profile.capacity.notes:
            console.print(f"note: {n}")


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed: pip install 'kvtune[plot]' "
                        "(or pip install matplotlib)") from None


def plot_workload(w: WorkloadProfile, path: str | Path) -> Path:
    """Three log-x histograms (input, output, total tokens) in one PNG."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    for ax, (label, s) in zip(axes, (("input", w.input_tokens), ("output", w.output_tokens),
                                     ("total", w.total_tokens))):
        lefts = [max(b.lo, 0.5) for b in s.histogram]
        widths = [b.hi - max(b.lo, 0.5) for b in s.histogram]
        ax.bar(lefts, [b.count for b in s.histogram], width=widths, align="edge", edgecolor="black", linewidth=0.4)
        ax.set_xscale("log", base=2)
        for q, style in ((s.p50, "-"), (s.p99, "--")):
            ax.axvline(max(q, 0.5), color="tab:red", linestyle=style, linewidth=1)
        ax.set_title(f"{label} tokens (p50 {human_tokens(s.p50)}, p99 {human_tokens(s.p99)})")
        ax.set_xlabel("tokens")
        ax.set_ylabel("requests")
    fig.suptitle(f"{w.name}: {w.requests:,} requests")
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(target)
    return target
