"""What "prefill once, compress many" saves: the cost of one trial with prefill reuse vs a naive trial.

A *reused* trial builds each candidate's compressed cache from the prefill records made once per study, then
runs only the continuation / answer tokens. A *naive* trial prefills every evaluation prompt again with the
candidate's cache in place, then runs the same tokens. Both produce the same numbers (tests/core/test_runtime.py
checks the equivalence); only the time differs. Cost measurement (shared by both) is left out so the ratio
isolates the quality measurement.

    python benchmarks/trial_cost.py [--quick] [--repeats 3] [--out benchmarks/results/trial_cost.json]

Prints a table and writes JSON. Timings are wall-clock on this machine; the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kvtune.models import load_model
from kvtune.pipeline import Pipeline, Stage
from kvtune.measure.quality import EvalConfig, EvalSet, build_eval_set, evaluate_quality
from kvtune.strategies import Stages
from kvtune.runtime import KVCache

PIPELINES = [
    Pipeline(codec=Stage(method="kivi", params={"bits": 4, "group_size": 32, "residual": 64})),
    Pipeline(selection=Stage(method="snapkv", params={"budget": 0.3}), codec=Stage(method="int8")),
    Pipeline(codec=Stage(method="fp8", params={"fmt": "e4m3", "scale": "head"})),
]


def naive_trial(model, evalset: EvalSet, pipeline: Pipeline, cfg: EvalConfig) -> float:
    """Re-prefill every prompt with the candidate's cache, then run the same scored tokens, batched the same
    way as the reused trial (equal-length prompts together), so re-prefilling is the only difference."""
    started = time.perf_counter()
    stages = Stages.of(pipeline)
    layers = model.config.num_hidden_layers
    for batch in evalset.text_batches:
        cache = KVCache(stages, layers)
        model(input_ids=batch.record.input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        feed = batch.continuation[:, :-1]
        for start in range(0, feed.shape[1], cfg.chunk):
            model(input_ids=feed[:, start : start + cfg.chunk], cache=cache, use_cache=True)
    for batch in evalset.probe_batches:  # the items the full cache answers, as in the reused trial
        cache = KVCache(stages, layers)
        model(input_ids=batch.record.input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        model(input_ids=batch.answers[:, :-1], cache=cache, use_cache=True)
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small evaluation set (seconds)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/trial_cost.json")
    args = ap.parse_args()
    cfg = EvalConfig.quick() if args.quick else EvalConfig()
    loaded = load_model()
    t0 = time.perf_counter()
    evalset = build_eval_set(loaded.model, loaded.tokenizer, cfg, attention_sums=False)
    setup_s = time.perf_counter() - t0
    rows = []
    for p in PIPELINES:
        reused, naive = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            evaluate_quality(loaded.model, evalset, p, cfg)
            reused.append(time.perf_counter() - t)
            naive.append(naive_trial(loaded.model, evalset, p, cfg))
        rows.append({"pipeline": p.label(), "reused_s": statistics.median(reused), "naive_s": statistics.median(naive)})
    reused_med = statistics.median(r["reused_s"] for r in rows)
    naive_med = statistics.median(r["naive_s"] for r in rows)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "eval_config": cfg.__dict__, "prompts": len(evalset.text) + len(evalset.probes),
        "context_tokens": evalset.context_lengths, "study_setup_prefill_s": round(setup_s, 2),
        "rows": rows, "median_reused_trial_s": round(reused_med, 3), "median_naive_trial_s": round(naive_med, 3),
        "ratio": round(naive_med / reused_med, 2),
    }
    print(f"{'pipeline':58s} {'reused s':>9s} {'naive s':>9s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['pipeline']:58s} {r['reused_s']:9.2f} {r['naive_s']:9.2f} {r['naive_s'] / r['reused_s']:6.1f}")
    print(f"{'median trial':58s} {reused_med:9.2f} {naive_med:9.2f} {result['ratio']:6.1f}")
    print(f"one-time prefill of {result['prompts']} prompts: {setup_s:.1f} s ({result['machine']})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
