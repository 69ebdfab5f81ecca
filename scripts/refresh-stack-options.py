#!/usr/bin/env python3
"""Refresh the recorded option lists of the serving stacks (kvtune/export/options/<stack>-<version>.yaml).

One command per refresh: for each stack, download the release named by its stack profile (profiles/stacks/<stack>.yaml,
``default`` version) from PyPI with no dependencies and nothing built or installed (the sdist, or the wheel when the
sdist is missing or useless), verify its sha256 against the index, and read the option names, choices, types and
defaults from the package's own source with ``ast`` (nothing of the package is imported or executed):

  vllm     sdist   vllm/config/{cache,model,scheduler,kv_transfer}.py fields and Literal aliases, the attention
                   backends' ``supported_kv_cache_dtypes`` (vllm/v1/attention/backends/*.py)
  sglang   wheel   sglang/srt/arg_groups/fields/*.py (``A[type, Arg(choices=...)]`` fields); the wheel is ~40 MB,
                   only these files are read
  lmcache  wheel   lmcache/v1/config.py ``_CONFIG_DEFINITIONS``
  kvpress  wheel   kvpress/presses/*.py dataclass fields (inherited ones included) of the classes kvpress exports
  trtllm   --      PyPI holds only a 10 KB stub sdist (the wheels are on NVIDIA's index): pass ``--trtllm-source
                   llm_args.py`` (tensorrt_llm/llmapi/llm_args.py of the release) to refresh it, else the recorded
                   list is kept and the script says so

Usage:
  .venv/bin/python scripts/refresh-stack-options.py            # rewrite the lists
  .venv/bin/python scripts/refresh-stack-options.py --check    # exit 1 if a committed list differs
  options: --stack NAME (repeatable), --cache DIR (downloads, default ~/.cache/kvtune-stack-sources)
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ROOT / "kvtune" / "export" / "options"
PROFILES = ROOT / "profiles" / "stacks"
INDEX = "https://pypi.org/simple/{name}/"


# -- download -------------------------------------------------------------------------------------------------


def pypi_file(name: str, version: str, prefer: Callable[[str], bool], cache: Path) -> Path:
    """Download (once) the file of ``name==version`` that ``prefer`` picks from the PyPI simple index (JSON form),
    checked against the index's sha256."""
    req = urllib.request.Request(INDEX.format(name=name), headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        files = json.load(resp)["files"]
    norm = name.replace("-", "_")
    mine = [f for f in files if f["filename"].startswith((f"{name}-{version}", f"{norm}-{version}"))
            and (f["filename"].endswith(".tar.gz") or f["filename"].endswith(".whl"))
            and f["filename"].split("-")[1].removesuffix(".tar.gz") == version]
    picked = [f for f in mine if prefer(f["filename"])]
    if not picked:
        raise SystemExit(f"{name} {version}: no file on PyPI matches (have: {', '.join(f['filename'] for f in mine)})")
    f = picked[0]
    path = cache / f["filename"]
    if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != f["hashes"]["sha256"]:
        cache.mkdir(parents=True, exist_ok=True)
        print(f"downloading {f['filename']} ({f['size'] / 1e6:.1f} MB)", file=sys.stderr)
        with urllib.request.urlopen(f["url"], timeout=600) as resp:
            data = resp.read()
        if hashlib.sha256(data).hexdigest() != f["hashes"]["sha256"]:
            raise SystemExit(f"{f['filename']}: sha256 does not match the index")
        path.write_bytes(data)
    return path


class Archive:
    """Read members of an sdist (tar.gz, one top folder) or a wheel (zip) by their path inside the package."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.suffix == ".whl":
            self._zip = zipfile.ZipFile(path)
            self._names = {n: n for n in self._zip.namelist()}
        else:
            self._tar = tarfile.open(path)
            self._names = {m.split("/", 1)[1]: m for m in self._tar.getnames() if "/" in m}

    def read(self, name: str) -> str:
        real = self._names[name]
        if self.path.suffix == ".whl":
            return self._zip.read(real).decode()
        member = self._tar.extractfile(real)
        assert member is not None
        return member.read().decode()

    def glob(self, prefix: str, suffix: str = ".py") -> list[str]:
        return sorted(n for n in self._names if n.startswith(prefix) and n.endswith(suffix) and "/" not in n[len(prefix):])


# -- ast helpers ----------------------------------------------------------------------------------------------


def literal_aliases(tree: ast.Module) -> dict[str, list[Any]]:
    """``Name = Literal["a", "b"]`` module-level aliases -> their values."""
    out: dict[str, list[Any]] = {}
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        target = (node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None))
        if (isinstance(target, ast.Name) and isinstance(value, ast.Subscript)
                and getattr(value.value, "id", None) == "Literal"):
            elts = value.slice.elts if isinstance(value.slice, ast.Tuple) else [value.slice]
            values: list[Any] = []
            for e in elts:  # constants, or names of aliases defined above (Literal[KVProducer, KVConsumer])
                if isinstance(e, ast.Constant):
                    values.append(e.value)
                elif isinstance(e, ast.Name) and e.id in out:
                    values += out[e.id]
                else:
                    break
            else:
                out[target.id] = list(dict.fromkeys(values))
    return out


def class_fields(tree: ast.Module, name: str) -> dict[str, tuple[str, ast.expr | None]]:
    """Annotated fields of class ``name``: field -> (annotation text, default expression)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return {s.target.id: (ast.unparse(s.annotation), s.value) for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise SystemExit(f"class {name} not found")


def call_kwargs(expr: ast.expr | None) -> dict[str, Any]:
    """Literal keyword arguments of a call expression (``Field(default=1, ge=0)``), non-literals left out."""
    out: dict[str, Any] = {}
    if isinstance(expr, ast.Call):
        for kw in expr.keywords:
            try:
                out[kw.arg] = ast.literal_eval(kw.value)
            except ValueError:
                pass
    return out


def spec_of(annotation: str, default: ast.expr | None, aliases: dict[str, list[Any]]) -> dict[str, Any]:
    """An option spec from a field: ``type`` (str/int/float/bool/list_int/json), ``choices`` from a Literal alias,
    ``min``/``max`` from pydantic ``Field(ge/gt/le/lt)``."""
    spec: dict[str, Any] = {}
    parts = [p.strip() for p in annotation.replace("Optional[", "").replace("]", "").split("|")]
    for alias, values in aliases.items():
        if alias in parts:
            spec["type"], spec["choices"] = "str", values
            break
    else:
        if annotation.startswith("Literal["):
            spec["type"] = "str"
            spec["choices"] = [ast.literal_eval(e) for e in ast.parse(annotation, mode="eval").body.slice.elts]
        else:
            base = next((p for p in parts if p != "None"), "str")
            spec["type"] = {"int": "int", "float": "float", "bool": "bool", "str": "str"}.get(base, "json")
    kw = call_kwargs(default)
    for key, bound in (("ge", "min"), ("gt", "min_exclusive"), ("le", "max"), ("lt", "max_exclusive")):
        if key in kw:
            spec[bound] = kw[key]
    return spec


def dump(path: Path, header: list[str], body: dict[str, Any]) -> str:
    text = "".join(f"# {line}".rstrip() + "\n" for line in header)
    return text + yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=120)


# -- per stack ------------------------------------------------------------------------------------------------

# the `vllm serve` options kvtune's export may write: option -> (file, class, field)
VLLM_KEYS = {
    "model": ("vllm/config/model.py", "ModelConfig", "model"),
    "kv-cache-dtype": ("vllm/config/cache.py", "CacheConfig", "cache_dtype"),
    "block-size": ("vllm/config/cache.py", "CacheConfig", "block_size"),
    "gpu-memory-utilization": ("vllm/config/cache.py", "CacheConfig", "gpu_memory_utilization"),
    "enable-prefix-caching": ("vllm/config/cache.py", "CacheConfig", "enable_prefix_caching"),
    "kv-offloading-size": ("vllm/config/cache.py", "CacheConfig", "kv_offloading_size"),
    "kv-offloading-backend": ("vllm/config/cache.py", "CacheConfig", "kv_offloading_backend"),
    "max-model-len": ("vllm/config/model.py", "ModelConfig", "max_model_len"),
    "max-num-seqs": ("vllm/config/scheduler.py", "SchedulerConfig", "max_num_seqs"),
}
VLLM_BACKENDS = {"FLASH_ATTN": "flash_attn.py", "FLASHINFER": "flashinfer.py", "TRITON_ATTN": "triton_attn.py",
                 "FLEX_ATTENTION": "flex_attention.py"}


def refresh_vllm(version: str, cache: Path, **_: Any) -> tuple[str, dict[str, Any], list[str]]:
    arc = Archive(pypi_file("vllm", version, lambda f: f.endswith(".tar.gz"), cache))
    trees: dict[str, ast.Module] = {}
    keys: dict[str, Any] = {}
    for option, (file, cls, field) in VLLM_KEYS.items():
        tree = trees.setdefault(file, ast.parse(arc.read(file)))
        annotation, default = class_fields(tree, cls)[field]
        spec = spec_of(annotation, default, literal_aliases(tree))
        if option == "model":
            spec = {"type": "str"}
        keys[option] = spec
    kt = ast.parse(arc.read("vllm/config/kv_transfer.py"))
    roles = literal_aliases(kt).get("KVRole") or []
    keys["kv-transfer-config"] = {"type": "json", "required_fields": ["kv_connector", "kv_role"], "kv_role": roles}
    backends: dict[str, list[str]] = {}
    for name, file in VLLM_BACKENDS.items():
        tree = ast.parse(arc.read(f"vllm/v1/attention/backends/{file}"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and node.target.id == "supported_kv_cache_dtypes"):
                backends[name] = ast.literal_eval(node.value)
                break
    keys["attention-backend"] = {"type": "str", "choices": sorted(backends)}
    header = [f"Options of `vllm serve` that kvtune's vLLM export may write, as vLLM {version} defines them.",
              f"Generated by scripts/refresh-stack-options.py from {arc.path.name} (PyPI sdist):",
              "vllm/config/{cache,model,scheduler,kv_transfer}.py (fields, Literal aliases, pydantic bounds) and the",
              "supported_kv_cache_dtypes of vllm/v1/attention/backends/{flash_attn,flashinfer,triton_attn,flex_attention}.py.",
              "Config file (vllm/utils/argparse_utils.py load_config_file): a `false` boolean becomes --no-KEY, a map a JSON",
              "argument. attention-backend lists the backends recorded here (the enum holds more)."]
    body = {"stack": "vllm", "version": version, "keys": keys, "attention_backends_kv_dtype": backends}
    return f"vllm-{version}.yaml", body, header


SGLANG_KEYS = ("model_path", "kv_cache_dtype", "page_size", "mem_fraction_static", "context_length",
               "max_running_requests", "disable_radix_cache", "enable_hierarchical_cache", "hicache_ratio",
               "hicache_size", "hicache_write_policy", "hicache_io_backend", "hicache_mem_layout",
               "hicache_storage_backend", "hicache_storage_prefetch_policy")


def refresh_sglang(version: str, cache: Path, **_: Any) -> tuple[str, dict[str, Any], list[str]]:
    arc = Archive(pypi_file("sglang", version, lambda f: "cp311" in f and "x86_64" in f, cache))
    found: dict[str, dict[str, Any]] = {}
    files = arc.glob("sglang/srt/arg_groups/fields/")
    for file in files:
        tree = ast.parse(arc.read(file))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(node.annotation, ast.Subscript) and getattr(node.annotation.value, "id", "") == "A"):
                continue
            elts = node.annotation.slice.elts if isinstance(node.annotation.slice, ast.Tuple) else []
            if not elts:
                continue
            base = ast.unparse(elts[0]).replace("Optional[", "").replace("]", "")
            spec: dict[str, Any] = {"type": {"int": "int", "float": "float", "bool": "bool"}.get(base, "str")}
            for extra in elts[1:]:
                kw = call_kwargs(extra)
                if "choices" in kw:
                    spec["choices"] = kw["choices"]
            try:
                default = ast.literal_eval(node.value) if node.value is not None else None
            except ValueError:
                default = None
            spec["default"] = default
            found[node.target.id] = spec
    missing = [k for k in SGLANG_KEYS if k not in found]
    if missing:
        raise SystemExit(f"sglang {version}: fields not found: {', '.join(missing)}")
    keys = {k.replace("_", "-"): found[k] for k in SGLANG_KEYS}
    header = [f"Options of `python -m sglang.launch_server` that kvtune's SGLang export may write, as SGLang {version}",
              f"defines them. Generated by scripts/refresh-stack-options.py from {arc.path.name} (PyPI):",
              "sglang/srt/arg_groups/fields/*.py (A[type, Arg(choices=...)] fields and their defaults).",
              "Config file (sglang/srt/utils/server_args_config_parser.py): keys are long flag names, dashes or",
              "underscores; store_true flags take true (false is skipped)."]
    return f"sglang-{version}.yaml", {"stack": "sglang", "version": version, "keys": keys}, header


def refresh_lmcache(version: str, cache: Path, **_: Any) -> tuple[str, dict[str, Any], list[str]]:
    arc = Archive(pypi_file("lmcache", version, lambda f: "cp311" in f and "x86_64" in f, cache))
    tree = ast.parse(arc.read("lmcache/v1/config.py"))
    keys: dict[str, Any] = {}
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "_CONFIG_DEFINITIONS" and isinstance(node.value, ast.Dict):
            for k, v in zip(node.value.keys, node.value.values):
                entry = dict(zip([ast.literal_eval(x) for x in v.keys], v.values))  # type: ignore[union-attr]
                try:
                    default = ast.literal_eval(entry["default"])
                except ValueError:
                    default = ast.unparse(entry["default"])
                keys[ast.literal_eval(k)] = {"type": ast.unparse(entry["type"]), "default": default}
    if not keys:
        raise SystemExit(f"lmcache {version}: _CONFIG_DEFINITIONS not found")
    header = [f"Configuration keys of LMCache {version} (lmcache/v1/config.py, _CONFIG_DEFINITIONS): declared type and",
              f"default. Generated by scripts/refresh-stack-options.py from {arc.path.name} (PyPI; not installed:",
              "it needs CUDA builds of torch). Sizes (max_local_cpu_size, max_local_disk_size) are GiB per worker;",
              "local_disk is a path or file:// URL, and a disk tier needs max_local_disk_size > 0."]
    return f"lmcache-{version}.yaml", {"stack": "lmcache", "version": version, "keys": keys}, header


def refresh_kvpress(version: str, cache: Path, **_: Any) -> tuple[str, dict[str, Any], list[str]]:
    arc = Archive(pypi_file("kvpress", version, lambda f: f.endswith(".whl"), cache))
    classes: dict[str, tuple[list[str], dict[str, dict[str, Any]]]] = {}
    for file in arc.glob("kvpress/presses/"):
        for node in ast.parse(arc.read(file)).body:
            if isinstance(node, ast.ClassDef):
                fields: dict[str, dict[str, Any]] = {}
                for s in node.body:
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and "ClassVar" not in ast.unparse(s.annotation):
                        if s.value is None:
                            default: Any = "<required>"
                        elif isinstance(s.value, ast.Call) and getattr(s.value.func, "id", "") == "field":
                            kw = call_kwargs(s.value)
                            if kw.get("init") is False:
                                continue
                            names = [k.arg for k in s.value.keywords]
                            default = (kw.get("default") if "default" in names
                                       else "<factory>" if "default_factory" in names else "<required>")
                        else:
                            try:
                                default = ast.literal_eval(s.value)
                            except ValueError:
                                default = ast.unparse(s.value)
                        fields[s.target.id] = {"type": ast.unparse(s.annotation), "default": default}
                classes[node.name] = ([ast.unparse(b) for b in node.bases], fields)
    init = ast.parse(arc.read("kvpress/__init__.py"))
    exported = [e.value for n in ast.walk(init) if isinstance(n, ast.Assign)
                and any(getattr(t, "id", "") == "__all__" for t in n.targets) for e in n.value.elts]  # type: ignore[attr-defined]

    def all_fields(name: str) -> dict[str, dict[str, Any]]:
        bases, own = classes.get(name, ([], {}))
        out: dict[str, dict[str, Any]] = {}
        for b in bases:
            out.update(all_fields(b))
        out.update(own)
        return out

    presses = {n: all_fields(n) for n in sorted(exported) if n.endswith("Press") and n in classes}
    pipe = arc.read("kvpress/pipeline.py")
    task = "kv-press-text-generation" if '"kv-press-text-generation"' in pipe else None
    body = {"stack": "kvpress", "version": version, "pipeline_task": task,
            "pipeline_call_kwargs": ["question", "questions", "answer_prefix", "press", "cache", "max_new_tokens",
                                     "max_context_length", "enable_thinking"],
            "presses": presses}
    header = [f"Press classes of kvpress {version} and their constructor fields (dataclass fields, inherited ones",
              f"included). Generated by scripts/refresh-stack-options.py from {arc.path.name} (PyPI): the classes",
              "kvpress/__init__.py exports, fields from kvpress/presses/*.py. Not installed here: kvpress pins",
              "transformers<5.3. A default '<required>' means the field has none."]
    return f"kvpress-{version}.yaml", body, header


TRTLLM_KEYS = ("dtype", "enable_block_reuse", "free_gpu_memory_fraction", "tokens_per_block", "host_cache_size",
               "max_attention_window", "sink_token_length", "max_tokens")


def refresh_trtllm(version: str, cache: Path, trtllm_source: Path | None = None,
                   **_: Any) -> tuple[str, dict[str, Any], list[str]] | None:
    if trtllm_source is None:
        print(f"trtllm {version}: kept the recorded list (PyPI has no TensorRT-LLM source; pass --trtllm-source "
              "tensorrt_llm/llmapi/llm_args.py of the release to refresh it)", file=sys.stderr)
        return None
    tree = ast.parse(trtllm_source.read_text())
    fields = class_fields(tree, "KvCacheConfig")
    aliases = literal_aliases(tree)
    kv = {k: spec_of(*fields[k], aliases) for k in TRTLLM_KEYS if k in fields}
    kv.update({k: spec_of(*fields[k], aliases) for k in ("disk_cache_size", "disk_cache_path") if k in fields})
    body = {"stack": "trtllm", "version": version, "keys": {
        "max_batch_size": {"type": "int", "min": 1}, "max_seq_len": {"type": "int", "min": 1},
        "kv_cache_config": {"type": "mapping", "keys": kv}}}
    header = [f"LLM-API options of TensorRT-LLM {version} that kvtune's export may write (KvCacheConfig fields).",
              f"Generated by scripts/refresh-stack-options.py from {trtllm_source.name} given with --trtllm-source."]
    return f"trtllm-{version}.yaml", body, header


REFRESH = {"vllm": refresh_vllm, "sglang": refresh_sglang, "lmcache": refresh_lmcache, "kvpress": refresh_kvpress,
           "trtllm": refresh_trtllm}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stack", action="append", choices=sorted(REFRESH), help="only these stacks (repeatable)")
    ap.add_argument("--check", action="store_true", help="compare with the committed lists; exit 1 on a difference")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "kvtune-stack-sources")
    ap.add_argument("--trtllm-source", type=Path, help="tensorrt_llm/llmapi/llm_args.py of the TensorRT-LLM release")
    args = ap.parse_args(argv)
    status = 0
    for stack in args.stack or list(REFRESH):
        profile = yaml.safe_load((PROFILES / f"{stack}.yaml").read_text())
        version = str(profile["default"])
        made = REFRESH[stack](version, args.cache, trtllm_source=args.trtllm_source)
        if made is None:
            continue
        name, body, header = made
        expected = profile["versions"][version].get("options")
        if expected != name:
            print(f"{stack}: the profile names options file {expected!r}, the refresh wrote {name!r}", file=sys.stderr)
            status = 1
        text = dump(OPTIONS / name, header, body)
        path = OPTIONS / name
        if args.check:
            same = path.exists() and path.read_text() == text
            print(f"{name}: {'matches' if same else 'DIFFERS from'} the download", file=sys.stderr)
            status |= 0 if same else 1
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
