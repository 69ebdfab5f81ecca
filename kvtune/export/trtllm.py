"""TensorRT-LLM export: LLM-API options for ``trtllm-serve <model> --config trtllm.yaml``.

The same file works as ``--extra_llm_api_options trtllm.yaml`` and as keyword arguments of ``tensorrt_llm.LLM``.
Targets TensorRT-LLM 1.2.x, the stable release (the stack profile ``profiles/stacks/trtllm.yaml``; option list
``options/trtllm-1.2.1.yaml``, recorded from the ``KvCacheConfig`` reference: PyPI has no TensorRT-LLM source).
The PyTorch backend is assumed (the default of ``trtllm-serve``). The 1.3 release candidates add the disk tier
(``disk_cache_size``/``disk_cache_path``, in the profile's 1.3.0rc27 entry).

Mapping:

* codec ``fp8`` -> ``kv_cache_config.dtype: fp8`` (e4m3; ``e5m2`` is not a KV dtype there, so it is written as
  fp8 with a note); ``int8``/``kivi`` are not expressible (int8 KV belongs to the TensorRT engine flow).
* selection ``sliding_window`` -> ``max_attention_window: [budget tokens]``; ``streaming_llm`` -> the same window
  without its sinks: ``sink_token_length`` does nothing on the PyTorch backend (NVIDIA/TensorRT-LLM#14275), so it
  is not written and the note says the export is a plain window; the others are not expressible.
* placement ``offload`` on ``cpu`` -> ``host_cache_size`` (bytes), ``tokens_per_block`` from the block size;
  the host cache is a secondary tier for block reuse, so ``gpu_fraction``/``prefetch_depth`` have no equivalent.
* switches -> ``enable_block_reuse`` (prefix caching), ``max_seq_len``, ``free_gpu_memory_fraction`` (a share of
  the memory *free after the weights load*, not of the whole GPU); capacity -> ``max_batch_size``.
"""

from __future__ import annotations

from typing import Any

from kvtune.export import _common as c
from kvtune.pipeline import Pipeline
from kvtune.stacks import default_profile

PROFILE = default_profile("trtllm")
STACK = PROFILE.name
VERSION = PROFILE.version
OPTIONS = PROFILE.options
FILENAME = "trtllm.yaml"


def build(p: Pipeline, notes: c.Notes) -> dict[str, Any]:
    kv: dict[str, Any] = {}
    body: dict[str, Any] = {}

    value, _, codec_exact = c.profile_kv_dtype(
        PROFILE, p, notes,
        fallback_note=("kv_cache_config.dtype: fp8 (not applied: kvtune did not measure its quality); the KV stays "
                       "in the model dtype"),
    )
    kv_dtype = value or "auto"
    kv["dtype"] = kv_dtype

    sel = p.selection
    sel_exact = sel.method == "none"
    kept_fraction = 1.0
    ctx = c.context_tokens(p)
    if sel.method in ("streaming_llm", "sliding_window"):
        tokens, how = c.keep_tokens(sel, ctx)
        if tokens is None and c.int_param(sel, "window") is not None:
            tokens, how = c.int_param(sel, "window"), None
        if tokens is None:
            notes.not_expressible(f"selection {sel.label()}: {how}", "max_attention_window: [<tokens to keep>]")
            sel_exact = False
        else:
            kv["max_attention_window"] = [tokens]
            if ctx:
                kept_fraction = min(1.0, tokens / ctx)
            sinks = c.int_param(sel, "sinks", 0) or 0
            sel_exact = True
            if sel.method == "streaming_llm" and sinks > 0:
                window = PROFILE.get("window") or {}
                if window.get("sinks"):
                    kv["sink_token_length"] = sinks
                else:
                    notes.approximated(f"selection {sel.label()}", f"sinks={sinks} dropped: {window.get('note')}; "
                                       "this is a plain sliding window, which kvtune did not measure")
                    sel_exact = False
            if how:
                notes.approximated(f"selection {sel.label()} budget", how)
            notes.note(
                "max_attention_window bounds every layer to the most recent tokens; blocks of such a cyclic window "
                "are not reused across requests"
            )
        extra = sorted(set(sel.params) - {"budget", "sinks", "window"})
        if extra:
            notes.approximated(
                f"selection {sel.label()}",
                f"parameters {', '.join(extra)} have no equivalent (the window keeps the most recent tokens)",
            )
    elif sel.method != "none":
        kind = "unknown selection method" if sel.method not in c.KNOWN_SELECTIONS else "score-based token eviction"
        notes.not_expressible(
            f"selection {sel.label()} ({kind})",
            "keep every token; the closest TensorRT-LLM has is a StreamingLLM window "
            "(max_attention_window + sink_token_length), not applied: it drops different tokens",
        )
        sel_exact = False

    place = p.placement
    if place.method == "offload":
        tier = c.str_param(place, "tier", "cpu")
        block = c.int_param(place, "block_size")
        if block is not None:  # offload block sizes (16..128) are powers of two, as tokens_per_block must be
            kv["tokens_per_block"] = block
        if tier == "cpu":
            size = c.host_bytes(p)
            if size is None:
                notes.not_expressible(
                    "placement host memory (no placement.params.host_bytes and no measurements to derive it)",
                    "kv_cache_config.host_cache_size: <bytes of host memory>",
                )
            else:
                kv["host_cache_size"] = int(size)
        elif tier == "disk" and not PROFILE.get("disk_tier"):
            notes.not_expressible(f"placement tier disk in {STACK} {VERSION}",
                                  "kv_cache_config.host_cache_size (host memory); the 1.3 release candidates add "
                                  "disk_cache_size / disk_cache_path")
        else:
            notes.not_expressible(f"placement tier {tier!r}", "kv_cache_config.host_cache_size (host memory)")
        g = c.float_param(place, "gpu_fraction")
        d = c.int_param(place, "prefetch_depth")
        notes.approximated(
            f"placement {place.label()}",
            "the host cache is a secondary tier for reusable blocks (offloaded on eviction, onboarded on reuse); a "
            f"running request's KV stays on the GPU, so gpu_fraction={c.fmt_num(g) if g is not None else '-'} and "
            f"prefetch_depth={d if d is not None else '-'} have no equivalent",
        )
    elif place.method != "gpu":
        notes.not_expressible(f"placement {place.label()} (unknown method)", "all KV on the GPU")

    sw = p.switches
    kv["enable_block_reuse"] = sw.prefix_caching
    kv["free_gpu_memory_fraction"] = sw.gpu_memory_fraction
    notes.note(
        "free_gpu_memory_fraction is a share of the GPU memory free after the weights load (vLLM/SGLang count the "
        "whole GPU): the same number leaves TensorRT-LLM a somewhat larger KV pool"
    )
    # a StreamingLLM window realizes the measured memory too, when the budget mapped to tokens
    exact = codec_exact and sel_exact and place.method == "gpu"
    seqs, how = c.stack_capacity(p, exact=exact, stack_kv_dtype="fp8" if kv_dtype == "fp8" else "auto",
                                 kept_fraction=kept_fraction)
    if seqs is not None:
        body["max_batch_size"] = seqs
    notes.note(f"max_batch_size: {how}")
    if sw.max_model_len is not None:
        body["max_seq_len"] = sw.max_model_len
    body["kv_cache_config"] = kv
    return body


def render(p: Pipeline) -> list[c.Rendered]:
    notes = c.Notes(f"{STACK} {VERSION}")
    body = build(p, notes)
    model = c.model_id(p) or "<model>"
    header = c.header_lines(
        title="TensorRT-LLM LLM-API options exported by kvtune", p=p, stack=STACK, version=VERSION,
        options_file=OPTIONS,
        usage=[f"run: trtllm-serve {model} --config {FILENAME}",
               f"  (older releases: trtllm-serve {model} --extra_llm_api_options {FILENAME})"],
        notes=notes, kvtune_version=c.kvtune_version(),
    )
    return [c.Rendered(FILENAME, c.yaml_file(header, body), notes.all())]
