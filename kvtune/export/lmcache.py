"""LMCache export: LMCache's own YAML plus the vLLM settings that plug it in.

Writes ``lmcache.yaml`` (read by LMCache through ``LMCACHE_CONFIG_FILE``) and ``lmcache-vllm.yaml`` (a
``vllm serve --config`` file with ``kv-transfer-config`` naming ``LMCacheConnectorV1``). Targets LMCache 0.5.6
(the stack profile ``profiles/stacks/lmcache.yaml``; ``lmcache/v1/config.py`` ``_CONFIG_DEFINITIONS`` read from the
0.5.6 wheel into ``options/lmcache-0.5.6.yaml``) paired with the vLLM release the profile names (0.33.0: its
transformers range meets LMCache's ``transformers>=5.4``; vLLM 0.11.1 needs transformers<5 and cannot be installed
with it); the companion file follows :mod:`kvtune.export.vllm`.

Mapping:

* placement ``offload`` -> ``chunk_size`` from the block size; ``tier: cpu`` -> ``local_cpu: true`` and
  ``max_local_cpu_size`` (GiB per rank, from host bytes); ``tier: disk`` -> ``local_disk`` (a ``file://`` path
  to edit) and ``max_local_disk_size`` (without a size no disk tier is written: LMCache's default 0 disables it).
  LMCache stores KV chunks for reuse and loads them back on a hit; a
  running request's KV stays in vLLM's GPU cache, so ``gpu_fraction``/``prefetch_depth`` have no equivalent.
* placement ``gpu`` -> LMCache's default CPU tier, with a note: it only adds cross-request reuse.
* codec -> LMCache stores what vLLM hands it: the KV dtype is the companion file's ``kv-cache-dtype``.
* selection -> not expressible (as in vLLM).
"""

from __future__ import annotations

from typing import Any

from kvtune.export import _common as c
from kvtune.export import vllm as vllm_export
from kvtune.pipeline import Pipeline
from kvtune.stacks import default_profile

PROFILE = default_profile("lmcache")
STACK = PROFILE.name
VERSION = PROFILE.version
OPTIONS = PROFILE.options
FILENAME = "lmcache.yaml"
VLLM_FILENAME = "lmcache-vllm.yaml"

DEFAULT_CHUNK = 256  # LMCache's default chunk_size
DEFAULT_CPU_GIB = 5.0  # LMCache's default max_local_cpu_size
DISK_PATH = "file:///var/tmp/kvtune-lmcache/"


def build(p: Pipeline, notes: c.Notes) -> dict[str, Any]:
    body: dict[str, Any] = {}
    place = p.placement
    block = c.int_param(place, "block_size") if place.method == "offload" else None
    body["chunk_size"] = block if block is not None and block >= 1 else DEFAULT_CHUNK
    size = c.host_bytes(p)
    if place.method == "offload":
        tier = c.str_param(place, "tier", "cpu")
        body["local_cpu"] = True
        if tier == "disk":
            body["max_local_cpu_size"] = DEFAULT_CPU_GIB
            if size is None:
                notes.not_expressible(
                    "placement disk tier (no placement.params.host_bytes and no measurements to size it)",
                    "local_disk + max_local_disk_size: <GiB of disk> (not written: without a size LMCache keeps no "
                    "disk tier; the CPU tier alone is configured)",
                )
            else:
                body["local_disk"] = DISK_PATH
                body["max_local_disk_size"] = c.round_gib(size)
                notes.note(f"local_disk points at {DISK_PATH}: change it to a fast local disk; the CPU tier stages chunks")
        elif tier == "cpu":
            if size is None:
                body["max_local_cpu_size"] = DEFAULT_CPU_GIB
                notes.not_expressible(
                    "placement host memory (no placement.params.host_bytes and no measurements to derive it)",
                    f"max_local_cpu_size: <GiB of host memory> (LMCache's default {c.fmt_num(DEFAULT_CPU_GIB)} written)",
                )
            else:
                body["max_local_cpu_size"] = c.round_gib(size)
        else:
            body["max_local_cpu_size"] = DEFAULT_CPU_GIB
            notes.not_expressible(f"placement tier {tier!r}", "local_cpu (host memory)")
        g = c.float_param(place, "gpu_fraction")
        d = c.int_param(place, "prefetch_depth")
        notes.approximated(
            f"placement {place.label()}",
            "LMCache stores KV chunks for reuse and loads them back on a hit; a running request's KV stays in "
            f"vLLM's GPU cache, so gpu_fraction={c.fmt_num(g) if g is not None else '-'} and "
            f"prefetch_depth={d if d is not None else '-'} have no equivalent",
        )
        notes.note("max_local_cpu_size / max_local_disk_size are GiB per vLLM worker (rank)")
    else:
        body["local_cpu"] = True
        body["max_local_cpu_size"] = DEFAULT_CPU_GIB
        notes.note(
            f"the pipeline keeps all KV on the GPU: this LMCache CPU tier ({c.fmt_num(DEFAULT_CPU_GIB)} GiB, "
            "LMCache's default) only adds prefix reuse across requests"
        )
        if place.method != "gpu":
            notes.not_expressible(f"placement {place.label()} (unknown method)", "all KV on the GPU")

    if not p.switches.prefix_caching:
        notes.approximated(
            "prefix_caching off",
            "LMCache exists to reuse prefixes; the companion vLLM file turns vLLM's own prefix cache off, but "
            "LMCache still stores and retrieves chunks",
        )
    if p.codec.method not in c.IDENTITY_CODECS:
        notes.note(f"codec {p.codec.label()}: LMCache stores the KV in vLLM's kv-cache-dtype (see {VLLM_FILENAME})")
    if p.selection.method != "none":
        notes.not_expressible(
            f"selection {p.selection.label()} (token eviction)", "keep every token (LMCache stores whole chunks)"
        )
    return body


def render(p: Pipeline) -> list[c.Rendered]:
    kv = c.kvtune_version()
    notes = c.Notes(f"{STACK} {VERSION}")
    body = build(p, notes)
    header = c.header_lines(
        title="LMCache config exported by kvtune", p=p, stack=STACK, version=VERSION, options_file=OPTIONS,
        usage=[f"run: LMCACHE_CONFIG_FILE={FILENAME} vllm serve --config {VLLM_FILENAME}"], notes=notes,
        kvtune_version=kv,
    )
    files = [c.Rendered(FILENAME, c.yaml_file(header, body), notes.all())]

    vnotes = c.Notes(f"{vllm_export.STACK} {vllm_export.VERSION}")
    vbody = vllm_export.build(p, vnotes, force_lmcache=True)
    for key in ("kv-offloading-size", "kv-offloading-backend"):
        vbody.pop(key, None)
    vbody["kv-transfer-config"] = {"kv_connector": vllm_export.LMCACHE_CONNECTOR, "kv_role": "kv_both"}
    pair = PROFILE.get("paired_with")
    assert pair["version"] == vllm_export.VERSION, "the LMCache profile pairs the vLLM release the vLLM export targets"
    vnotes.note(f"install together: LMCache {VERSION} (transformers{PROFILE.get('requires')['transformers']}) and vLLM "
                f"{vllm_export.VERSION} (transformers{vllm_export.PROFILE.get('requires')['transformers']})")
    vheader = c.header_lines(
        title="vLLM serve config with the LMCache connector, exported by kvtune", p=p, stack=vllm_export.STACK,
        version=vllm_export.VERSION, options_file=vllm_export.OPTIONS,
        usage=vllm_export.usage(vbody, VLLM_FILENAME, env=f"LMCACHE_CONFIG_FILE={FILENAME} "), notes=vnotes,
        kvtune_version=kv,
    )
    files.append(c.Rendered(VLLM_FILENAME, c.yaml_file(vheader, vbody), vnotes.all()))
    return files
