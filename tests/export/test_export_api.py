"""export_pipeline / parse_targets contracts: determinism, atomic writes, no silent overwrite, notes."""

from __future__ import annotations

import os

import pytest
from export_cases import CASES, pipeline

from kvtune.errors import UserError
from kvtune.export import EXPORTERS, TARGETS, export_pipeline, parse_targets, render_pipeline


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
    assert off["no-enable-prefix-caching"] is True and "enable-prefix-caching" not in off
    assert off["kv-cache-dtype"] == "fp8_e5m2" and off["max-model-len"] == 8192
    cpu = _yaml("snapkv_kivi_offload_cpu", "vllm", "vllm.yaml")
    assert cpu["kv-offloading-backend"] == "native" and cpu["kv-offloading-size"] == 8.0
    assert "kv-cache-dtype" not in cpu, "kivi is not expressible: KV stays in the model dtype"
    assert cpu["max-num-seqs"] == 12, "eviction not realized: the full-cache capacity applies"
    disk = _yaml("h2o_offload_disk", "vllm", "vllm.yaml")
    assert "LMCacheConnectorV1" in disk["kv-transfer-config"] and "kv-offloading-size" not in disk
    measured = _yaml("fp8_e4m3_measured", "vllm", "vllm.yaml")
    assert measured["max-num-seqs"] == 24 and measured["model"] == "meta-llama/Llama-3.1-8B-Instruct"


def test_sglang_rules() -> None:
    fp8 = _yaml("fp8_e5m2_prefix_off", "sglang", "sglang.yaml")
    assert fp8["kv-cache-dtype"] == "fp8_e5m2" and fp8["disable-radix-cache"] is True
    cpu = _yaml("snapkv_kivi_offload_cpu", "sglang", "sglang.yaml")
    assert cpu["enable-hierarchical-cache"] is True and cpu["hicache-size"] == 9 and cpu["page-size"] == 16
    unsized = _yaml("offload_cpu_unsized", "sglang", "sglang.yaml")
    assert unsized["hicache-ratio"] == 2.0 and "hicache-size" not in unsized
    assert _yaml("h2o_offload_disk", "sglang", "sglang.yaml")["hicache-storage-backend"] == "file"


def test_trtllm_rules() -> None:
    s = _yaml("streaming_tokens_int8", "trtllm", "trtllm.yaml")
    assert s["kv_cache_config"]["max_attention_window"] == [1024]
    assert s["kv_cache_config"]["sink_token_length"] == 4
    assert s["max_batch_size"] == 80, "window of 1024 of 4096 tokens, KV in the model dtype"
    no_ctx = _yaml("streaming_fraction_no_context", "trtllm", "trtllm.yaml")
    assert "max_attention_window" not in no_ctx["kv_cache_config"]
    cpu = _yaml("snapkv_kivi_offload_cpu", "trtllm", "trtllm.yaml")
    assert cpu["kv_cache_config"]["host_cache_size"] == 8 * 2**30
    fp8 = _yaml("fp8_e4m3_measured", "trtllm", "trtllm.yaml")
    assert fp8["kv_cache_config"]["dtype"] == "fp8" and fp8["max_seq_len"] == 32768
    assert _yaml("fp8_e5m2_prefix_off", "trtllm", "trtllm.yaml")["kv_cache_config"]["enable_block_reuse"] is False


def test_lmcache_rules() -> None:
    cpu = _yaml("snapkv_kivi_offload_cpu", "lmcache", "lmcache.yaml")
    assert cpu == {"chunk_size": 16, "local_cpu": True, "max_local_cpu_size": 8.0}
    derived = _yaml("offload_cpu_derived_prefix_off", "lmcache", "lmcache.yaml")
    assert derived["max_local_cpu_size"] == pytest.approx(3.38)  # 16 seqs * 8192 tok * 36864 B * 0.75, in GiB
    companion = _yaml("offload_cpu_derived_prefix_off", "lmcache", "lmcache-vllm.yaml")
    assert companion["no-enable-prefix-caching"] is True and "kv-offloading-size" not in companion


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
