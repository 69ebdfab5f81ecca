"""Exports loaded by the stacks' own config-file parsers (issue 12), where their source is on this machine.

vLLM and SGLang do not install here (CUDA builds), but their config-file loaders are plain Python: vLLM's
``FlexibleArgumentParser`` (vllm/utils/argparse_utils.py, ``--config`` -> ``load_config_file``) and SGLang's
``ConfigArgumentMerger`` (sglang/srt/utils/server_args_config_parser.py). The test runs those files, read from the
release archives ``scripts/refresh-stack-options.py`` downloads (``~/.cache/kvtune-stack-sources`` or
``$KVTUNE_STACK_SOURCES``), on a parser declaring the recorded options with the argument kinds the stack uses
(booleans as ``--x/--no-x`` in vLLM, ``store_true`` in SGLang), and checks every exported value arrives unchanged.
Without the archives the test skips and says how to get them.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest
import yaml
from export_cases import CASES, pipeline

from kvtune.export import EXPORTERS, render_pipeline
from kvtune.export._common import load_options

SOURCES = Path(os.environ.get("KVTUNE_STACK_SOURCES", Path.home() / ".cache" / "kvtune-stack-sources"))


@functools.lru_cache(maxsize=None)  # a 47 MB sdist is scanned once per session, not once per case
def _read(pattern: str, member: str) -> str:
    found = sorted(SOURCES.glob(pattern))
    if not found:
        pytest.skip(f"needs {pattern} in {SOURCES}: run scripts/refresh-stack-options.py")
    path = found[0]
    if path.suffix == ".whl":
        return zipfile.ZipFile(path).read(member).decode()
    with tarfile.open(path) as tar:
        top = tar.getnames()[0].split("/")[0]
        f = tar.extractfile(f"{top}/{member}")
        assert f is not None
        return f.read().decode()


def _load(name: str, source: str, stubs: dict[str, types.ModuleType]) -> dict:
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        namespace: dict = {"__name__": name}
        exec(compile(source, name, "exec"), namespace)
        return namespace
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _typed(spec: dict) -> dict:
    kind = spec["type"]
    kwargs: dict = {}
    if kind in ("int", "float"):
        kwargs["type"] = int if kind == "int" else float
    elif kind == "json":
        kwargs["type"] = json.loads
    if spec.get("choices"):
        kwargs["choices"] = spec["choices"]
    return kwargs


def _written(target: str, case: str, filename: str, tmp_path: Path) -> tuple[Path, dict]:
    text = {r.filename: r.text for _, r in render_pipeline(pipeline(case), [target])}[filename]
    path = tmp_path / filename
    path.write_text(text)
    return path, yaml.safe_load(text)


def parse_with_vllm(path: Path) -> dict:
    """``vllm serve --config path`` through vLLM's own ``FlexibleArgumentParser`` (read from the release sdist) on a
    parser declaring the recorded options: the parsed arguments (skips without the sdist)."""
    exp = EXPORTERS["vllm"]
    source = _read(f"vllm-{exp.version}.tar.gz", "vllm/utils/argparse_utils.py")
    logger_mod = types.ModuleType("vllm.logger")
    logger_mod.init_logger = logging.getLogger  # type: ignore[attr-defined]
    regex_mod = sys.modules.get("regex") or re
    ns = _load("vllm.utils.argparse_utils", source, {"vllm": types.ModuleType("vllm"), "vllm.logger": logger_mod,
                                                      "regex": regex_mod})
    parser = ns["FlexibleArgumentParser"]()
    for key, spec in load_options(exp.module.OPTIONS)["keys"].items():
        if spec["type"] == "bool":
            parser.add_argument(f"--{key}", action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(f"--{key}", **_typed(spec))
    return vars(parser.parse_args(["--config", str(path)]))


def parse_with_sglang(path: Path) -> dict:
    """``sglang.launch_server --config path`` through SGLang's own ``ConfigArgumentMerger`` (read from the release
    wheel) on a parser declaring the recorded options: the parsed arguments (skips without the wheel)."""
    exp = EXPORTERS["sglang"]
    source = _read(f"sglang-{exp.version}-*.whl", "sglang/srt/utils/server_args_config_parser.py")
    ns = _load("sglang.srt.utils.server_args_config_parser", source, {})
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    for key, spec in load_options(exp.module.OPTIONS)["keys"].items():
        if spec["type"] == "bool":
            parser.add_argument(f"--{key}", action="store_true")
        else:
            parser.add_argument(f"--{key}", **_typed(spec))
    merged = ns["ConfigArgumentMerger"](parser=parser).merge_config_with_args(["--config", str(path)])
    return vars(parser.parse_args(merged))


@pytest.mark.parametrize("case", sorted(CASES))
def test_vllm_config_loads_with_vllms_parser(case: str, tmp_path: Path) -> None:
    path, body = _written("vllm", case, "vllm.yaml", tmp_path)
    args = parse_with_vllm(path)
    for key, value in body.items():
        assert args[key.replace("-", "_")] == value, key


@pytest.mark.parametrize("case", sorted(CASES))
def test_sglang_config_loads_with_sglangs_parser(case: str, tmp_path: Path) -> None:
    path, body = _written("sglang", case, "sglang.yaml", tmp_path)
    args = parse_with_sglang(path)
    for key, value in body.items():
        assert args[key.replace("-", "_")] == value, key


def parse_with_lmcache(path: Path):
    """``LMCACHE_CONFIG_FILE=path``: LMCache's own ``LMCacheEngineConfig.from_file`` and ``validate`` (lmcache/v1/
    config.py and config_base.py of the release wheel; they import only PyYAML, requests and lmcache.logging, so
    they run here under an empty ``lmcache`` package, without the CUDA parts its ``__init__`` pulls in)."""
    exp = EXPORTERS["lmcache"]
    wheel = f"lmcache-{exp.version}-*.whl"
    pkg, v1 = types.ModuleType("lmcache"), types.ModuleType("lmcache.v1")
    pkg.__path__, v1.__path__ = [], []  # type: ignore[attr-defined]
    stubs: dict[str, types.ModuleType] = {"lmcache": pkg, "lmcache.v1": v1}
    for name, member in (("lmcache.logging", "lmcache/logging.py"), ("lmcache.v1.config_base", "lmcache/v1/config_base.py"),
                         ("lmcache.v1.config", "lmcache/v1/config.py")):
        module = types.ModuleType(name)
        module.__dict__.update(_load(name, _read(wheel, member), stubs))
        stubs[name] = module
    config = stubs["lmcache.v1.config"].LMCacheEngineConfig.from_file(str(path))
    config.validate()
    return config


@pytest.mark.parametrize("case", sorted(CASES))
def test_lmcache_config_loads_with_lmcaches_loader(case: str, tmp_path: Path) -> None:
    path, body = _written("lmcache", case, "lmcache.yaml", tmp_path)
    config = parse_with_lmcache(path)
    assert config._user_set_keys == set(body), "every key is LMCache's own name (no alias, nothing deprecated)"
    for key, value in body.items():  # LMCache strips file:// from local_disk (config_base._parse_local_disk)
        assert getattr(config, key) == (value.removeprefix("file://") if key == "local_disk" else value), key
