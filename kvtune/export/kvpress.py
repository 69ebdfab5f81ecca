"""kvpress export: the press (and its wrapper) as a Python snippet, ``kvpress_press.py``.

Checked against kvpress 0.5.5: press classes and their dataclass fields read from the 0.5.5 wheel (option list
in ``options/kvpress-0.5.5.yaml``). kvpress 0.5.5 pins ``transformers<5.3``, so it is not installed next to
kvtune; the tests check every press class and keyword the snippet uses against that list.

Mapping (``compression_ratio`` is the fraction *removed*: ``1 - kept``; a token budget becomes a fraction of the
context the pipeline was measured at):

* ``streaming_llm`` -> ``StreamingLLMPress(compression_ratio, n_sink=sinks)``
* ``snapkv`` -> ``SnapKVPress(compression_ratio, window_size=window, kernel_size=kernel)`` (kvpress pools with
  an average: ``pooling: max`` and ``sinks`` have no equivalent)
* ``h2o`` -> ``ObservedAttentionPress(compression_ratio)`` at prefill (needs eager attention); the decode-time
  re-selection and the ``recent`` window have no equivalent
* ``pyramidkv`` -> ``PyramidKVPress``; ``ada_kv`` -> ``AdaKVPress(press=SnapKVPress(...))`` (the per-head
  wrapper); ``tova`` -> ``TOVAPress``; ``knorm`` -> ``KnormPress``; ``random`` -> ``RandomPress(seed)``;
  ``sliding_window`` -> ``StreamingLLMPress(n_sink=0)``; any other method -> no press, with a note.
* codec / placement -> the ``cache=`` argument of the kvpress pipeline, as in :mod:`kvtune.export.hf`, for the
  caches kvpress runs (the profile's ``caches``: quanto's QuantizedCache for ``kivi``, the offloaded
  DynamicCache). ``fp8`` and ``int8`` are not expressible: transformers' fp8 cache needs transformers>=5.3, which
  kvpress 0.5.5 forbids, and the hqq cache raises inside kvpress's pipeline.
"""

from __future__ import annotations

import json
from typing import Any

from kvtune.export import _common as c
from kvtune.export import hf
from kvtune.pipeline import Pipeline, Stage
from kvtune.stacks import default_profile

PROFILE = default_profile("kvpress")
STACK = PROFILE.name
VERSION = PROFILE.version
OPTIONS = PROFILE.options
FILENAME = "kvpress_press.py"


def _ratio(sel: Stage, ctx: int | None, notes: c.Notes) -> float:
    frac, how = c.keep_fraction(sel, ctx)
    if frac is None:
        notes.not_expressible(f"selection {sel.label()} budget: {how}", "compression_ratio=0.0 (nothing removed)")
        return 0.0
    if how:
        notes.approximated(f"selection {sel.label()} budget", how)
    return round(1.0 - frac, 6)


def _unused(sel: Stage, used: set[str], notes: c.Notes, why: str = "") -> None:
    left = sorted(set(sel.params) - used - {"budget"})
    if left:
        notes.approximated(
            f"selection {sel.label()}",
            f"no kvpress equivalent for {', '.join(f'{k}={sel.params[k]}' for k in left)}" + (f" ({why})" if why else ""),
        )


def press_call(p: Pipeline, notes: c.Notes) -> tuple[str | None, list[str]]:
    """The press constructor expression (None for no press) and the kvpress class names it imports."""
    sel = p.selection
    m = sel.method
    if m == "none":
        return None, []
    ctx = c.context_tokens(p)
    ratio = _ratio(sel, ctx, notes)
    r = f"compression_ratio={c.fmt_num(ratio)}"

    def snap_args(used: set[str]) -> str:
        args = [r]
        window = c.int_param(sel, "window")
        kernel = c.int_param(sel, "kernel")
        if window is not None:
            args.append(f"window_size={window}")
            used.add("window")
        if kernel is not None:
            args.append(f"kernel_size={kernel}")
            used.add("kernel")
        if c.str_param(sel, "pooling", "avg") == "avg":
            used.add("pooling")
        return ", ".join(args)

    if m == "streaming_llm":
        sinks = c.int_param(sel, "sinks", 4)
        _unused(sel, {"sinks"}, notes, "kvpress keeps the sinks and the most recent tokens")
        return f"StreamingLLMPress({r}, n_sink={sinks})", ["StreamingLLMPress"]
    if m == "sliding_window":
        _unused(sel, set(), notes)
        return f"StreamingLLMPress({r}, n_sink=0)", ["StreamingLLMPress"]
    if m == "snapkv":
        used: set[str] = set()
        call = f"SnapKVPress({snap_args(used)})"
        _unused(sel, used, notes, "kvpress smooths with an average pool and keeps no sink tokens")
        return call, ["SnapKVPress"]
    if m == "pyramidkv":
        used = set()
        args = snap_args(used)
        beta = c.int_param(sel, "beta")
        if beta is not None:
            args += f", beta={beta}"
            used.add("beta")
        _unused(sel, used, notes)
        return f"PyramidKVPress({args})", ["PyramidKVPress"]
    if m == "ada_kv":
        used = set()
        inner = f"SnapKVPress({snap_args(used)})"
        alpha = c.float_param(sel, "alpha_safeguard")
        outer = f"AdaKVPress(press={inner}"
        if alpha is not None:
            outer += f", alpha_safeguard={c.fmt_num(alpha)}"
            used.add("alpha_safeguard")
        _unused(sel, used, notes)
        notes.note("AdaKVPress spreads the budget over heads using SnapKV scores (kvtune's Ada-KV scorer may differ)")
        return outer + ")", ["AdaKVPress", "SnapKVPress"]
    if m == "h2o":
        _unused(sel, set(), notes, "ObservedAttentionPress scores once, at prefill")
        notes.approximated(
            f"selection {sel.label()}",
            "H2O re-selects during decoding; ObservedAttentionPress applies the prefill scores only "
            "(nearest decode-time form: DecodingPress, not applied)",
        )
        notes.note("ObservedAttentionPress needs the model loaded with attn_implementation='eager'")
        return f"ObservedAttentionPress({r})", ["ObservedAttentionPress"]
    if m == "tova":
        _unused(sel, set(), notes)
        return f"TOVAPress({r})", ["TOVAPress"]
    if m == "knorm":
        _unused(sel, set(), notes)
        return f"KnormPress({r})", ["KnormPress"]
    if m == "random":
        seed = c.int_param(sel, "seed")
        _unused(sel, {"seed"}, notes)
        return (f"RandomPress({r}, seed={seed})" if seed is not None else f"RandomPress({r})"), ["RandomPress"]
    notes.not_expressible(f"selection {sel.label()} (no kvpress press known to kvtune)", "no press (full cache)")
    return None, []


def render(p: Pipeline) -> list[c.Rendered]:
    notes = c.Notes(f"{STACK} {VERSION}")
    call, classes = press_call(p, notes)
    runner = "kvtune's own cache (kvtune export --to hf)"
    trial = c.Notes(notes.stack)
    impl, cache_config = hf.cache_settings(p, trial, runner=runner)
    kind = (cache_config or {}).get("backend", impl) if impl == "quantized" else impl
    if kind in PROFILE.get("caches"):
        notes.dropped += trial.dropped
        notes.info += trial.info
    else:  # the codec's cache does not run under kvpress: the placement alone decides the cache
        notes.not_expressible(
            f"codec {p.codec.label()} (transformers cache {kind})",
            f"the model dtype: kvpress {VERSION} pins transformers{PROFILE.get('requires')['transformers']} "
            "(no fp8 cache there) and its pipeline rewrites only quanto's quantized layers; 'kvtune export --to hf' "
            "runs the codec with kvtune's cache",
        )
        impl, cache_config = hf.cache_settings(p.model_copy(update={"codec": Stage(method="fp16", params={})}), notes,
                                               runner=runner)
    notes.note("serving switches (prefix_caching, max_model_len, gpu_memory_fraction) do not apply to kvpress")
    if impl != "dynamic":
        notes.note(
            f"the cache= line follows transformers {hf.VERSION}; kvpress {VERSION} pins transformers<5.3, whose cache "
            "classes may take other arguments (check before running)"
        )

    model = c.model_id(p) or "<model id or local path>"
    imports = ["from transformers import pipeline"]
    cache_line = "cache = None  # the model's default cache"
    if impl == "quantized":
        imports.append("from transformers import QuantizedCache")
        cfg = dict(cache_config or {})
        backend = cfg.pop("backend", "quanto")
        kwargs = "".join(f", {k}={json.dumps(v)}" for k, v in cfg.items())
        cache_line = f"cache = QuantizedCache(backend={json.dumps(backend)}, config=pipe.model.config{kwargs})"
    elif impl == "offloaded":
        imports.append("from transformers import DynamicCache")
        cache_line = "cache = DynamicCache(config=pipe.model.config, offloading=True)"
    if classes:
        imports.append(f"from kvpress import {', '.join(sorted(set(classes)))}")
    else:
        imports.append("import kvpress  # noqa: F401  (registers the kv-press-text-generation pipeline)")
    press_line = f"press = {call}" if call else "press = None  # no kvpress press expresses this selection"
    eager = ', model_kwargs={"attn_implementation": "eager"}' if p.selection.method == "h2o" else ""

    header = c.header_lines(
        title="kvpress press exported by kvtune", p=p, stack=STACK, version=VERSION, options_file=OPTIONS,
        usage=[f"run: python {FILENAME}  (needs kvpress {VERSION} and the transformers it pins)"],
        notes=notes, kvtune_version=c.kvtune_version(),
    )
    text = f'''{c.python_docstring(header)}

{chr(10).join(imports)}

MODEL = {c.python_literal(model)}

{press_line}


def main() -> None:
    pipe = pipeline("kv-press-text-generation", model=MODEL, device_map="auto", dtype="auto"{eager})
    {cache_line}
    context = "A long document whose KV cache the press compresses."
    question = "What is the document about?"
    answer = pipe(context, question=question, press=press, cache=cache)["answer"]
    print(answer)


if __name__ == "__main__":
    main()
'''
    return [c.Rendered(FILENAME, text, notes.all())]
