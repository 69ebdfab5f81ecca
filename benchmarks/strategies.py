"""Measure every strategy of the library on the bundled model and write the table of docs/strategies.md.

    python benchmarks/strategies.py            # measures what benchmarks/strategies.json lacks, writes the page
    python benchmarks/strategies.py --fresh    # measures everything again
    python benchmarks/strategies.py --only snapkv,kivi

Quality: :func:`kvtune.measure.quality.evaluate_quality` against the full cache on one evaluation set built once
("prefill once, compress many"; sizes in ``EVAL`` below, stated on the page). Cost: bytes per token of the
stored form at the target KV dtype (fp16) and :func:`kvtune.measure.kernels_cost.measure_cost`'s decode-attention latency, at
``COST_CONTEXT`` tokens with the bundled model's shapes, on this machine's kernel path; offload transfer from
a reference hardware profile's datasheet host link (this machine has no GPU; the page says so).
Selection strategies run at three budgets (ratios of the context); codecs at their parameter levels.
Results are cached in ``benchmarks/strategies.json`` (one row per pipeline label) so the page can be
re-rendered without re-measuring. The table is written between the markers of docs/strategies.md; the
hand-written analysis around it is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "strategies.json"
PAGE = ROOT / "docs" / "strategies.md"
START, END = "<!-- table:start -->", "<!-- table:end -->"
BUDGETS = (0.2, 0.5, 0.8)
COST_CONTEXT = 4096
HARDWARE = "h100-sxm"  # reference profile for the offload link rate (datasheet)

SELECTORS = {
    "random": {}, "streaming_llm": {}, "sliding_window": {}, "snapkv": {}, "pyramidkv": {}, "ada_kv": {},
    "h2o": {}, "tova": {}, "knorm": {},
}
CODECS = [
    ("fp8", {"fmt": "e4m3", "scale": "head"}), ("fp8", {"fmt": "e5m2", "scale": "head"}),
    ("int8", {"group_size": 64}),
    *[("kivi", {"bits": b, "group_size": 32, "residual": 128, "value_window": w})
      for b in (4, 2) for w in ("paper", "key_schedule")],
    ("lowrank", {"rank": 48}), ("lowrank", {"rank": 32}), ("lowrank", {"rank": 16}),
    ("mixed", {"edge": "fp16", "middle": "kivi2", "edge_layers": 2}),
    ("mixed", {"edge": "int8", "middle": "kivi2", "edge_layers": 1}),
]
EXTRA = [  # compositions and decode-time re-compression
    {"selection": ("snapkv", {"budget": 0.2, "recompress_every": 16})},
    {"selection": ("streaming_llm", {"budget": 0.2, "recompress_every": 16})},
    {"selection": ("snapkv", {"budget": 0.5}),
     "codec": ("kivi", {"bits": 4, "group_size": 32, "residual": 128, "value_window": "paper"})},
    {"selection": ("pyramidkv", {"budget": 0.5}), "codec": ("int8", {"group_size": 64})},
]
PLACEMENTS = [("offload", {"tier": "cpu", "gpu_fraction": 0.25, "block_size": 32, "prefetch_depth": 1}),
              ("offload", {"tier": "disk", "gpu_fraction": 0.25, "block_size": 32, "prefetch_depth": 2})]


def eval_config():
    from kvtune.measure.quality import EvalConfig

    return EvalConfig(text_prompts=2, context_tokens=1024, continuation_tokens=48, chunk=16, passkey_items=6,
                      passkey_tokens=1024, kv_items=3, kv_tokens=768, seed=0)


def pipelines() -> list:
    from kvtune.pipeline import Pipeline, Stage

    def make(selection=("none", {}), codec=("fp16", {}), placement=("gpu", {})):
        return Pipeline(selection=Stage(method=selection[0], params=selection[1]),
                        codec=Stage(method=codec[0], params=codec[1]),
                        placement=Stage(method=placement[0], params=placement[1]))

    out = [make()]
    for name, extra in SELECTORS.items():
        out += [make(selection=(name, {**extra, "budget": b})) for b in BUDGETS]
    out += [make(codec=c) for c in CODECS]
    out += [make(**e) for e in EXTRA]
    out += [make(placement=p) for p in PLACEMENTS]
    return out


def stored_bytes_per_token(stages, spec, ctx: int) -> float:
    """Bytes the stored form holds per context token over all layers (per-layer codecs and budgets honoured):
    each layer's store is filled with its kept tokens in the target dtype and measured with nbytes()."""
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(spec.dtype, torch.float32)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, spec.kv_heads, ctx, spec.head_dim, generator=g).to(dtype)
    v = torch.randn(1, spec.kv_heads, ctx, spec.head_dim, generator=g).to(dtype)
    total = 0
    for i in range(spec.layers):
        sel = stages.selector
        kept = ctx if sel is None else min(ctx, sel.layer_keep(ctx, i, spec.layers))
        store = stages.codec.layer_store(i, spec.layers)
        store.append(k[:, :, :kept].contiguous(), v[:, :, :kept].contiguous())
        total += store.nbytes()
    return total / ctx


def measure_all(only: set[str] | None, fresh: bool) -> dict:
    from kvtune.measure.kernels_cost import CostSetup, measure_cost
    from kvtune.measure.tiers import Tiers
    from kvtune.models import load_model
    from kvtune.profile.hardware import reference_hardware
    from kvtune.measure.quality import build_eval_set, evaluate_quality
    from kvtune.strategies import Stages

    labels = {p.label() for p in pipelines()}
    old = {} if not RESULTS.exists() else json.loads(RESULTS.read_text())
    rows = old.get("rows", {})
    rows = {k: v for k, v in rows.items() if k in labels}  # pipelines no longer on the page go
    todo = [p for p in pipelines() if (fresh or p.label() not in rows)
            and (not only or {p.selection.method, p.codec.method, p.placement.method} & only)]
    cfg = eval_config()
    meta = {"eval": cfg.__dict__, "budgets": BUDGETS, "cost_context": COST_CONTEXT, "hardware_link": HARDWARE,
            "threads": torch.get_num_threads(), "latency_passes": old.get("meta", {}).get("latency_passes", 1)}
    if not todo:
        return {"meta": meta, "rows": rows}
    m = load_model()
    hw = reference_hardware(HARDWARE)
    started = time.perf_counter()
    evalset = build_eval_set(m.model, m.tokenizer, cfg, attention_sums=True,
                             progress=lambda s: print(s, file=sys.stderr))
    meta["prefill_seconds"] = round(time.perf_counter() - started, 1)
    meta["full_probe_correct"] = {k: sum(p.full_correct for p in evalset.probes if p.kind == k)
                                  for k in ("passkey", "kv_retrieval")}
    cost_setup = CostSetup(spec=m.spec, context_tokens=COST_CONTEXT, tiers=Tiers.from_hardware(hw, m.weights_bytes),
                           time_kernels=True, repeats=5)  # CPU reference kernels: a relative timing (the page says)
    for n, p in enumerate(todo):
        t0 = time.perf_counter()
        stages = Stages.of(p)
        q = evaluate_quality(m.model, evalset, stages, cfg)
        c = measure_cost(stages, cost_setup)
        row = {"label": p.label(), "selection": p.selection.method, "codec": p.codec.method,
               "placement": p.placement.method, "params": {a: dict(getattr(p, a).params) for a in ("selection", "codec", "placement")},
               "quality": q.model_dump(), "cost": c.model_dump(),
               "bytes_per_token": round(stored_bytes_per_token(stages, m.spec, COST_CONTEXT), 2),
               "measured": time.strftime("%Y-%m-%d", time.gmtime()),
               "load_avg_1m": round(os.getloadavg()[0], 1),
               "seconds": round(time.perf_counter() - t0, 2)}
        rows[p.label()] = row
        print(f"[{n + 1}/{len(todo)}] {p.label()}: loss {q.quality_loss:.4f} kl {q.kl_mean:.4f} "
              f"pk {q.passkey_accuracy} kv {q.kv_retrieval_accuracy} B/tok {row['bytes_per_token']} "
              f"({row['seconds']} s)", file=sys.stderr)
        RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return {"meta": meta, "rows": rows}


def recost(repeats: int) -> dict:
    """Re-measure only the decode-attention latency of every cached row (quality untouched), interleaving the
    rows round-robin so that load from other processes spreads over all of them; keeps the median."""
    import statistics

    from kvtune.measure.kernels_cost import CostSetup, measure_cost
    from kvtune.measure.tiers import Tiers
    from kvtune.modelspec import preset
    from kvtune.profile.hardware import reference_hardware
    from kvtune.strategies import Stages

    data = json.loads(RESULTS.read_text())
    spec = preset("SmolLM2-135M")
    hw = reference_hardware(HARDWARE)
    setup = CostSetup(spec=spec, context_tokens=COST_CONTEXT, tiers=Tiers.from_hardware(hw, 270_000_000),
                      time_kernels=True, repeats=3)
    todo = [p for p in pipelines() if p.label() in data["rows"]]
    samples: dict[str, list[float]] = {p.label(): [] for p in todo}
    for r in range(repeats):
        for p in todo:
            samples[p.label()].append(measure_cost(Stages.of(p), setup).decode_latency_ms)
        print(f"latency pass {r + 1}/{repeats}", file=sys.stderr)
    for label, xs in samples.items():
        data["rows"][label]["cost"]["decode_latency_ms"] = round(statistics.median(xs), 4)
    data["meta"]["latency_passes"] = repeats
    data["meta"]["recosted_after"] = time.strftime("%Y-%m-%d", time.gmtime())
    RESULTS.write_text(json.dumps(data, indent=1))
    return data


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


LOADED = 4.0  # 1-minute load average above which a row's latency (timed on 2 shared cores) is not shown


def latency(row: dict, data: dict) -> float | None:
    """A row's decode-attention latency, unless it was timed alone under load (``--recost`` re-times every row
    interleaved, which spreads the load over all of them)."""
    if row.get("load_avg_1m", 0.0) > LOADED and not data["meta"].get("recosted_after", "") >= row.get("measured", ""):
        return None
    return row["cost"]["decode_latency_ms"]


def render_table(data: dict) -> str:
    rows = [data["rows"][p.label()] for p in pipelines() if p.label() in data["rows"]]
    full = data["rows"][pipelines()[0].label()]
    lines = ["| pipeline | axis | KL (nats) | top-1 agree | passkey | kv-retrieval | ppl delta | bytes/token | "
             "vs full | decode attn ms | transfer ms |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        q, c = r["quality"], r["cost"]
        axes = [a for a in ("selection", "codec", "placement") if r[a] not in ("none", "fp16", "gpu")]
        lines.append(
            f"| `{r['label']}`{'' if r.get('measured') else ' †'} | {'+'.join(axes) or 'baseline'} | {q['kl_mean']:.4f} | {q['top1_agreement']:.3f} | "
            f"{_fmt(q['passkey_accuracy'], '.2f')} | {_fmt(q['kv_retrieval_accuracy'], '.2f')} | "
            f"{q['perplexity'] - q['perplexity_full']:+.3f} | {r['bytes_per_token']:.0f} | "
            f"{full['bytes_per_token'] / r['bytes_per_token']:.2f}x | {_fmt(latency(r, data))} | "
            f"{_fmt(c.get('transfer_ms'))} |")
    meta = data["meta"]
    e = meta["eval"]
    head = (f"Measured by `python benchmarks/strategies.py` on SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV "
            f"heads, head dim 64; float32 on CPU, {meta.get('threads')} threads). Evaluation set: {e['text_prompts']} "
            f"text prompts of {e['context_tokens']} tokens + {e['continuation_tokens']} continuation tokens "
            f"(teacher-forced in chunks of {e['chunk']}), {e['passkey_items']} passkey items of {e['passkey_tokens']} "
            f"tokens, {e['kv_items']} key-value retrieval items of {e['kv_tokens']} tokens; the full cache answers "
            f"{meta.get('full_probe_correct', {}).get('passkey', '?')}/{e['passkey_items']} passkey and "
            f"{meta.get('full_probe_correct', {}).get('kv_retrieval', '?')}/{e['kv_items']} kv-retrieval items "
            f"(accuracies below are over all items). Bytes/token: the stored form at fp16 over all layers "
            f"(scales, residuals, per-layer budgets included) at {meta['cost_context']} tokens; decode attn: one "
            f"decode step's attention over all 30 layers at {meta['cost_context']} tokens on the CPU reference "
            f"kernels (float32; `kvtune.measure.kernels_cost.measure_cost`, median over {meta.get('latency_passes', 1)} interleaved "
            f"pass(es)) - relative, not a GPU figure, and noisy on a shared 2-core machine; transfer: "
            f"the offload copy per step not hidden by prefetch, computed from the {meta['hardware_link']} reference "
            f"profile's datasheet host link (this machine has no GPU, nothing was copied).")
    fresh = [r for r in rows if r.get("measured")]
    if len(fresh) < len(rows):
        lines += ["", "† measured on 2026-11-22 with an earlier kvtune: before SnapKV's paper defaults (window 64, "
                  "kernel 5, average pooling), H2O's normalised prompt scores, the token-by-token evaluation of "
                  "decode-time selectors (H2O, TOVA) and KIVI's `value_window` (those rows ran `key_schedule`); "
                  "`python benchmarks/strategies.py --fresh --only METHOD` re-measures them."]
    if fresh:
        loads = [r["load_avg_1m"] for r in fresh]
        lines += ["", f"Rows without † measured on {', '.join(sorted({r['measured'] for r in fresh}))} (1-minute load "
                  f"average {min(loads):.1f}-{max(loads):.1f} on the 2 cores, shared with other jobs: the quality "
                  f"columns are not affected; a latency timed alone above load {LOADED:g} is not shown, "
                  f"`python benchmarks/strategies.py --recost 5` re-times every row)."]
    return head + "\n\n" + "\n".join(lines)


def write_page(data: dict) -> None:
    table = render_table(data)
    text = PAGE.read_text() if PAGE.exists() else f"# Strategies\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    before, rest = text.split(START, 1)
    _old, after = rest.split(END, 1)
    PAGE.write_text(f"{before}{START}\n{table}\n{END}{after}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fresh", action="store_true", help="measure every pipeline again")
    ap.add_argument("--only", default="", help="comma-separated method names to (re)measure")
    ap.add_argument("--render-only", action="store_true", help="write the page from the cached results")
    ap.add_argument("--recost", type=int, default=0, metavar="N",
                    help="re-measure only decode latency of cached rows, N interleaved passes (median)")
    args = ap.parse_args()
    if args.recost:
        data = recost(args.recost)
    elif args.render_only:
        data = json.loads(RESULTS.read_text())
    else:
        data = measure_all(set(filter(None, args.only.split(","))) or None, args.fresh)
    write_page(data)
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(data['rows'])} pipelines)", file=sys.stderr)


if __name__ == "__main__":
    main()
