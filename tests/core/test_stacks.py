"""Stack profiles (kvtune/stacks.py, profiles/stacks/*.yaml): loading, the narrowed search space with the stack's
numerics, the nearest supported pipeline, and the crosswalk of docs/exports.md generated from them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvtune.errors import UserError
from kvtune.export import EXPORTERS
from kvtune.export._common import load_options
from kvtune.pipeline import Pipeline, Stage, validate_pipeline
from kvtune.scenarios import SCENARIOS, get_scenario
from kvtune.search import suggest_pipeline
from kvtune.stacks import STACKS, crosswalk_markdown, get_profile, narrow, nearest, versions
from kvtune.strategies import AXES, NONE

ROOT = Path(__file__).resolve().parents[2]


def _pipeline(selection=("none", {}), codec=("fp16", {}), placement=("gpu", {})) -> Pipeline:
    return Pipeline(selection=Stage(method=selection[0], params=selection[1]),
                    codec=Stage(method=codec[0], params=codec[1]), placement=Stage(method=placement[0], params=placement[1]))


@pytest.mark.parametrize("stack", STACKS)
def test_every_version_is_consistent_with_its_option_list_and_the_registry(stack: str) -> None:
    for version in versions(stack):
        profile = get_profile(f"{stack}@{version}")
        assert profile.source and profile.get("facts"), "every version says where its facts come from"
        for fact in profile.get("facts"):
            assert fact["source"], fact
        if profile.options:
            options = load_options(profile.options)
            assert str(options["version"]) == version
            dtype_key = {"vllm": "kv-cache-dtype", "sglang": "kv-cache-dtype"}.get(stack)
            for entry in profile.get("kv_dtypes") or ():
                if dtype_key:  # every KV dtype the export may write is a choice of the real option
                    assert entry["value"] in options["keys"][dtype_key]["choices"], entry
                if entry.get("attention_backend"):
                    assert entry["value"] in options["attention_backends_kv_dtype"][entry["attention_backend"]]
        if profile.runs_everything():
            continue
        for axis in ("selection", "codec", "placement"):
            for method in profile.methods(axis):
                if method == NONE:
                    continue
                assert method in AXES[axis], f"{stack}@{version}: {axis} {method} is not a kvtune method"
                for variant in profile.variants(axis, method):
                    AXES[axis][method](**variant)  # the stack's numerics are valid parameters of the strategy


def test_exporters_target_the_profiles_default_versions() -> None:
    for stack in STACKS:
        assert EXPORTERS[stack].version == get_profile(stack).version
        assert EXPORTERS[stack].module.OPTIONS == get_profile(stack).options


def test_versions_and_errors() -> None:
    assert get_profile("vllm").version == "0.33.0"
    assert get_profile("vllm@0.11").version == "0.11.1" and get_profile("VLLM@0.33.0").version == "0.33.0"
    assert get_profile("trtllm@1.3").version == "1.3.0rc27"
    with pytest.raises(UserError, match=r"no profile of vLLM 0\.9 \(known: 0\.33\.0, 0\.11\.1\)"):
        get_profile("vllm@0.9")
    with pytest.raises(UserError, match="unknown stack"):
        get_profile("ollama")


def test_narrow_keeps_what_the_stack_runs() -> None:
    dc = narrow(get_scenario("datacenter"), get_profile("vllm"))
    assert (dc.selection, dc.codecs, dc.placements) == (("none",), ("fp16", "fp8", "int8"), ("gpu",))
    assert narrow(get_scenario("datacenter"), get_profile("vllm@0.11")).codecs == ("fp16", "fp8"), \
        "int8_per_token_head arrives in 0.33"
    trt = narrow(get_scenario("datacenter"), get_profile("trtllm"))
    assert trt.selection == ("none", "sliding_window"), "no streaming_llm: the PyTorch backend ignores the sinks"
    assert narrow(get_scenario("long-context"), get_profile("hf")).selection == get_scenario("long-context").selection
    lossy_only = dataclasses.replace(get_scenario("datacenter"), codecs=("kivi",))
    with pytest.raises(UserError, match="--stack vllm@0.33.0: scenario datacenter allows no codec method"):
        narrow(lossy_only, get_profile("vllm"))
    for name in SCENARIOS:  # every built-in scenario can be searched on every stack
        for stack in STACKS:
            narrow(get_scenario(name), get_profile(stack))


@pytest.mark.parametrize("spec", ["vllm", "vllm@0.11", "sglang", "trtllm", "lmcache", "kvpress"])
def test_search_suggests_only_what_the_stack_runs_with_its_numerics(spec: str) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    profile = get_profile(spec)
    scenario = narrow(get_scenario("long-context"), profile)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(25):
        p = suggest_pipeline(study.ask(), scenario)
        validate_pipeline(p)
        for axis in ("selection", "codec", "placement"):
            assert profile.runs(getattr(p, axis), axis), (spec, p.label())
        seen.add(p.codec.label())
    if "fp8" in (profile.methods("codec") or ()):
        fp8 = {s for s in seen if s.startswith("fp8")}
        assert fp8 and all("scale=tensor" in s or "scale=token" in s for s in fp8), seen
    if "int8" in (profile.methods("codec") or ()):  # vLLM 0.33: only int8_per_token_head's numerics
        assert {s for s in seen if s.startswith("int8")} == {"int8(group_size=128,symmetric=True)"}, seen
    else:
        assert not any(s.startswith("int8") for s in seen), seen


def test_nearest_is_what_the_export_runs() -> None:
    p = _pipeline(("streaming_llm", {"budget": 0.5, "sinks": 4}), ("fp8", {"fmt": "e5m2", "scale": "head"}),
                  ("offload", {"tier": "cpu", "gpu_fraction": 0.5, "block_size": 32, "prefetch_depth": 1}))
    near, changes = nearest(p, get_profile("vllm"))
    assert near.label() == "none + fp8(fmt=e5m2,scale=tensor) @ gpu" and len(changes) == 3
    near, _ = nearest(p, get_profile("trtllm"))
    assert near.label() == "sliding_window(budget=0.5) + fp8(fmt=e4m3,scale=tensor) @ gpu"
    near, _ = nearest(p, get_profile("kvpress"))
    assert near.label() == "streaming_llm(budget=0.5,sinks=4) + fp16 @ gpu"
    assert nearest(p, get_profile("hf")) [1] == []
    exact = _pipeline(codec=("fp8", {"fmt": "e4m3", "scale": "token"}))
    assert nearest(exact, get_profile("vllm"))[1] == []
    assert nearest(exact, get_profile("vllm@0.11"))[0].codec.params == {"fmt": "e4m3", "scale": "tensor"}
    asym = _pipeline(codec=("int8", {"group_size": 64}))  # vLLM 0.33 has no zero point: the symmetric variant
    near, changes = nearest(asym, get_profile("vllm"))
    assert near.codec.label() == "int8(group_size=128,symmetric=True)"
    assert changes == ["codec int8(group_size=64) -> int8(group_size=128,symmetric=True)"]
    assert nearest(asym, get_profile("vllm@0.11"))[0].codec.label() == "fp16"
    assert nearest(asym, get_profile("sglang"))[0].codec.label() == "fp16"


def test_docs_crosswalk_is_generated_from_the_profiles() -> None:
    page = (ROOT / "docs" / "exports.md").read_text(encoding="utf-8")
    assert crosswalk_markdown() in page, "regenerate the crosswalk: python -c 'from kvtune.stacks import " \
                                         "crosswalk_markdown; print(crosswalk_markdown())'"
    for stack in STACKS:
        assert get_profile(stack).version in page
