"""What "prefill once, compress many" and the multi-fidelity slice save: one trial as kvtune runs it vs a naive one.

A *reused* trial builds each candidate's compressed cache from the prefill records made once per study, then
runs only the continuation / answer tokens (:func:`kvtune.measure.quality.evaluate_quality`). A *naive* trial
prefills every evaluation prompt again (text, probes and the multi-turn conversations' contexts) with the
candidate's cache in place, then runs the same tokens. Both produce the same numbers (tests/core/test_runtime.py
checks the equivalence); only the time differs. Cost measurement (shared by all) is left out so the ratio
isolates the quality measurement.

The *kvtune* trial is what ``recommend`` runs (:func:`kvtune.search.stop_early` then
:func:`kvtune.search.measure`): the probe slice first; a candidate whose slice already bounds its quality loss
above the scenario's ceiling (``--scenario``, default datacenter: 0.1) stops there, the others are measured in
full reusing the slice's probe outcomes. The *slice + full* column is the same flow without that reuse (the
probes scored twice, as kvtune did before), timed in the same run; the study's answer is the same either way
(asserted: the reused measurement equals the plain one).

    python benchmarks/trial_cost.py [--quick] [--repeats 2] [--scenario datacenter] [--out benchmarks/results/trial_cost.json]

Prints a table and writes JSON. Timings are wall-clock on this machine (the load average is recorded); the
ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kvtune.io import atomic_write_text
from kvtune.models import load_model
from kvtune.pipeline import Pipeline, Stage
from kvtune.measure.quality import EvalConfig, EvalSet, build_eval_set, evaluate_quality, probe_loss_bound, probe_outcomes
from kvtune.scenarios import SCENARIOS, get_scenario
from kvtune.strategies import Stages
from kvtune.runtime import KVCache

PIPELINES = [  # KIVI with the value policy the search space asks for (an omitted value_window means key_schedule)
    Pipeline(codec=Stage(method="kivi", params={"bits": 4, "group_size": 32, "residual": 64, "value_window": "paper"})),
    Pipeline(selection=Stage(method="snapkv", params={"budget": 0.3}), codec=Stage(method="int8")),
    Pipeline(codec=Stage(method="fp8", params={"fmt": "e4m3", "scale": "head"})),
    Pipeline(codec=Stage(method="kivi", params={"bits": 2, "group_size": 32, "residual": 64, "value_window": "paper"})),
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
    per_token = stages.selector is not None and stages.selector.decode_time
    for conv in evalset.conversations:  # the shared context prefilled again, then every turn as the reused trial
        cache = KVCache(stages, layers)
        model(input_ids=conv.record.input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        carry = None
        for prompt, answer in zip(conv.prompts, conv.answers):
            head = prompt[:, :-1] if carry is None else torch.cat([carry, prompt[:, :-1]], dim=1)
            cache.begin_turn()
            model(input_ids=head, cache=cache, use_cache=True, logits_to_keep=1)
            feed = torch.cat([prompt[:, -1:], answer[:, :-1]], dim=1)
            for step in ([feed[:, i : i + 1] for i in range(feed.shape[1])] if per_token else [feed]):
                model(input_ids=step, cache=cache, use_cache=True)
            carry = answer[:, -1:]
    return time.perf_counter() - started


def kvtune_trial(model, evalset: EvalSet, pipeline: Pipeline, cfg: EvalConfig, ceiling: float,
                 reuse: bool) -> tuple[float, bool, object]:
    """The trial as recommend runs it: the probe slice, then (unless it stops the candidate) the full measurement,
    given the slice's outcomes when ``reuse``. Returns (seconds, stopped, quality or None)."""
    started = time.perf_counter()
    stages = Stages.of(pipeline)
    outcomes = probe_outcomes(model, evalset, stages, cfg)
    bound = probe_loss_bound(model, evalset, stages, cfg, outcomes=outcomes)
    if bound is not None and bound > ceiling + 1e-12:
        return time.perf_counter() - started, True, None
    q = evaluate_quality(model, evalset, stages, cfg, probes=outcomes if reuse else None)
    return time.perf_counter() - started, False, q


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small evaluation set (seconds)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scenario", default="datacenter", choices=sorted(SCENARIOS),
                    help="whose quality ceiling the probe slice stops candidates at")
    ap.add_argument("--out", default="benchmarks/results/trial_cost.json")
    args = ap.parse_args()
    ceiling = get_scenario(args.scenario).max_quality_loss
    cfg = EvalConfig.quick() if args.quick else EvalConfig()
    load = [os.getloadavg()[0]]
    loaded = load_model()
    t0 = time.perf_counter()
    evalset = build_eval_set(loaded.model, loaded.tokenizer, cfg, attention_sums=False)
    setup_s = time.perf_counter() - t0
    rows = []
    for p in PIPELINES:
        plain, naive, before, kv = [], [], [], []
        stopped = False
        for _ in range(args.repeats):  # the four flows interleaved, so load drifts hit them alike
            t = time.perf_counter()
            q_plain = evaluate_quality(loaded.model, evalset, p, cfg)
            plain.append(time.perf_counter() - t)
            naive.append(naive_trial(loaded.model, evalset, p, cfg))
            s_before, _, _ = kvtune_trial(loaded.model, evalset, p, cfg, ceiling, reuse=False)
            before.append(s_before)
            s_kv, stopped, q_kv = kvtune_trial(loaded.model, evalset, p, cfg, ceiling, reuse=True)
            kv.append(s_kv)
            if q_kv is not None and q_kv != q_plain:  # reuse must not change the answer
                raise SystemExit(f"{p.label()}: the measurement reusing the slice differs: {q_kv} vs {q_plain}")
            load.append(os.getloadavg()[0])
        row = {"pipeline": p.label(), "stopped_by_slice": stopped, "reused_s": statistics.median(plain),
               "naive_s": statistics.median(naive), "slice_plus_full_s": statistics.median(before),
               "kvtune_s": statistics.median(kv)}
        row["ratio_reused"] = round(row["naive_s"] / row["reused_s"], 2)
        row["ratio_slice_plus_full"] = round(row["naive_s"] / row["slice_plus_full_s"], 2)
        row["ratio_kvtune"] = round(row["naive_s"] / row["kvtune_s"], 2)
        rows.append(row)
    med = {k: statistics.median(r[k] for r in rows) for k in ("ratio_reused", "ratio_slice_plus_full", "ratio_kvtune")}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} torch threads",
        "load_average_1min": {"min": round(min(load), 2), "max": round(max(load), 2),
                              "median": round(statistics.median(load), 2)},
        "scenario": args.scenario, "ceiling": ceiling,
        "eval_config": cfg.__dict__, "prompts": len(evalset.context_lengths),
        "context_tokens": evalset.context_lengths, "study_setup_prefill_s": round(setup_s, 2),
        "rows": rows, "median_ratio_reused": med["ratio_reused"],
        "median_ratio_slice_plus_full": med["ratio_slice_plus_full"], "median_ratio_kvtune": med["ratio_kvtune"],
    }
    print(f"{'pipeline':58s} {'naive s':>8s} {'reused s':>8s} {'slice+full s':>12s} {'kvtune s':>8s} "
          f"{'x reused':>8s} {'x s+f':>6s} {'x kvtune':>8s}")
    for r in rows:
        print(f"{r['pipeline']:58s} {r['naive_s']:8.2f} {r['reused_s']:8.2f} {r['slice_plus_full_s']:12.2f} "
              f"{r['kvtune_s']:8.2f} {r['ratio_reused']:8.1f} {r['ratio_slice_plus_full']:6.1f} "
              f"{r['ratio_kvtune']:8.1f}{'  (stopped by the slice)' if r['stopped_by_slice'] else ''}")
    print(f"{'median ratio':58s} {'':8s} {'':8s} {'':12s} {'':8s} {med['ratio_reused']:8.1f} "
          f"{med['ratio_slice_plus_full']:6.1f} {med['ratio_kvtune']:8.1f}")
    print(f"one-time prefill of {result['prompts']} prompts: {setup_s:.1f} s ({result['machine']}; load average "
          f"{result['load_average_1min']['min']}-{result['load_average_1min']['max']}); slice stops above "
          f"{args.scenario}'s ceiling {ceiling:g}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
