"""Every emitted option is one the stack knows: loaded with the stack's own package where it installs here
(transformers), otherwise checked against the option list recorded in kvtune/export/options/ with its version."""

from __future__ import annotations

import ast
import json

import pytest
import yaml
from export_cases import CASES, check_lmcache, check_value, pipeline

from kvtune.export import EXPORTERS, render_pipeline
from kvtune.export._common import load_options


def _files(target: str, case: str) -> dict[str, str]:
    return {r.filename: r.text for _, r in render_pipeline(pipeline(case), [target])}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("target", "filename"), [("vllm", "vllm.yaml"), ("lmcache", "lmcache-vllm.yaml"),
                                                  ("sglang", "sglang.yaml"), ("trtllm", "trtllm.yaml")])
def test_serving_keys_are_recorded_options(case: str, target: str, filename: str) -> None:
    module = EXPORTERS["vllm" if filename == "lmcache-vllm.yaml" else target].module
    options = load_options(module.OPTIONS)
    assert options["version"] == module.VERSION, "option list and module are pinned to the same version"
    body = yaml.safe_load(_files(target, case)[filename])
    assert isinstance(body, dict) and body
    problems = []
    for key, value in body.items():
        if key not in options["keys"]:
            problems.append(f"{key}: not a recorded {target} {module.VERSION} option")
        else:
            problems += check_value(key, value, options["keys"][key])
    assert problems == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_lmcache_keys_are_recorded_options(case: str) -> None:
    from kvtune.export import lmcache

    options = load_options(lmcache.OPTIONS)
    assert options["version"] == lmcache.VERSION
    body = yaml.safe_load(_files("lmcache", case)["lmcache.yaml"])
    assert check_lmcache(body, options["keys"]) == []


def test_option_checker_rejects_bad_values() -> None:
    """The checker the tests above rely on does fail on wrong names, choices, false flags and bad JSON."""
    vllm_keys = load_options("vllm-0.11.1.yaml")["keys"]
    assert check_value("kv-cache-dtype", "fp8_e4m3", vllm_keys["kv-cache-dtype"]) == []
    assert check_value("kv-cache-dtype", "int8", vllm_keys["kv-cache-dtype"])
    assert check_value("enable-prefix-caching", False, vllm_keys["enable-prefix-caching"])
    assert check_value("kv-transfer-config", "{'kv_connector': 1}", vllm_keys["kv-transfer-config"])
    trt = load_options("trtllm-1.3.0rc27.yaml")["keys"]["kv_cache_config"]
    assert check_value("kv_cache_config", {"tokens_per_block": 48}, trt)
    assert check_value("kv_cache_config", {"bogus": 1}, trt)
    lm = load_options("lmcache-0.5.6.yaml")["keys"]
    assert check_lmcache({"chunk_size": "big"}, lm) and check_lmcache({"nope": 1}, lm)


# -- transformers: installed, so the fragment is loaded by transformers itself --------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_fragment_loads_in_transformers(case: str, tmp_path) -> None:
    from transformers import GenerationConfig

    files = _files("hf", case)
    fragment = json.loads(files["hf_generation_config.json"])
    (tmp_path / "hf_generation_config.json").write_text(files["hf_generation_config.json"])
    config = GenerationConfig.from_pretrained(tmp_path, config_file_name="hf_generation_config.json")
    config.validate(strict=True)
    assert config.cache_implementation == fragment["cache_implementation"]
    assert config.cache_config == fragment.get("cache_config")
    ast.parse(files["hf_kvtune.py"])  # the snippet is valid Python


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_quantized_cache_config_matches_transformers(case: str) -> None:
    """cache_config keys are QuantizedCache's arguments; the fp8 backend (no extra package) is really built."""
    import inspect

    from transformers import LlamaConfig, QuantizedCache

    fragment = json.loads(_files("hf", case)["hf_generation_config.json"])
    if fragment["cache_implementation"] != "quantized":
        assert "cache_config" not in fragment
        return
    cfg = dict(fragment["cache_config"])
    accepted = set(inspect.signature(QuantizedCache.__init__).parameters) - {"self", "config"}
    assert set(cfg) <= accepted
    if cfg["backend"] == "fp8":
        tiny = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                           intermediate_size=64, vocab_size=128)
        cache = QuantizedCache(config=tiny, **cfg)
        assert len(cache.layers) == 2


# -- kvpress: pins transformers<5.3, so its classes are checked against the recorded list ------------------------


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_kvpress_snippet_uses_recorded_presses(case: str) -> None:
    from kvtune.export import kvpress

    options = load_options(kvpress.OPTIONS)
    assert options["version"] == kvpress.VERSION
    presses = options["presses"]
    tree = ast.parse(_files("kvpress", case)["kvpress_press.py"])
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "kvpress":
            problems += [f"import {a.name}: not a kvpress export" for a in node.names if a.name not in presses]
    for call in _calls(tree):
        name = getattr(call.func, "id", None)
        if not name or not name.endswith("Press"):
            continue
        if name not in presses:
            problems.append(f"{name}: not a kvpress {kvpress.VERSION} press")
            continue
        fields = presses[name]
        problems += [f"{name}({kw.arg}=...): no such field" for kw in call.keywords if kw.arg not in fields]
        required = {k for k, v in fields.items() if v["default"] == "<required>"}
        problems += [f"{name}: missing required {r}" for r in required - {kw.arg for kw in call.keywords}]
        if "compression_ratio" in fields:
            ratio = [kw.value for kw in call.keywords if kw.arg == "compression_ratio"]
            if ratio:
                value = ast.literal_eval(ratio[0])
                problems += [] if 0.0 <= value < 1.0 else [f"{name}: compression_ratio {value} outside [0, 1)"]
        if call.args:
            problems.append(f"{name}: positional arguments (kvpress presses are dataclasses: use keywords)")
    # pipeline call keywords are the ones the kvpress pipeline accepts
    for call in _calls(tree):
        if getattr(call.func, "id", None) == "pipe":
            problems += [f"pipe({kw.arg}=...)" for kw in call.keywords if kw.arg not in options["pipeline_call_kwargs"]]
        if getattr(call.func, "id", None) == "pipeline":
            assert ast.literal_eval(call.args[0]) == options["pipeline_task"]
    assert problems == []


# -- the hf snippet's kvtune path runs against kvtune's runtime -------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_snippet_runs_with_kvtune_runtime(case: str) -> None:
    """Execute hf_kvtune.py's definitions and drive its cache through generate() on a tiny random Llama."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvtune.export import hf

    text = _files("hf", case)["hf_kvtune.py"]
    assert f"return {hf.RUNTIME_CALL}" in text
    namespace: dict = {"__name__": "hf_kvtune"}
    exec(compile(text, "hf_kvtune.py", "exec"), namespace)
    namespace["register_attention"]()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=64, vocab_size=128, head_dim=16)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("kvtune")
    cache = namespace["build_cache"](model)  # the snippet's own function
    assert cache is not None
    ids = torch.randint(0, 128, (1, 40))
    out = model.generate(input_ids=ids, cache=cache, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 43)
    assert cache.get_seq_length() == 42


def test_hf_snippet_reports_a_method_kvtune_cannot_build(capsys) -> None:
    """Issue 12: hf_kvtune.py crashed for methods the installed kvtune does not know; it now says so and skips the
    kvtune step (transformers' own settings still run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvtune.pipeline import Stage

    namespace: dict = {"__name__": "hf_kvtune"}
    exec(compile(_files("hf", "identity")["hf_kvtune.py"], "hf_kvtune.py", "exec"), namespace)
    namespace["PIPELINE"] = namespace["PIPELINE"].model_copy(
        update={"selection": Stage(method="not_installed_here", params={})})
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=64, vocab_size=128, head_dim=16)
    assert namespace["build_cache"](LlamaForCausalLM(config)) is None
    err = capsys.readouterr().err
    assert "kvtune cannot run this pipeline here" in err and "not_installed_here" in err and "Traceback" not in err
