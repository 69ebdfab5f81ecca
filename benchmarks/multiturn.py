"""Multi-turn follow-ups on the bundled model: which stages keep the answers to questions asked after the first.

    python benchmarks/multiturn.py                      # measure, write benchmarks/results/multiturn.json + the page
    python benchmarks/multiturn.py --items 2 --turns 3  # smaller
    python benchmarks/multiturn.py --render             # re-render the page from the JSON

Conversations from :mod:`kvtune.measure.multiturn` (one shared natural-text context with competing facts, one
question per turn about a different fact, the cache persisting across turns), each candidate run over the same
conversations (full-cache references computed once). Per candidate: accuracy at turn 1 and at the follow-ups
(a turn counts only where the full cache answers it), KL on the answer tokens, and the bytes its cache holds at
the end of the conversation — on the GPU and in the host tier — measured from the stored tensors (float32 model
on this CPU; the bytes are the stored form's, in the dtype the model runs in here). Also the seconds one
candidate takes on the default recommend's probe size (:class:`~kvtune.measure.quality.EvalConfig`), the figure
the search pays per trial. The table is written between the markers of docs/strategies.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from kvtune.measure.multiturn import DEFAULT_KIND, FACT_KINDS, build_conversations, probe_turns, run_conversation
from kvtune.measure.quality import EvalConfig, pydoc_text
from kvtune.models import load_model, torch_threads
from kvtune.pipeline import Pipeline, Stage
from kvtune.profile.workload import default_workload
from kvtune.strategies import Stages
from kvtune.strategies.spill_recall import SpillStore

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "multiturn.json"
PAGE = ROOT / "docs" / "strategies.md"
START, END = "<!-- multiturn:start -->", "<!-- multiturn:end -->"
SELECTORS = ("snapkv", "ada_kv", "tova", "h2o", "streaming_llm", "knorm")


def candidates(budgets: list[float]) -> list[tuple[str, Pipeline]]:
    def make(sel="none", sp=None, codec="fp16", cp=None) -> Pipeline:
        return Pipeline(selection=Stage(method=sel, params=sp or {}), codec=Stage(method=codec, params=cp or {}))

    out = [("full cache", make()),  # the codecs first: a run cut short (it saves after every row) still has them
           ("kivi-4 (paper values)", make(codec="kivi", cp={"bits": 4, "group_size": 32, "residual": 128,
                                                            "value_window": "paper"})),
           ("kivi-2 (paper values)", make(codec="kivi", cp={"bits": 2, "group_size": 32, "residual": 128,
                                                            "value_window": "paper"})),
           ("fp8 e4m3", make(codec="fp8", cp={"fmt": "e4m3", "scale": "head"}))]
    for b in sorted(budgets, reverse=True):
        out += [(f"{s} {b:g}", make(s, {"budget": b})) for s in SELECTORS]
        out += [(f"snapkv_agnostic {b:g}", make("snapkv_agnostic", {"budget": b})),
                (f"spill_recall {b:g}", make("spill_recall", {"budget": b}))]
    return out


def example(kind: str) -> str:
    """One fact sentence of ``kind``, for the page."""
    return FACT_KINDS[kind].sentence.format(name="Vega", value={"code": "40721", "city": "Lisbon"}.get(kind, "..."))


def held(cache) -> tuple[int, int]:
    """(GPU bytes, host bytes) every layer's store holds now."""
    gpu = host = 0
    for layer in cache.layers:
        store = layer.store
        if isinstance(store, SpillStore):
            gpu += store.gpu_nbytes()
            host += store.host_nbytes()
        else:
            gpu += store.nbytes()
    return gpu, host


def measure(args) -> dict:
    torch_threads()
    lm = load_model()
    ids = lm.tokenizer(pydoc_text(), add_special_tokens=False).input_ids
    started = time.perf_counter()
    batches = build_conversations(lm.model, lm.tokenizer, ids, items=args.items, context_tokens=args.tokens,
                                  facts=args.facts, turns=args.turns, seed=args.seed, attention_sums=True,
                                  kind=args.kind)
    build_s = time.perf_counter() - started
    full = torch.cat([b.full_correct for b in batches])  # (N, turns)
    rows: list[dict] = []
    head = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0], "device": "cpu",
                    "model_dtype": "float32"},
        "model": lm.name, "items": args.items, "turns": args.turns, "facts": args.facts, "context_tokens": args.tokens,
        "kind": args.kind, "example": example(args.kind),
        "full_correct_per_turn": full.sum(0).tolist(), "conversations": int(full.shape[0]),
        "build_seconds": round(build_s, 1),
    }
    for label, pipeline in candidates(args.budgets):
        stages = Stages.of(pipeline)
        started = time.perf_counter()
        oks, kls, gpu, host, seen = [], [], 0, 0, 0
        for b in batches:
            ok, lps, cache = run_conversation(lm.model, b.record, b.prompts, b.answers, stages, args.seed)
            oks.append(ok)
            kls += [(r.exp() * (r - c)).sum(-1).clamp_min(0).flatten() for r, c in zip(b.full_logprobs, lps)]
            g, h = held(cache)
            gpu, host, seen = gpu + g, host + h, seen + cache.get_seq_length() * b.full_correct.shape[0]
        ok = torch.cat(oks) & full
        seconds = time.perf_counter() - started

        def ret(cols: slice) -> float | None:
            n = int(full[:, cols].sum())
            return None if n == 0 else int(ok[:, cols].sum()) / n

        rows.append({"label": label, "pipeline": pipeline.label(), "turn1": ret(slice(0, 1)),
                     "followup": ret(slice(1, None)), "turn_correct": ok.sum(0).tolist(),
                     "kl": float(torch.cat(kls).mean()), "gpu_bytes_per_token": gpu / seen,
                     "host_bytes_per_token": host / seen, "seconds": round(seconds, 2)})
        save({**head, "rows": rows, "partial": True})  # a long run interrupted keeps what it measured
        print(f"{label:24s} turn1 {rows[-1]['turn1']}  follow-ups {rows[-1]['followup']}  "
              f"KL {rows[-1]['kl']:.3f}  GPU {gpu / seen:.0f} B/tok  host {host / seen:.0f} B/tok  {seconds:.1f}s",
              file=sys.stderr)
    # what one trial pays on the default recommend's probe (its turns from the bundled workload, as recommend
    # chooses them), and which of its turns the full cache answers (only those can reject a candidate)
    cfg = EvalConfig()
    cfg.multiturn_turns, _why = probe_turns(default_workload(), cfg.multiturn_facts, cfg.multiturn_turns)
    small = build_conversations(lm.model, lm.tokenizer, ids, items=cfg.multiturn_items,
                                context_tokens=cfg.multiturn_tokens, facts=cfg.multiturn_facts,
                                turns=cfg.multiturn_turns, seed=cfg.seed, attention_sums=True)
    small_full = torch.cat([b.full_correct for b in small]).sum(0).tolist()
    trial = {}
    for label, pipeline in (("full cache", Pipeline()),
                            ("snapkv 0.3", Pipeline(selection=Stage(method="snapkv", params={"budget": 0.3}))),
                            ("h2o 0.3", Pipeline(selection=Stage(method="h2o", params={"budget": 0.3}))),
                            ("spill_recall 0.3", Pipeline(selection=Stage(method="spill_recall", params={"budget": 0.3})))):
        started = time.perf_counter()
        for b in small:
            run_conversation(lm.model, b.record, b.prompts, b.answers, Stages.of(pipeline), cfg.seed)
        trial[label] = round(time.perf_counter() - started, 2)
    return {
        **head, "rows": rows, "trial_seconds_default_probe": trial,
        "default_probe": {"items": cfg.multiturn_items, "turns": cfg.multiturn_turns, "tokens": cfg.multiturn_tokens,
                          "kind": DEFAULT_KIND, "full_correct_per_turn": small_full},
    }


def save(data: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(RESULTS)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def render(data: dict) -> str:
    n, turns = data["conversations"], data["turns"]
    full = data.get("full_correct_per_turn")
    lines = [
        f"Measured by `benchmarks/multiturn.py` on {data['model']} ({data['machine']['device']}, "
        f"{data['machine']['model_dtype']}, {data['machine']['cores']} cores): {n} conversations of "
        f"{data['context_tokens']} context tokens, {data['facts']} competing facts each "
        f"(\"{data.get('example', example('code'))}\"), {turns} turns. "
        + (f"The full cache answers {full[0]}/{n} first turns and {sum(full[1:])}/{n * (turns - 1)} follow-ups. "
           if full else "") +
        "Accuracy below is over the turns the full cache answers (a turn it misses does not count). Bytes: "
        "held at the end of the conversation per token seen, all layers, K+V, in the float32 the model runs in here (halve "
        "them for an fp16 deployment).",
        "",
        "| pipeline | turn 1 | follow-ups | KL (answers) | GPU bytes/token | host bytes/token |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["rows"]:
        lines.append(f"| {r['label']} | {_pct(r['turn1'])} | {_pct(r['followup'])} | {r['kl']:.3f} | "
                     f"{r['gpu_bytes_per_token']:.0f} | {r['host_bytes_per_token']:.0f} |")
    if data.get("partial"):
        lines += ["", "(Partial run: the rows above are those measured before the run stopped.)"]
    t = data.get("trial_seconds_default_probe")
    p = data.get("default_probe")
    if t and p:
        fc = p.get("full_correct_per_turn")
        lines += ["", f"Seconds one candidate spends on the default `recommend` probe ({p['items']} conversations x "
              f"{p['turns']} turns, {p['tokens']} tokens" + (f"; the full cache answers {fc[0]}/{p['items']} first "
              f"turns and {sum(fc[1:])}/{p['items'] * (p['turns'] - 1)} follow-ups" if fc else "") +
              "), same machine, load average "
              f"{data['machine']['load_avg_1m']:.1f} on {data['machine']['cores']} cores while measuring: " +
              ", ".join(f"{k} {v} s" for k, v in t.items()) + "."]
    return "\n".join(lines)


def write_page(data: dict) -> None:
    text = PAGE.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{PAGE}: markers {START} / {END} missing")
    head, rest = text.split(START, 1)
    _old, tail = rest.split(END, 1)
    PAGE.write_text(head + START + "\n" + render(data) + "\n" + END + tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=6)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--facts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.6])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", choices=sorted(FACT_KINDS), default=DEFAULT_KIND, help="kind of the competing facts")
    ap.add_argument("--render", action="store_true", help="re-render the page from the JSON, measure nothing")
    args = ap.parse_args()
    if args.render:
        data = json.loads(RESULTS.read_text())
    else:
        data = measure(args)
        save(data)
    print(render(data))
    write_page(data)


if __name__ == "__main__":
    main()
