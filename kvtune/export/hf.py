"""Hugging Face transformers export: a ``generation_config`` fragment and a Python snippet.

Writes ``hf_generation_config.json`` (``cache_implementation`` and ``cache_config``: what transformers expresses
by itself; load it with ``GenerationConfig.from_pretrained(folder, config_file_name=...)`` or merge its keys into
a model's ``generation_config.json``) and ``hf_kvtune.py`` (runs the whole pipeline, eviction included, through
kvtune's own ``Cache``). JSON has no comments, so what the fragment leaves out is listed in the snippet's
docstring (and on stderr).

Checked against transformers 5.24.0 (the stack profile ``profiles/stacks/hf.yaml``), installed here: the tests load the
fragment with ``GenerationConfig`` and build the ``QuantizedCache`` it names where the backend needs no extra
package. The snippet passes kvtune's cache as ``cache=`` (``past_key_values=`` is deprecated since 5.24); a method
the installed kvtune cannot build (a plugin strategy not installed there) is reported and step 2 is skipped, never
a traceback.

Mapping:

* codec ``fp8`` -> ``quantized`` with ``backend: fp8`` (e4m3, one per-tensor scale frozen at the first update);
  ``kivi`` -> ``quantized`` with ``backend: quanto`` (``nbits``, ``q_group_size``, ``residual_length``; needs
  ``optimum-quanto``); ``int8`` -> ``quantized`` with ``backend: hqq``, ``nbits: 8`` (needs ``hqq``).
  transformers quantizes keys and values along the same axis, not KIVI's per-channel keys / per-token values.
* placement ``offload`` -> ``offloaded`` (all layers but the running one in CPU memory, the next layer
  prefetched); ``gpu_fraction``, ``block_size``, ``prefetch_depth`` > 1 and ``tier: disk`` have no equivalent.
  Offload and a quantized cache do not combine in one ``cache_implementation``: the quantized cache wins.
* selection -> not expressible in ``generation_config``; the snippet's kvtune cache runs it.
"""

from __future__ import annotations

import json
from typing import Any

from kvtune.export import _common as c
from kvtune.pipeline import Pipeline
from kvtune.stacks import default_profile

PROFILE = default_profile("hf")
STACK = PROFILE.name
VERSION = PROFILE.version
OPTIONS = PROFILE.options
CONFIG_FILENAME = "hf_generation_config.json"
SNIPPET_FILENAME = "hf_kvtune.py"

# kvtune's runtime (kvtune/runtime.py): a transformers ``Cache`` running the pipeline per layer, plus the
# attention function selectors need, registered with transformers' AttentionInterface as "kvtune".
RUNTIME_IMPORT = "from kvtune.runtime import KVCache, register_attention"
RUNTIME_CALL = "KVCache(PIPELINE, model.config.get_text_config().num_hidden_layers)"


def cache_settings(p: Pipeline, notes: c.Notes, *, runner: str = f"{SNIPPET_FILENAME}'s kvtune cache"
                   ) -> tuple[str, dict[str, Any] | None]:
    """``(cache_implementation, cache_config)`` that transformers can run for ``p``; notes what it cannot.

    ``runner`` names what runs the parts transformers cannot (used in the notes).
    """
    codec = p.codec
    cache_config: dict[str, Any] | None = None
    impl = "dynamic"
    if codec.method == "fp8":
        impl, cache_config = "quantized", {"backend": "fp8"}
        fmt = c.str_param(codec, "fmt", "e4m3")
        scale = c.str_param(codec, "scale", "head")
        if fmt != "e4m3":
            notes.approximated(f"codec {codec.label()}", f"transformers' fp8 cache stores e4m3; fmt={fmt} not available")
        notes.approximated(
            f"codec {codec.label()} scales",
            f"one per-tensor scale per layer, frozen at the first update (scale={scale} is finer)",
        )
    elif codec.method == "kivi":
        bits = c.int_param(codec, "bits", 4)
        group = c.int_param(codec, "group_size", 32)
        residual = c.int_param(codec, "residual", 128)
        if bits in (2, 4):
            impl = "quantized"
            cache_config = {"backend": "quanto", "nbits": bits, "q_group_size": group, "residual_length": residual,
                            "axis_key": 0, "axis_value": 0}
            notes.approximated(
                f"codec {codec.label()}",
                "transformers' QuantizedCache (quanto) groups keys and values along the same axis, not KIVI's "
                "per-channel keys and per-token values; needs optimum-quanto installed",
            )
        else:
            notes.not_expressible(f"codec {codec.label()}", "quantized cache with nbits 4 (quanto)")
    elif codec.method == "int8":
        group = c.int_param(codec, "group_size", 64)
        impl = "quantized"
        cache_config = {"backend": "hqq", "nbits": 8, "q_group_size": group, "axis_key": 1, "axis_value": 1}
        zero = " with a zero point (asymmetric; symmetric=true is not available)" if codec.params.get("symmetric") else ""
        notes.approximated(
            f"codec {codec.label()}",
            f"transformers' QuantizedCache (hqq, 8 bits) groups along one axis{zero} and keeps the newest 128 tokens "
            "in full precision (residual_length default); needs hqq installed",
        )
    elif codec.method not in c.IDENTITY_CODECS:
        notes.not_expressible(f"codec {codec.label()}", f"the model dtype (dynamic cache); {runner} runs it")

    place = p.placement
    if place.method == "offload":
        tier = c.str_param(place, "tier", "cpu")
        if impl == "quantized":
            notes.not_expressible(
                f"placement {place.label()} together with a quantized cache",
                f"quantized cache on the GPU (cache_implementation takes one of the two); {runner} runs both",
            )
        else:
            impl = "offloaded"
            left = [k for k in ("gpu_fraction", "block_size") if k in place.params]
            depth = c.int_param(place, "prefetch_depth", 1)
            if depth is not None and depth > 1:
                left.append(f"prefetch_depth={depth} (transformers prefetches 1 layer)")
            if tier != "cpu":
                left.append(f"tier={tier} (transformers offloads to CPU memory)")
            if left:
                notes.approximated(
                    f"placement {place.label()}",
                    "cache_implementation offloaded keeps only the running layer on the GPU; no equivalent for "
                    + ", ".join(left),
                )
            notes.note("the offloaded cache moves KV between a CUDA GPU and CPU memory: on a machine without CUDA "
                       "transformers stops with 'Torch not compiled with CUDA enabled'")
    elif place.method != "gpu":
        notes.not_expressible(f"placement {place.label()} (unknown method)", "all KV on the GPU")
    return impl, cache_config


def _selection_notes(p: Pipeline, notes: c.Notes, where: str) -> None:
    sel = p.selection
    if sel.method != "none":
        notes.not_expressible(
            f"selection {sel.label()} (token eviction) in {where}",
            f"keep every token; {SNIPPET_FILENAME} runs the eviction with kvtune's cache",
        )


def _switch_note(notes: c.Notes) -> None:
    notes.note(
        "serving switches (prefix_caching, max_model_len, gpu_memory_fraction) have no generate() equivalent: "
        "they apply to serving stacks"
    )


def snippet(p: Pipeline, notes: c.Notes, impl: str, cache_config: dict[str, Any] | None) -> str:
    model = c.model_id(p) or "<model id or local path>"
    stages = {
        "schema_version": p.schema_version,
        "selection": p.selection.model_dump(mode="json"),
        "codec": p.codec.model_dump(mode="json"),
        "placement": p.placement.model_dump(mode="json"),
    }
    header = c.header_lines(
        title="kvtune pipeline with Hugging Face transformers", p=p, stack=STACK, version=VERSION, options_file=None,
        usage=[f"{CONFIG_FILENAME} (same folder) holds what transformers expresses by itself:",
               f"  cache_implementation={impl!r}" + (f", cache_config={json.dumps(cache_config, sort_keys=True)}" if cache_config else ""),
               "this script runs the whole pipeline through kvtune's own Cache (needs kvtune installed)"],
        notes=notes, kvtune_version=c.kvtune_version(),
        measured_title=("Measured by kvtune on exactly what this script runs (kvtune's Cache; the generation_config "
                        "fragment is what LEFT OUT OR CHANGED says):" if notes.dropped else None),
    )
    body = f'''{c.python_docstring(header)}

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from kvtune.errors import UserError
from kvtune.pipeline import Pipeline
{RUNTIME_IMPORT}

MODEL = {c.python_literal(model)}
PIPELINE = Pipeline.from_dict({c.python_literal(stages)})


def main() -> None:
    register_attention()  # makes attn_implementation="kvtune" available; plain SDPA for any other cache
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype="auto", attn_implementation="kvtune")
    # one unpadded prompt: kvtune's attention builds the causal mask itself
    inputs = tokenizer("Summarize the history of the printing press.", return_tensors="pt").to(model.device)

    # 1. transformers alone: the settings it can express (eviction left out, see above)
    generation_config = GenerationConfig.from_pretrained(".", config_file_name={json.dumps(CONFIG_FILENAME)})
    plain = model.generate(**inputs, generation_config=generation_config, max_new_tokens=64)

    print(tokenizer.decode(plain[0], skip_special_tokens=True))

    # 2. the whole pipeline, eviction included, through kvtune's cache
    cache = build_cache(model)
    if cache is not None:
        full = model.generate(**inputs, cache=cache, max_new_tokens=64)
        print(tokenizer.decode(full[0], skip_special_tokens=True))


def build_cache(model):
    """kvtune's cache for PIPELINE, or None (with the reason on stderr) when this kvtune cannot build it, e.g. a
    method from a plugin that is not installed here."""
    try:
        return {RUNTIME_CALL}
    except (UserError, ValueError) as exc:
        print(f"kvtune cannot run this pipeline here: {{exc}}", file=sys.stderr)
        return None


if __name__ == "__main__":
    main()
'''
    return body


def render(p: Pipeline) -> list[c.Rendered]:
    notes = c.Notes(f"{STACK} {VERSION}")
    impl, cache_config = cache_settings(p, notes)
    _selection_notes(p, notes, CONFIG_FILENAME)
    _switch_note(notes)
    fragment: dict[str, Any] = {"cache_implementation": impl}
    if cache_config is not None:
        fragment["cache_config"] = cache_config
    config_text = json.dumps(fragment, indent=2, sort_keys=True) + "\n"
    return [
        c.Rendered(CONFIG_FILENAME, config_text, notes.all()),
        c.Rendered(SNIPPET_FILENAME, snippet(p, notes, impl, cache_config), ()),
    ]
