"""Fidelity of kvtune's selection stages against kvpress: the same tokens kept, with aligned parameters.

Two steps, two Python environments (kvpress 0.5.5 pins transformers < 5.3; kvtune needs >= 5.24):

    # 1. in a throwaway venv OUTSIDE the repo, with kvpress:
    python3.11 -m venv /tmp/kvpress-venv
    /tmp/kvpress-venv/bin/pip install torch==2.13.0 kvpress==0.5.5 "transformers<5.3"
    /tmp/kvpress-venv/bin/python benchmarks/kvpress_fidelity.py --dump /tmp/kvpress_dump.pt \\
        --model-dir ~/.cache/kvtune/gguf/SmolLM2-135M-Instruct.Q4_1-<key>   # the bundled model, as kvtune converted it
    # 2. in kvtune's venv: kvtune's selectors on the very tensors kvpress scored, Jaccard per layer and head
    .venv/bin/python benchmarks/kvpress_fidelity.py --compare /tmp/kvpress_dump.pt

Step 1 runs the bundled model (float32) over prompts cut from ``pydoc_data.topics`` (the text kvtune's evaluation
uses), each press applied through kvpress's own forward hooks. At every layer it records what the press was given
(keys after RoPE, values, the last 64 queries after RoPE, computed as kvpress's SnapKV computes them) and the
token indices the press kept: the top ``n_kept`` of its scores (``ScorerPress.compress``), or, for AdaKV, every
token not in the ``masked_key_indices`` it sets. Step 2 builds kvtune's selector with aligned parameters (below),
calls ``select``/``select_ragged`` on the same recorded tensors and compares the kept sets per (prompt, layer, KV
head): Jaccard = |kvtune ∩ kvpress| / |kvtune ∪ kvpress|. Results: ``benchmarks/results/kvpress_fidelity.json``
and the table of docs/strategies.md (between its ``kvpress`` markers).

The comparison is of the selection rules given identical inputs; how each tool captures queries and keys inside
its attention is not compared (kvtune's runtime records post-RoPE queries in its registered attention function,
``tests/core/test_runtime.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "kvpress_fidelity.json"
PAGE = ROOT / "docs" / "strategies.md"
START, END = "<!-- kvpress:start -->", "<!-- kvpress:end -->"
PROMPT_TOKENS = (1000, 1500)  # two prompts; kept counts are integers on both sides (no rounding to align)
KEEP = 0.3  # kvpress compression_ratio 0.7; kvtune budget = the same token count (int), not a ratio
WINDOW = 64

# kvpress press -> kvtune selector parameters that make the rules the same (the budget is added per prompt).
# snapkv: kvpress keeps its 64-query window (padded with max score + 1) and protects no sinks.
# streaming_llm: 4 sinks, the rest the most recent tokens.
# knorm: nothing protected. tova: kvpress keeps the last token (padded max), so kvtune keeps 1 recent token.
# ada_kv: SnapKV scores, alpha_safeguard 0.2, the window kept by its max score as in SnapKV.
ALIGNED = {
    "snapkv": {"window": WINDOW, "kernel": 5, "pooling": "avg", "sinks": 0, "recent": 0},
    "streaming_llm": {"sinks": 4},
    "knorm": {"sinks": 0, "recent": 0},
    "tova": {"sinks": 0, "recent": 1},
    "ada_kv": {"window": WINDOW, "kernel": 5, "pooling": "avg", "sinks": 0, "recent": 0, "alpha_safeguard": 0.2},
}

# The check can fail: kvtune's earlier SnapKV defaults, TOVA's default 4 sinks and KNorm with a recent window
# keep other tokens than kvpress does (reported beside the aligned rows).
MISALIGNED = {
    "snapkv": {"window": 32, "kernel": 7, "pooling": "max", "sinks": 0, "recent": 0},
    "tova": {"sinks": 4, "recent": 0},
    "knorm": {"sinks": 0, "recent": 32},
}


def prompts(tokenizer) -> list[list[int]]:
    import pydoc_data.topics as topics

    ids = tokenizer("\n\n".join(topics.topics[k] for k in sorted(topics.topics)), add_special_tokens=False).input_ids
    return [ids[5000 * (i + 1): 5000 * (i + 1) + n] for i, n in enumerate(PROMPT_TOKENS)]


# ------------------------------------------------------------------------------------------- step 1: kvpress
def dump(out: Path, model_dir: str) -> None:
    import kvpress
    import transformers
    from kvpress import AdaKVPress, KnormPress, SnapKVPress, StreamingLLMPress, TOVAPress
    from kvpress.utils import compute_n_kept, get_prerope_query_states
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
    from transformers.models.llama.modeling_llama import rotate_half

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    cr = 1.0 - KEEP
    presses = {"snapkv": SnapKVPress(compression_ratio=cr, window_size=WINDOW, kernel_size=5),
               "streaming_llm": StreamingLLMPress(compression_ratio=cr, n_sink=4),
               "knorm": KnormPress(compression_ratio=cr), "tova": TOVAPress(compression_ratio=cr),
               "ada_kv": AdaKVPress(SnapKVPress(compression_ratio=cr, window_size=WINDOW, kernel_size=5),
                                    alpha_safeguard=0.2)}
    items = []
    for ids in prompts(tok):
        item = {"ids": torch.tensor(ids), "inputs": {}, "kept": {}}
        for name, press in presses.items():
            kept: dict[int, torch.Tensor] = {}
            scorer = press.press if isinstance(press, AdaKVPress) else press
            orig_score, orig_compress = scorer.score, press.compress

            def score(module, hidden, keys, values, attentions, kwargs, _orig=orig_score, _kept=kept, _name=name):
                s = _orig(module, hidden, keys, values, attentions, kwargs)
                layer = module.layer_idx
                if layer not in item["inputs"]:  # the inputs are the same for every press: record them once
                    q = get_prerope_query_states(module, hidden[:, -WINDOW:])  # (B, Hq, W, D)
                    cos, sin = kwargs["position_embeddings"]
                    cos, sin = cos[:, -WINDOW:].unsqueeze(1), sin[:, -WINDOW:].unsqueeze(1)
                    item["inputs"][layer] = (keys.clone(), values.clone(), q * cos + rotate_half(q) * sin)
                if _name != "ada_kv":
                    n = compute_n_kept(keys.shape[2], scorer.compression_ratio)
                    _kept[layer] = s.topk(n, dim=-1).indices.sort(dim=-1).values  # ScorerPress.compress's top-k
                return s

            def compress(module, hidden, keys, values, attentions, kwargs, _orig=orig_compress, _kept=kept):
                out = _orig(module, hidden, keys, values, attentions, kwargs)
                if getattr(module, "masked_key_indices", None) is not None:  # AdaKV: everything not masked
                    b, h, t = keys.shape[:3]
                    mask = torch.ones(b, h, t, dtype=torch.bool)
                    bi, hi, si = module.masked_key_indices
                    mask[bi, hi, si] = False
                    _kept[module.layer_idx] = mask
                    module.masked_key_indices = None
                return out

            scorer.score, press.compress = score, compress
            with torch.no_grad(), press(model):
                model(input_ids=item["ids"].view(1, -1), past_key_values=DynamicCache(config=model.config))
            scorer.score, press.compress = orig_score, orig_compress
            item["kept"][name] = kept
            print(f"kvpress {name}: {len(kept)} layers, {item['ids'].shape[0]} tokens", file=sys.stderr)
        items.append(item)
    versions = {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else _dist("kvpress"),
                "transformers": transformers.__version__, "torch": torch.__version__, "python": platform.python_version()}
    torch.save({"items": items, "versions": versions, "keep": KEEP, "window": WINDOW,
                "scaling": model.model.layers[0].self_attn.scaling}, out)
    print(f"wrote {out} ({versions})", file=sys.stderr)


def _dist(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# ------------------------------------------------------------------------------------------- step 2: kvtune
def compare(path: Path) -> dict:
    import transformers

    data = torch.load(path, weights_only=False)
    return {"kvpress_side": data["versions"], "kvtune_side": {"transformers": transformers.__version__,
                                                               "torch": torch.__version__},
            "prompts_tokens": [int(i["ids"].shape[0]) for i in data["items"]], "keep": data["keep"],
            "aligned_params": ALIGNED, "rows": jaccard(data, ALIGNED),
            "misaligned_params": MISALIGNED, "misaligned_rows": jaccard(data, MISALIGNED)}


def jaccard(data: dict, params_by_method: dict) -> dict:
    """Per method: Jaccard of kvtune's kept set (``params_by_method``) and kvpress's, per (prompt, layer, head)."""
    from kvtune.strategies import ScoreInputs, build

    per_method: dict[str, list[float]] = {m: [] for m in params_by_method}
    for item in data["items"]:
        layers = len(item["inputs"])
        t = item["ids"].shape[0]
        n = max(1, int(t * (1 - (1.0 - data["keep"]))))  # kvpress's compute_n_kept
        for name, params in params_by_method.items():
            sel = build("selection", name, {**params, "budget": n})
            for layer, (keys, values, queries) in sorted(item["inputs"].items()):
                inputs = ScoreInputs(keys, values, layer, layers, data["scaling"], window_queries=queries)
                theirs = item["kept"][name][layer]
                if sel.ragged:
                    ours = sel.select_ragged(inputs)  # per (batch, head) index tensors
                    b, h = keys.shape[:2]
                    for bi in range(b):
                        for hi in range(h):
                            a = set(ours[bi][hi].tolist())
                            p = set(theirs[bi, hi].nonzero().flatten().tolist())
                            per_method[name].append(len(a & p) / len(a | p))
                else:
                    ours = sel.select(inputs)  # (B, H, K)
                    for a, p in zip(ours.reshape(-1, ours.shape[-1]), theirs.reshape(-1, theirs.shape[-1])):
                        a, p = set(a.tolist()), set(p.tolist())
                        per_method[name].append(len(a & p) / len(a | p))
    return {m: {"heads_compared": len(v), "jaccard_mean": sum(v) / len(v), "jaccard_min": min(v),
                "identical": sum(x == 1.0 for x in v)} for m, v in per_method.items()}


def render(res: dict) -> str:
    v = res["kvpress_side"]
    lines = [f"kvpress {v['kvpress']} (transformers {v['transformers']}, torch {v['torch']}) against kvtune "
             f"(transformers {res['kvtune_side']['transformers']}), SmolLM2-135M-Instruct float32 on CPU, prompts of "
             f"{' and '.join(map(str, res['prompts_tokens']))} tokens of `pydoc_data.topics`, {res['keep']:.0%} of the "
             f"tokens kept, every layer and KV head (`python benchmarks/kvpress_fidelity.py`):", "",
             "| method | (prompt, layer, head) sets | identical | Jaccard mean | Jaccard min |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for label, rows in (("", res["rows"]), (" (misaligned)", res.get("misaligned_rows", {}))):
        for m, r in rows.items():
            extra = "" if not label else " " + ",".join(f"{k}={v}" for k, v in res["misaligned_params"][m].items())
            lines.append(f"| {m}{label}{extra} | {r['heads_compared']} | {r['identical']} | "
                         f"{r['jaccard_mean']:.6f} | {r['jaccard_min']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dump", type=Path, help="step 1 (kvpress venv): record kvpress's inputs and kept tokens here")
    ap.add_argument("--model-dir", help="step 1: the model folder (kvtune's converted copy of the bundled GGUF)")
    ap.add_argument("--compare", type=Path, help="step 2 (kvtune venv): compare kvtune's selectors on this dump")
    args = ap.parse_args()
    if args.dump:
        dump(args.dump, args.model_dir)
        return
    if not args.compare:
        ap.error("give --dump (with --model-dir) or --compare")
    res = compare(args.compare)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))
    table = render(res)
    print(table)
    text = PAGE.read_text()
    if START in text and END in text:  # the table of docs/strategies.md, between its markers
        head, rest = text.split(START, 1)
        PAGE.write_text(head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
