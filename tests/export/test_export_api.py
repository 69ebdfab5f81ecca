"""export_pipeline / parse_targets contracts: determinism, atomic writes, no silent overwrite, notes."""

from __future__ import annotations

import os

import pytest
import yaml
from export_cases import CASES, pipeline

from kvtune.errors import UserError
from kvtune.export import EXPORTERS, TARGETS, export_pipeline, parse_targets, render_pipeline
from kvtune.pipeline import Pipeline


def test_parse_targets() -> None:
    assert parse_targets(["vllm,sglang", "hf", "vllm"]) == ["vllm", "sglang", "hf"]
    assert parse_targets(["all"]) == list(TARGETS)
    assert parse_targets([" KVPRESS "]) == ["kvpress"]
    with pytest.raises(UserError, match="unknown export target 'vlm'"):
        parse_targets(["vlm"])
    with pytest.raises(UserError, match="no export target"):
        parse_targets([","])


def test_every_file_names_the_pinned_version() -> None:
    for name, exp in EXPORTERS.items():
        assert exp.version in (exp.module.__doc__ or ""), name
        for _, r in render_pipeline(pipeline("identity"), [name]):
            if r.filename.endswith(".json"):
                continue  # JSON has no comments: hf_kvtune.py carries the header
            pinned = EXPORTERS["vllm"] if r.filename == "lmcache-vllm.yaml" else exp
            head = "\n".join(r.text.splitlines()[:3])
            assert f"checked against {pinned.stack} {pinned.version}" in head, r.filename


@pytest.mark.parametrize("case", sorted(CASES))
def test_deterministic(case: str, tmp_path) -> None:
    a = export_pipeline(pipeline(case), ["all"], tmp_path / "a")
    b = export_pipeline(pipeline(case), ["all"], tmp_path / "b")
    assert [r.path.name for r in a] == [r.path.name for r in b]
    for ra, rb in zip(a, b):
        assert ra.path.read_bytes() == rb.path.read_bytes()
        assert ra.notes == rb.notes


def test_writes_files_and_creates_folder(tmp_path) -> None:
    out = tmp_path / "new" / "dir"
    results = export_pipeline(pipeline("snapkv_kivi_offload_cpu"), ["vllm", "lmcache"], out)
    assert [r.path.name for r in results] == ["vllm.yaml", "lmcache.yaml", "lmcache-vllm.yaml"]
    assert all(r.path.parent == out and r.path.is_file() for r in results)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temp files left behind"


def test_refuses_to_overwrite_and_writes_nothing(tmp_path) -> None:
    (tmp_path / "sglang.yaml").write_text("mine\n")
    with pytest.raises(UserError, match=r"sglang\.yaml: already exists \(pass --force"):
        export_pipeline(pipeline("identity"), ["vllm", "sglang"], tmp_path)
    assert (tmp_path / "sglang.yaml").read_text() == "mine\n"
    assert not (tmp_path / "vllm.yaml").exists(), "checked before the first write"
    export_pipeline(pipeline("identity"), ["vllm", "sglang"], tmp_path, overwrite=True)
    assert (tmp_path / "sglang.yaml").read_text().startswith("# SGLang server config")


def test_out_dir_that_is_a_file(tmp_path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        export_pipeline(pipeline("identity"), ["vllm"], f)


def test_write_is_atomic(tmp_path, monkeypatch) -> None:
    """A failure while writing is one error naming the cause; the previous file is intact, no temp file left."""
    target = tmp_path / "vllm.yaml"
    target.write_text("old\n")

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(UserError, match="cannot write the exports \\(No space left on device\\)"):
        export_pipeline(pipeline("identity"), ["vllm"], tmp_path, overwrite=True)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vllm.yaml"]


@pytest.mark.parametrize("target", TARGETS)
def test_dropped_features_are_named_in_file_and_notes(target: str) -> None:
    """Eviction that no serving stack expresses, and unknown methods, are never dropped silently."""
    p = pipeline("future_methods")
    files = render_pipeline(p, [target])
    notes = [n for _, r in files for n in r.notes]
    text = "".join(r.text for _, r in files)
    for label in ("quest(budget=0.3,page=16)", "lowrank(rank=32)", "nvme_direct(queue_depth=8)"):
        assert any(label in n for n in notes), (target, label)
        assert label in text, (target, label)
    assert all("nearest supported" in n or "approximated" in n for n in notes)


@pytest.mark.parametrize("target", ["vllm", "sglang", "lmcache", "trtllm", "hf"])
def test_eviction_is_reported_where_not_expressible(target: str) -> None:
    notes = [n for _, r in render_pipeline(pipeline("snapkv_kivi_offload_cpu"), [target]) for n in r.notes]
    assert any(n.startswith("selection snapkv(") and "not expressible" in n for n in notes), notes


# -- mapping rules stated directly (the goldens pin the rest) ----------------------------------------------------


def _yaml(case: str, target: str, filename: str) -> dict:
    import yaml

    return yaml.safe_load(dict((r.filename, r.text) for _, r in render_pipeline(pipeline(case), [target]))[filename])


def test_vllm_rules() -> None:
    off = _yaml("fp8_e5m2_prefix_off", "vllm", "vllm.yaml")
    # vLLM 0.33's loader turns false into --no-enable-prefix-caching
    assert off["enable-prefix-caching"] is False and "no-enable-prefix-caching" not in off
    assert off["kv-cache-dtype"] == "fp8_e5m2" and off["max-model-len"] == 8192
    cpu = _yaml("snapkv_kivi_offload_cpu", "vllm", "vllm.yaml")
    assert cpu["kv-offloading-backend"] == "native" and cpu["kv-offloading-size"] == 8.0
    assert "kv-cache-dtype" not in cpu, "kivi is not expressible: KV stays in the model dtype"
    assert cpu["max-num-seqs"] == 12, "eviction not realized: the full-cache capacity applies"
    assert cpu["block-size"] == 16
    disk = _yaml("h2o_offload_disk", "vllm", "vllm.yaml")
    assert disk["kv-transfer-config"] == {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    assert "kv-offloading-size" not in disk
    measured = _yaml("fp8_e4m3_measured", "vllm", "vllm.yaml")
    assert measured["max-num-seqs"] == 24 and measured["model"] == "meta-llama/Llama-3.1-8B-Instruct"


def test_vllm_fp8_e5m2_names_a_backend_that_reads_it() -> None:
    """Issue 12: FlashAttention (the default on Hopper) reads fp8 e4m3 only; e5m2 must name FlashInfer."""
    from kvtune.export._common import load_options

    off = _yaml("fp8_e5m2_prefix_off", "vllm", "vllm.yaml")
    backends = load_options(EXPORTERS["vllm"].module.OPTIONS)["attention_backends_kv_dtype"]
    assert "fp8_e5m2" not in backends["FLASH_ATTN"]
    assert off["attention-backend"] == "FLASHINFER" and "fp8_e5m2" in backends[off["attention-backend"]]
    assert "attention-backend" not in _yaml("fp8_e4m3_measured", "vllm", "vllm.yaml")


def test_vllm_per_token_fp8_and_static_scale_are_exact() -> None:
    """fp8 scale=token (e4m3) is vLLM 0.33's fp8_per_token_head (Triton backend); scale=tensor is fp8_e4m3 as
    measured: neither is noted as approximated. A per-head scale is the nearest dtype, noted."""
    def render(codec: dict) -> tuple[dict, tuple[str, ...]]:
        doc = dict(CASES["identity"], codec=codec)
        p = Pipeline.from_dict(doc)
        (_, r), = render_pipeline(p, ["vllm"])
        return yaml.safe_load(r.text), r.notes

    body, notes = render({"method": "fp8", "params": {"fmt": "e4m3", "scale": "token"}})
    assert body["kv-cache-dtype"] == "fp8_per_token_head" and body["attention-backend"] == "TRITON_ATTN"
    assert not any("codec" in n for n in notes)
    body, notes = render({"method": "fp8", "params": {"fmt": "e4m3", "scale": "tensor"}})
    assert body["kv-cache-dtype"] == "fp8_e4m3" and not any("codec" in n for n in notes)
    body, notes = render({"method": "fp8", "params": {"fmt": "e4m3", "scale": "head"}})
    assert body["kv-cache-dtype"] == "fp8_e4m3" and any("recommend --stack vllm" in n for n in notes)


def test_vllm_offload_targets_a_release_whose_native_offload_starts() -> None:
    """Issue 12: vLLM 0.11.1's native offload stops at startup ('num_cpu_blocks must be specified'); the export
    targets 0.33, whose option list has kv-offloading-size, and the 0.11.1 profile does not offer offload."""
    from kvtune.stacks import get_profile

    assert EXPORTERS["vllm"].version == "0.33.0"
    old = get_profile("vllm@0.11.1")
    assert old.methods("placement") == ("gpu",)
    assert any("num_cpu_blocks" in f["setting"] for f in old.get("facts"))


def test_sglang_rules() -> None:
    fp8 = _yaml("fp8_e5m2_prefix_off", "sglang", "sglang.yaml")
    assert fp8["kv-cache-dtype"] == "fp8_e5m2" and fp8["disable-radix-cache"] is True
    cpu = _yaml("snapkv_kivi_offload_cpu", "sglang", "sglang.yaml")
    # issue 12: hicache-size (GB) below the GPU pool aborts SGLang; a ratio > 1 of the GPU pool is written instead
    assert cpu["enable-hierarchical-cache"] is True and "hicache-size" not in cpu and cpu["hicache-ratio"] == 2.0
    assert cpu["page-size"] == 16
    unsized = _yaml("offload_cpu_unsized", "sglang", "sglang.yaml")
    assert unsized["hicache-ratio"] == 2.0 and "hicache-size" not in unsized
    assert _yaml("h2o_offload_disk", "sglang", "sglang.yaml")["hicache-storage-backend"] == "file"
    for case in CASES:  # never a ratio at or below 1 (host pool must exceed the GPU pool)
        body = yaml.safe_load(dict((r.filename, r.text) for _, r in render_pipeline(pipeline(case), ["sglang"]))["sglang.yaml"])
        assert body.get("hicache-ratio", 2.0) > 1.0 and "hicache-size" not in body


def test_sglang_page_size_divides_chunked_prefill() -> None:
    """Issue 12: page-size 48 fails SGLang's startup check (chunked-prefill sizes must divide by it)."""
    doc = dict(CASES["offload_cpu_unsized"], placement={"method": "offload", "params": {
        "tier": "cpu", "gpu_fraction": 0.5, "block_size": 48, "prefetch_depth": 1}})
    r, = EXPORTERS["sglang"].render(Pipeline.from_dict(doc))  # 48 is no offload block size kvtune searches
    page = yaml.safe_load(r.text)["page-size"]
    assert page == 32 and 8192 % page == 0 and any("page size 48" in n for n in r.notes)


def test_sglang_dtypes_are_the_targeted_releases() -> None:
    """Issue 12: the old list offered fp4_e2m1, which 0.5.4 lacks; the list is now read from the 0.5.23 wheel."""
    from kvtune.export._common import load_options

    choices = load_options(EXPORTERS["sglang"].module.OPTIONS)["keys"]["kv-cache-dtype"]["choices"]
    assert EXPORTERS["sglang"].version == "0.5.23" and "fp4_e2m1" not in choices
    assert {"fp8_e4m3", "fp8_e5m2"} <= set(choices)


def test_trtllm_rules() -> None:
    s = _yaml("streaming_tokens_int8", "trtllm", "trtllm.yaml")
    assert s["kv_cache_config"]["max_attention_window"] == [1024]
    # issue 12: sink_token_length does nothing on the PyTorch backend: not written, the export says it is a window
    assert "sink_token_length" not in s["kv_cache_config"]
    notes = dict((r.filename, r.notes) for _, r in render_pipeline(pipeline("streaming_tokens_int8"), ["trtllm"]))
    assert any("sinks=4 dropped" in n and "14275" in n for n in notes["trtllm.yaml"])
    assert s["max_batch_size"] == 80, "window of 1024 of 4096 tokens, KV in the model dtype"
    no_ctx = _yaml("streaming_fraction_no_context", "trtllm", "trtllm.yaml")
    assert "max_attention_window" not in no_ctx["kv_cache_config"]
    cpu = _yaml("snapkv_kivi_offload_cpu", "trtllm", "trtllm.yaml")
    assert cpu["kv_cache_config"]["host_cache_size"] == 8 * 2**30
    fp8 = _yaml("fp8_e4m3_measured", "trtllm", "trtllm.yaml")
    assert fp8["kv_cache_config"]["dtype"] == "fp8" and fp8["max_seq_len"] == 32768
    assert _yaml("fp8_e5m2_prefix_off", "trtllm", "trtllm.yaml")["kv_cache_config"]["enable_block_reuse"] is False


def test_trtllm_disk_tier_by_release() -> None:
    """Issue 12: 1.2.1 (stable) has no disk tier, the 1.3 rc line has disk_cache_size/disk_cache_path."""
    from kvtune.export._common import load_options
    from kvtune.stacks import get_profile

    assert EXPORTERS["trtllm"].version == "1.2.1"
    assert not get_profile("trtllm").get("disk_tier") and get_profile("trtllm@1.3").get("disk_tier")
    rc = load_options(get_profile("trtllm@1.3").options)["keys"]["kv_cache_config"]["keys"]
    assert {"disk_cache_size", "disk_cache_path"} <= set(rc)
    disk = dict((r.filename, r.notes) for _, r in render_pipeline(pipeline("h2o_offload_disk"), ["trtllm"]))
    assert any("disk_cache_size" in n for n in disk["trtllm.yaml"])


def test_lmcache_rules() -> None:
    cpu = _yaml("snapkv_kivi_offload_cpu", "lmcache", "lmcache.yaml")
    assert cpu == {"chunk_size": 16, "local_cpu": True, "max_local_cpu_size": 8.0}
    derived = _yaml("offload_cpu_derived_prefix_off", "lmcache", "lmcache.yaml")
    assert derived["max_local_cpu_size"] == pytest.approx(3.38)  # 16 seqs * 8192 tok * 36864 B * 0.75, in GiB
    companion = _yaml("offload_cpu_derived_prefix_off", "lmcache", "lmcache-vllm.yaml")
    assert companion["enable-prefix-caching"] is False and "kv-offloading-size" not in companion


def test_lmcache_disk_tier_always_has_a_size() -> None:
    """Issue 12: local_disk without max_local_disk_size (default 0) is no disk tier: never written alone."""
    unsized = _yaml("h2o_offload_disk", "lmcache", "lmcache.yaml")
    assert "local_disk" not in unsized and "max_local_disk_size" not in unsized
    doc = dict(CASES["h2o_offload_disk"])
    doc["placement"] = {"method": "offload", "params": dict(doc["placement"]["params"], host_bytes=64 * 2**30)}
    sized = dict((r.filename, r.text) for _, r in render_pipeline(Pipeline.from_dict(doc), ["lmcache"]))
    body = yaml.safe_load(sized["lmcache.yaml"])
    assert body["local_disk"] and body["max_local_disk_size"] == 64.0


def test_lmcache_pairs_a_vllm_it_installs_with() -> None:
    """Issue 12: LMCache 0.5.6 (transformers>=5.4) and vLLM 0.11.1 (transformers<5) cannot be installed together;
    the companion file targets the vLLM release the LMCache profile pairs, whose transformers range meets LMCache's."""
    from packaging.specifiers import SpecifierSet

    from kvtune.stacks import get_profile

    lm, vl = get_profile("lmcache"), get_profile("vllm")
    assert lm.get("paired_with") == {"stack": "vllm", "version": vl.version}
    both = SpecifierSet(lm.get("requires")["transformers"]) & SpecifierSet(vl.get("requires")["transformers"])
    assert any(v in both for v in ("5.16.1", "5.18.0", "5.20.2")), "some transformers satisfies both"
    old = SpecifierSet(lm.get("requires")["transformers"]) & SpecifierSet(get_profile("vllm@0.11.1").get("requires")["transformers"])
    assert not any(f"{a}.{b}.0" in old for a in (4, 5) for b in range(60)), "0.11.1 + LMCache 0.5.6: no transformers fits"
    text = dict((r.filename, r.text) for _, r in render_pipeline(pipeline("identity"), ["lmcache"]))["lmcache-vllm.yaml"]
    assert f"checked against vLLM {vl.version}" in text


def test_kvpress_rules() -> None:
    def press(case: str) -> str:
        text = dict((r.filename, r.text) for _, r in render_pipeline(pipeline(case), ["kvpress"]))["kvpress_press.py"]
        return next(line for line in text.splitlines() if line.startswith("press = "))

    assert press("snapkv_kivi_offload_cpu") == "press = SnapKVPress(compression_ratio=0.75, window_size=32, kernel_size=7)"
    assert press("streaming_tokens_int8") == "press = StreamingLLMPress(compression_ratio=0.75, n_sink=4)"
    assert press("ada_kv").startswith("press = AdaKVPress(press=SnapKVPress(compression_ratio=0.8")
    assert press("sliding_window_tokens") == "press = StreamingLLMPress(compression_ratio=0.75, n_sink=0)"
    assert press("random_seeded") == "press = RandomPress(compression_ratio=0.5, seed=0)"
    assert press("future_methods").startswith("press = None")


def test_kvpress_caches_are_ones_kvpress_runs() -> None:
    """Issue 12: 3 of 16 kvpress snippets failed: the fp8 cache needs transformers>=5.3 (kvpress 0.5.5 pins <5.3)
    and the hqq cache (int8) raises inside kvpress's pipeline. Only quanto (kivi) and offloading are written."""
    def text(case: str) -> tuple[str, tuple[str, ...]]:
        (_, r), = render_pipeline(pipeline(case), ["kvpress"])
        return r.text, r.notes

    for case in ("fp8_e4m3_measured", "fp8_e5m2_prefix_off", "streaming_tokens_int8"):
        body, notes = text(case)
        assert "cache = QuantizedCache" not in body and "cache = None" in body
        assert any("transformers>=4.56.0,<5.3" in n for n in notes), case
    body, _ = text("snapkv_kivi_offload_cpu")
    assert 'cache = QuantizedCache(backend="quanto"' in body
    assert "DynamicCache(config=pipe.model.config, offloading=True)" in text("offload_cpu_unsized")[0]
