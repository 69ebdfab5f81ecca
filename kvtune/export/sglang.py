"""SGLang export: a YAML file for ``python -m sglang.launch_server --config sglang.yaml``.

Checked against SGLang 0.5.4: ``python/sglang/srt/server_args.py`` of that release line (a stored copy of the
source read through the search tool: ``ServerArgs`` fields and ``add_cli_args`` choices; option list in
``options/sglang-0.5.4.yaml``). SGLang's config loader takes the long flag names as keys; ``store_true`` flags
are written as ``flag: true`` and left out when off.

Mapping:

* codec ``fp8`` -> ``kv-cache-dtype: fp8_e4m3|fp8_e5m2`` (SGLang has no bare ``fp8``); scales come from the
  checkpoint (``quantization-param-path``) or default to 1.0. ``int8``/``kivi`` are not expressible.
* selection -> not expressible (RadixAttention keeps every token of a running request).
* placement ``offload`` -> HiCache: ``enable-hierarchical-cache``, ``hicache-size`` (GB, from host bytes) or
  ``hicache-ratio`` (host pool / device pool), ``page-size`` from the block size; ``tier: disk`` adds
  ``hicache-storage-backend: file``. HiCache is a reuse tier: running requests keep their KV on the GPU.
* switches -> ``disable-radix-cache`` (prefix caching off), ``context-length``, ``mem-fraction-static``;
  measured capacity -> ``max-running-requests``.
"""

from __future__ import annotations

from typing import Any

from kvtune.export import _common as c
from kvtune.pipeline import Pipeline

STACK = "SGLang"
VERSION = "0.5.4"
OPTIONS = "sglang-0.5.4.yaml"
FILENAME = "sglang.yaml"


def _kv_dtype(p: Pipeline, notes: c.Notes) -> tuple[str | None, bool]:
    """The ``kv-cache-dtype`` to write (None = auto) and whether it realizes the codec as measured."""
    return c.fp8_kv_dtype(
        p, notes,
        scale_note=("SGLang uses per-layer K/V scales from the checkpoint or quantization-param-path (scale={scale} is "
                    "finer); without them the scales are 1.0"),
        fallback_note=("kv-cache-dtype: fp8_e4m3 (not applied: kvtune did not measure its quality); the KV stays in the model dtype"),
    )


def build(p: Pipeline, notes: c.Notes) -> dict[str, Any]:
    body: dict[str, Any] = {}
    model = c.model_id(p)
    if model:
        body["model-path"] = model

    kv_dtype, codec_exact = _kv_dtype(p, notes)
    if kv_dtype:
        body["kv-cache-dtype"] = kv_dtype
        notes.note(
            "check that the attention backend fuses fp8 KV dequantization (flashinfer, fa3, triton do); "
            "an unfused backend is slow"
        )

    sel = p.selection
    if sel.method != "none":
        kind = "unknown selection method" if sel.method not in c.KNOWN_SELECTIONS else "token eviction"
        notes.not_expressible(
            f"selection {sel.label()} ({kind})",
            "keep every token (SGLang never evicts tokens of a running request); to save KV memory instead use "
            "kv-cache-dtype fp8_e4m3 or HiCache",
        )

    place = p.placement
    sw = p.switches
    if place.method == "offload" and not sw.prefix_caching:
        notes.not_expressible(
            f"placement {place.label()} with prefix_caching off",
            "no host tier: HiCache extends the radix cache, and disable-radix-cache turns both off",
        )
    elif place.method == "offload":
        tier = c.str_param(place, "tier", "cpu")
        block = c.int_param(place, "block_size")
        if block is not None and block >= 1:
            body["page-size"] = block
        body["enable-hierarchical-cache"] = True
        size = c.host_bytes(p)
        g = c.float_param(place, "gpu_fraction")
        if size is not None:
            body["hicache-size"] = c.round_gb_int(size)
            notes.note(f"hicache-size is host memory in GB (1e9 bytes) per rank, rounded up from {size} bytes")
        elif g is not None and 0.0 < g < 1.0:
            ratio = round(1.0 / g, 2)
            body["hicache-ratio"] = ratio
            notes.note(
                f"hicache-ratio {c.fmt_num(ratio)} = host pool / GPU pool for a GPU share of {c.fmt_num(g)} "
                "(the host pool holds a copy of every GPU page)"
            )
        else:
            notes.note("host pool size left at SGLang's default hicache-ratio (2x the GPU pool)")
        if tier == "disk":
            body["hicache-storage-backend"] = "file"
            notes.note("the file storage backend writes under SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR; set it to a fast disk")
        elif tier != "cpu":
            notes.not_expressible(f"placement tier {tier!r}", "HiCache host memory (tier cpu)")
        d = c.int_param(place, "prefetch_depth")
        notes.approximated(
            f"placement {place.label()}",
            "HiCache keeps KV pages in host memory (and storage) for reuse and loads them back on a prefix hit; a "
            f"running request's KV stays whole on the GPU, so gpu_fraction={c.fmt_num(g) if g is not None else '-'} "
            f"and prefetch_depth={d if d is not None else '-'} have no equivalent",
        )
    elif place.method != "gpu":
        notes.not_expressible(f"placement {place.label()} (unknown method)", "all KV on the GPU")

    body["mem-fraction-static"] = sw.gpu_memory_fraction
    notes.note("mem-fraction-static covers weights and the KV pool, as the pipeline's gpu_memory_fraction does")
    if sw.max_model_len is not None:
        body["context-length"] = sw.max_model_len
    exact = codec_exact and sel.method == "none" and place.method == "gpu"
    seqs, how = c.stack_capacity(p, exact=exact, stack_kv_dtype=kv_dtype or "auto")
    if seqs is not None:
        body["max-running-requests"] = seqs
    notes.note(f"max-running-requests: {how}")
    if not sw.prefix_caching:
        body["disable-radix-cache"] = True
    return body


def render(p: Pipeline) -> list[c.Rendered]:
    notes = c.Notes(f"{STACK} {VERSION}")
    body = build(p, notes)
    model = "" if "model-path" in body else " --model-path <model>"
    header = c.header_lines(
        title="SGLang server config exported by kvtune", p=p, stack=STACK, version=VERSION, options_file=OPTIONS,
        usage=[f"run: python -m sglang.launch_server{model} --config {FILENAME}"], notes=notes,
        kvtune_version=c.kvtune_version(),
    )
    return [c.Rendered(FILENAME, c.yaml_file(header, body), notes.all())]
