"""vLLM export: a YAML file for ``vllm serve <model> --config vllm.yaml``.

Checked against vLLM 0.11.1 (``vllm/config/cache.py`` and the engine-argument reference of that release, read
through the stored docs; option list in ``options/vllm-0.11.1.yaml``). vLLM's config loader turns each key into
``--key value``; a ``false`` boolean is dropped by that loader, so "prefix caching off" is written as
``no-enable-prefix-caching: true`` and "on" as ``enable-prefix-caching: true``. Dict-valued options
(``kv-transfer-config``) are written as a JSON string, which is what the flag parses.

Mapping (docs/exports.md has the full table):

* codec ``fp8`` -> ``kv-cache-dtype: fp8_e4m3|fp8_e5m2``; one per-tensor scale per layer, 1.0 unless calibrated.
  ``int8``, ``kivi`` and unknown codecs are not expressible (the KV stays in the model dtype).
* selection (any eviction) -> not expressible: vLLM never evicts tokens of a running sequence.
* placement ``offload`` on ``cpu`` -> ``kv-offloading-backend: native`` + ``kv-offloading-size`` (GiB, summed
  over tensor-parallel ranks); on ``disk`` -> LMCache through ``kv-transfer-config``. vLLM's offload tier holds
  blocks for later reuse; a running sequence's KV stays whole on the GPU, so ``gpu_fraction`` and
  ``prefetch_depth`` have no equivalent.
* switches -> ``enable-prefix-caching`` / ``no-enable-prefix-caching``, ``max-model-len``,
  ``gpu-memory-utilization``; measured capacity -> ``max-num-seqs``.
"""

from __future__ import annotations

from typing import Any

from kvtune.export import _common as c
from kvtune.pipeline import Pipeline

STACK = "vLLM"
VERSION = "0.11.1"
OPTIONS = "vllm-0.11.1.yaml"
FILENAME = "vllm.yaml"

# vLLM 0.11.1 accepts block sizes 1..256 but its CUDA attention backends only up to 32.
_CUDA_BLOCK_SIZES = (8, 16, 32)
LMCACHE_CONNECTOR = "LMCacheConnectorV1"


def _kv_dtype(p: Pipeline, notes: c.Notes) -> tuple[str | None, bool]:
    """The ``kv-cache-dtype`` to write (None = auto) and whether it realizes the codec as measured."""
    return c.fp8_kv_dtype(
        p, notes,
        scale_note=("vLLM keeps one scale per layer for K and one for V (scale={scale} is finer); the scales are 1.0 unless "
            "the checkpoint carries calibrated ones (llm-compressor) or calculate-kv-scales is set"),
        fallback_note=("kv-cache-dtype: fp8_e4m3 (8 bits per element; not applied: kvtune did not measure its quality); "
        "the KV stays in the model dtype"),
    )


def _block_size(block: int, notes: c.Notes, what: str) -> int:
    if block in _CUDA_BLOCK_SIZES:
        return block
    nearest = min(_CUDA_BLOCK_SIZES, key=lambda b: (abs(b - block), b))
    notes.approximated(what, f"block size {block} tokens is not one vLLM's CUDA backends take; written as {nearest}")
    return nearest


def build(p: Pipeline, notes: c.Notes, *, disk_via_lmcache: bool = True, force_lmcache: bool = False) -> dict[str, Any]:
    """The ``vllm serve`` option mapping for ``p`` (keys in a fixed order), recording notes as it goes.

    ``force_lmcache``: route any offload (and the prefix-reuse tier) through LMCache's connector instead of
    vLLM's native offloading (used by the LMCache export's companion file).
    """
    body: dict[str, Any] = {}
    model = c.model_id(p)
    if model:
        body["model"] = model

    kv_dtype, codec_exact = _kv_dtype(p, notes)
    if kv_dtype:
        body["kv-cache-dtype"] = kv_dtype
        backends = c.load_options(OPTIONS)["attention_backends_kv_dtype"]
        readers = sorted(name for name, dtypes in backends.items() if kv_dtype in dtypes)
        notes.note(
            f"{kv_dtype} KV is read by these attention backends: {', '.join(readers)} "
            "(choose one with VLLM_ATTENTION_BACKEND if the default does not take it)"
        )
        notes.note("fp8 KV scales default to 1.0 unless calibrated: check quality on your own prompts")

    sel = p.selection
    if sel.method != "none":
        kind = "unknown selection method" if sel.method not in c.KNOWN_SELECTIONS else "token eviction"
        notes.not_expressible(
            f"selection {sel.label()} ({kind})",
            "keep every token (vLLM never evicts tokens of a running sequence); to save KV memory instead use "
            "kv-cache-dtype fp8_e4m3 or KV offloading",
        )

    place = p.placement
    place_exact = place.method == "gpu"
    if place.method == "offload":
        tier = c.str_param(place, "tier", "cpu")
        block = c.int_param(place, "block_size")
        if block is not None:
            body["block-size"] = _block_size(block, notes, f"placement {place.label()}")
        g = c.float_param(place, "gpu_fraction")
        d = c.int_param(place, "prefetch_depth")
        notes.approximated(
            f"placement {place.label()}",
            "vLLM's offload tier keeps KV blocks for later reuse and loads them back on a prefix hit; a running "
            f"sequence's KV stays whole on the GPU, so gpu_fraction={c.fmt_num(g) if g is not None else '-'} and "
            f"prefetch_depth={d if d is not None else '-'} have no equivalent",
        )
        size = c.host_bytes(p)
        if tier == "disk" or force_lmcache:
            if tier == "disk" and not disk_via_lmcache:
                notes.not_expressible(f"placement tier {tier}", "kv-offloading-backend native (CPU memory)")
            else:
                body["kv-transfer-config"] = c.compact_json({"kv_connector": LMCACHE_CONNECTOR, "kv_role": "kv_both"})
                notes.note(
                    "the offload tier is LMCache's: run with LMCACHE_CONFIG_FILE pointing at the file "
                    "'kvtune export --to lmcache' writes (lmcache.yaml)"
                )
        elif tier == "cpu":
            if size is None:
                notes.not_expressible(
                    "placement host memory (no placement.params.host_bytes and no measurements to derive it)",
                    "kv-offloading-size: <GiB of host memory you can spare> (offloading left off)",
                )
            else:
                body["kv-offloading-size"] = c.round_gib(size)
                body["kv-offloading-backend"] = "native"
                notes.note(
                    f"kv-offloading-size is {c.round_gib(size)} GiB of host memory summed over all tensor-parallel "
                    "ranks (vLLM splits it across them)"
                )
        else:
            notes.not_expressible(f"placement tier {tier!r}", "kv-offloading-backend native (CPU memory)")
    elif place.method != "gpu":
        notes.not_expressible(f"placement {place.label()} (unknown method)", "all KV on the GPU")

    sw = p.switches
    body["gpu-memory-utilization"] = sw.gpu_memory_fraction
    if sw.max_model_len is not None:
        body["max-model-len"] = sw.max_model_len
    exact = codec_exact and sel.method == "none" and place_exact
    seqs, how = c.stack_capacity(p, exact=exact, stack_kv_dtype=kv_dtype or "auto")
    if seqs is not None:
        body["max-num-seqs"] = seqs
    notes.note(f"max-num-seqs: {how}")
    if sw.prefix_caching:
        body["enable-prefix-caching"] = True
    else:
        body["no-enable-prefix-caching"] = True
    return body


def usage(body: dict[str, Any], filename: str, env: str = "") -> list[str]:
    model = "" if "model" in body else " <model>"
    return [f"run: {env}vllm serve{model} --config {filename}"]


def render(p: Pipeline) -> list[c.Rendered]:
    notes = c.Notes(f"{STACK} {VERSION}")
    body = build(p, notes)
    header = c.header_lines(
        title=f"vLLM serve config exported by kvtune", p=p, stack=STACK, version=VERSION, options_file=OPTIONS,
        usage=usage(body, FILENAME), notes=notes, kvtune_version=c.kvtune_version(),
    )
    return [c.Rendered(FILENAME, c.yaml_file(header, body), notes.all())]
