"""Generators and oracles for the fuzz tests (tests/fuzz/) and the fuzz campaign (benchmarks/fuzz.py).

Every generator is a Hypothesis strategy. Pipelines come with a label saying what the loader must do with them:
``valid`` (built from values every strategy documents as valid: must be accepted), ``invalid`` (one value from
the catalogue of known-bad values below, each with the rule it breaks: must be refused with one line) or
``unknown`` (random structure: any outcome but a crash is fine). The catalogue is the reference the "invalid
pipelines accepted" count is taken against; it is written from the strategies' documented ranges, not read from
their code.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

# -- hostile text ------------------------------------------------------------------------------------------

HOSTILE_TEXT = [
    "x\n\nmax-num-seqs: 99999\n\nenforce-eager: true",  # the injection
    "x\r\nmax-num-seqs: 1",
    "x\x85max-num-seqs: 2",  # NEL: a YAML line break
    "x\u2028max-num-seqs: 3",  # LINE SEPARATOR: a YAML line break
    "x\u2029max-num-seqs: 4",
    "x\x00y",
    "\x1b]0;pwned\x07\x1b[2J",  # terminal title + clear screen
    '"""\nimport os\nos.system("echo pwned")\n"""',
    "'''\nimport os\n'''",
    "\\\"\"\"; import os #",
    "\\",
    "#",
    "{a: 1}",
    "- item",
    "&anchor *anchor",
    "!!python/object/apply:os.system ['echo pwned']",
    "\u202eevil",
    "x" * 600,
]

hostile_text = st.one_of(
    st.sampled_from(HOSTILE_TEXT),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.lists(st.sampled_from(HOSTILE_TEXT + ["a", ": ", "\n", "key"]), min_size=1, max_size=4).map("".join),
)

# -- pipelines ----------------------------------------------------------------------------------------------

VALID_STAGES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "selection": [
        ("none", {}),
        ("snapkv", {"budget": 0.25, "window": 16, "kernel": 7, "pooling": "max"}),
        ("snapkv", {"budget": 512}),
        ("streaming_llm", {"budget": 0.5, "sinks": 4}),
        ("h2o", {"budget": 0.3, "sinks": 0, "recent": 32}),
        ("pyramidkv", {"budget": 0.3, "beta": 20}),
        ("ada_kv", {"budget": 0.2, "alpha_safeguard": 0.2}),
        ("tova", {"budget": 0.5}),
        ("knorm", {"budget": 0.4}),
        ("sliding_window", {"budget": 256}),
        ("random", {"budget": 0.5, "seed": 3}),
    ],
    "codec": [
        ("fp16", {}), ("bf16", {}),
        ("fp8", {"fmt": "e5m2", "scale": "token"}),
        ("int8", {"group_size": 64}),
        ("kivi", {"bits": 2, "group_size": 32, "residual": 128}),
        ("lowrank", {"rank": 32}),
        ("mixed", {"edge": "fp16", "middle": "kivi4", "edge_layers": 2}),
    ],
    "placement": [
        ("gpu", {}),
        ("offload", {"tier": "cpu", "gpu_fraction": 0.5, "block_size": 16, "prefetch_depth": 2,
                     "host_bytes": 8 * 2**30}),
        ("offload", {"tier": "disk", "gpu_fraction": 0.25, "block_size": 128}),
    ],
}
VALID_SWITCHES = [
    {}, {"prefix_caching": False}, {"max_model_len": 32768, "gpu_memory_fraction": 0.85},
]

# (axis, method, params, rule broken): each must be refused
INVALID_STAGES: list[tuple[str, str, dict[str, Any], str]] = [
    ("selection", "snapkv", {"budget": -1}, "budget >= 1 token"),
    ("selection", "snapkv", {"budget": 0}, "budget >= 1 token"),
    ("selection", "snapkv", {"budget": 1.5}, "budget ratio in (0, 1]"),
    ("selection", "snapkv", {"budget": math.nan}, "finite"),
    ("selection", "snapkv", {"budget": math.inf}, "finite"),
    ("selection", "snapkv", {"budget": True}, "a number, not a boolean"),
    ("selection", "snapkv", {"budget": "0.5"}, "a number, not a string"),
    ("selection", "snapkv", {"window": 0}, "window 1..64"),
    ("selection", "snapkv", {"kernel": 2}, "odd kernel"),
    ("selection", "snapkv", {"pooling": "median"}, "pooling max|avg"),
    ("selection", "snapkv", {"budgett": 0.5}, "unknown parameter"),
    ("selection", "streaming_llm", {"sinks": -1}, "sinks >= 0"),
    ("selection", "streaming_llm", {"sinks": 10**9}, "sinks bounded"),
    ("selection", "streaming_llm", {"budget": 10**12}, "token budget bounded"),
    ("selection", "h2o", {"recent": -5}, "recent >= 0"),
    ("selection", "pyramidkv", {"beta": 0}, "beta 1..100"),
    ("selection", "ada_kv", {"alpha_safeguard": 2.0}, "alpha in [0, 1]"),
    ("selection", "random", {"seed": -1}, "seed >= 0"),
    ("selection", "none", {"budget": 0.5}, "none takes no params"),
    ("selection", "kivi", {}, "a codec on the selection axis"),
    ("selection", "quest", {}, "unknown method"),
    ("codec", "kivi", {"bits": 3}, "bits 2|4"),
    ("codec", "kivi", {"group_size": 7}, "group size 16..128"),
    ("codec", "kivi", {"residual": 5}, "residual a multiple of the group"),
    ("codec", "int8", {"group_size": 3}, "group size 16..128"),
    ("codec", "fp8", {"fmt": "e3m4"}, "fmt e4m3|e5m2"),
    ("codec", "lowrank", {"rank": 0}, "rank >= 1"),
    ("codec", "lowrank", {"rank": 2048}, "rank <= 1024"),
    ("codec", "mixed", {"middle": "int3"}, "layer codec from the list"),
    ("codec", "snapkv", {}, "a selector on the codec axis"),
    ("codec", "fp16", {"bits": 8}, "fp16 takes no params"),
    ("placement", "offload", {"gpu_fraction": 1.5}, "gpu_fraction 0.05..0.95"),
    ("placement", "offload", {"gpu_fraction": math.nan}, "finite"),
    ("placement", "offload", {"block_size": 0}, "block size 16..128"),
    ("placement", "offload", {"prefetch_depth": 9}, "prefetch depth 1..4"),
    ("placement", "offload", {"tier": "nvme"}, "tier cpu|disk"),
    ("placement", "offload", {"host_bytes": -1}, "host bytes >= 0"),
    ("placement", "fp16", {}, "a codec on the placement axis"),
]
INVALID_DOCS: list[tuple[dict[str, Any], str]] = [
    ({"switches": {"gpu_memory_fraction": 1.5}}, "memory fraction <= 1"),
    ({"switches": {"gpu_memory_fraction": 0.0}}, "memory fraction > 0"),
    ({"switches": {"gpu_memory_fraction": math.nan}}, "finite"),
    ({"switches": {"gpu_memory_fraction": math.inf}}, "finite"),
    ({"switches": {"max_model_len": 0}}, "max_model_len >= 1"),
    ({"switches": {"max_model_len": 10**12}}, "max_model_len bounded"),
    ({"schema_version": 99}, "future schema"),
    ({"schema_version": "1"}, "schema version is an int"),
    ({"name": "x" * 10_000}, "name length"),
    ({"bogus": 1}, "unknown field"),
    ({"codec": {"method": "lowrank", "params": {"rank": 100}}, "provenance": {
        "kvtune_version": "0", "created": "2025-01-01T00:00:00+00:00",
        "model": {"name": "m", "source": "org/m", "layers": 2, "kv_heads": 1, "q_heads": 1, "head_dim": 64,
                  "dtype": "float16"}}}, "rank <= the model's head dim"),
]


def base_doc(sel: tuple[str, dict], codec: tuple[str, dict], place: tuple[str, dict], switches: dict) -> dict:
    return {
        "schema_version": 1,
        "selection": {"method": sel[0], "params": copy.deepcopy(sel[1])},
        "codec": {"method": codec[0], "params": copy.deepcopy(codec[1])},
        "placement": {"method": place[0], "params": copy.deepcopy(place[1])},
        "switches": dict(switches),
    }


valid_docs = st.builds(base_doc, st.sampled_from(VALID_STAGES["selection"]), st.sampled_from(VALID_STAGES["codec"]),
                       st.sampled_from(VALID_STAGES["placement"]), st.sampled_from(VALID_SWITCHES))


@st.composite
def invalid_docs(draw: Any) -> tuple[dict, str]:
    doc = draw(valid_docs)
    if draw(st.booleans()):
        axis, method, params, rule = draw(st.sampled_from(INVALID_STAGES))
        stage = doc[axis]
        if stage["method"] != method:
            stage["method"], stage["params"] = method, {}
        stage["params"].update(params)
        return doc, f"{axis}: {rule}"
    patch, rule = draw(st.sampled_from(INVALID_DOCS))
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict) and key == "switches":
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = copy.deepcopy(value)
    return doc, rule


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), hostile_text,
)
json_values = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(string.ascii_lowercase + "_", max_size=12), inner, max_size=4)),
    max_leaves=12)


@st.composite
def random_docs(draw: Any) -> dict:
    """A valid document with random values dropped anywhere (structure and types unknown in advance)."""
    doc = draw(valid_docs)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from([
            ("selection", "method"), ("selection", "params"), ("codec", "params"), ("placement", "params"),
            ("switches",), ("name",), ("selection",), ("measured",), ("provenance",), ("schema_version",),
        ]))
        value = draw(json_values)
        target = doc
        for key in path[:-1]:
            target = target.setdefault(key, {}) if isinstance(target, dict) else {}
        if isinstance(target, dict):
            target[path[-1]] = value
    if draw(st.booleans()):
        stage = doc.get(draw(st.sampled_from(["selection", "codec", "placement"])))
        params = stage.get("params") if isinstance(stage, dict) else None
        if isinstance(params, dict):
            params[draw(st.sampled_from(["budget", "bits", "sinks", "rank", "gpu_fraction", "tier", "x"]))] = \
                draw(json_leaf)
    return doc


def to_yaml(doc: Any) -> str:
    """YAML text for a document (non-finite floats as .nan/.inf, as a user would write them)."""
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


raw_yaml_text = st.one_of(
    st.text(max_size=200),
    st.sampled_from([
        "", "---\n", "~\n", "[]\n", "- 1\n- 2\n", "schema_version: 1\nselection: [1, 2\n",
        "!!python/object/apply:os.system ['echo pwned']\n",
        "schema_version: !!python/name:os.system 1\n",
        "a: &a [1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b]\n"
        "d: &d [*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e]\n",
        "schema_version: 1\nname: " + "[" * 3000 + "]" * 3000 + "\n",
        "\xff\xfe bytes",
        "schema_version: 1\n\x00\n",
    ]),
)

# -- export oracles -----------------------------------------------------------------------------------------


def yaml_shape(text: str) -> Any:
    """The parsed YAML body of an exported file (comments dropped), for comparing keys and values."""
    return yaml.safe_load(text)


def python_shape(text: str) -> str:
    """The AST of an exported Python file with every string constant blanked: two files with equal shapes run
    the same statements, whatever text their strings hold."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node.value = ""
    return ast.dump(tree)


def file_shape(filename: str, text: str) -> Any:
    if filename.endswith(".py"):
        return python_shape(text)
    if filename.endswith(".json"):
        return json.loads(text)
    return yaml_shape(text)

# -- the CLI ------------------------------------------------------------------------------------------------

MODEL_SENTINEL = "fuzz: the model would load here"
SECRET = "s3cr3tPW"
_RAW_CONTROL = {chr(c) for c in range(32) if chr(c) not in "\n\t"} | {"\x7f", "\x85", "\u2028", "\u2029"}

STORAGE_VALUES = [
    "sqlite:///study.db", "journal:///tmp/kvtune-fuzz-journal.log", "study.log", "foo://x", "sqlite://relative.db",
    f"postgresql://user:{SECRET}@127.0.0.1:1/db", f"postgresql://user:{SECRET}@@host/db",
    f"postgresql://u@h/db?password={SECRET}", f"mysql://root:{SECRET}@nohost.invalid/db", "journal:", "",
    "sqlite:////nonexistent-dir/x.db", "/proc/x.log",
]
FLAG_VALUES = {
    "--scenario": ["multi-turn", "edge", "fast", ""],
    "--storage": STORAGE_VALUES,
    "--context": ["512", "0", "-1", "99999999999", "nan", "1e3", ""],
    "--trials": ["1", "0", "-5", "x"],
    "--export": ["vllm", "all", "vllm,tgi", ",", ""],
    "--export-dir": ["out", "", "/proc", "pipeline.yaml"],
    "--output": ["out.yaml", "", "/nonexistent/x.yaml", ".", "pipeline.yaml"],
    "--to": ["vllm", "all", "kvpress,hf", "tgi", ""],
    "--out-dir": ["out", "", "pipeline.yaml", "/proc/sys"],
    "--format": ["table", "json", "yaml", "xml"],
    "--hardware": ["h100-sxm", "nope"],
    "--profile": ["profile.yaml", "missing.yaml", "pipeline.yaml", "bad.yaml"],
    "--model": ["/nope/model.gguf", "pipeline.yaml"],
    "--target": ["llama-3.1-8b", "nope"],
    "--seed": ["0", "-1", "x"],
    "--device": ["cpu", "cuda:9", "tpu", ""],
    "--trace": ["trace.csv", "missing.csv", "pipeline.yaml", "bad.csv"],
    "--trace-format": ["auto", "azure", "nope"],
}
COMMAND_FLAGS = {
    "recommend": ["--scenario", "--storage", "--context", "--trials", "--export", "--export-dir", "--output",
                  "--format", "--hardware", "--profile", "--model", "--target", "--seed", "--device", "--force",
                  "--quick"],
    "evaluate": ["--context", "--output", "--format", "--hardware", "--profile", "--model", "--target", "--seed",
                 "--force", "--quick"],
    "export": ["--to", "--out-dir", "--force"],
    "profile": ["--trace", "--trace-format", "--hardware", "--output", "--format", "--force"],
    "scenarios": ["--format"],
    "strategies": ["--format"],
}
BOOL_FLAGS = {"--force", "--quick"}


@st.composite
def cli_args(draw: Any) -> list[str]:
    """An argv for ``kvtune``: a command, flags with values from the lists above or hostile text, sometimes
    positional junk, unknown flags or a missing value."""
    command = draw(st.sampled_from([*COMMAND_FLAGS, "expor", "--version", "--help"]))
    if command.startswith("--") or command not in COMMAND_FLAGS:
        return [command]
    args = [command]
    if command in ("evaluate", "export"):
        args.append(draw(st.sampled_from(["pipeline.yaml", "bad.yaml", "empty.yaml", "missing.yaml", "", "."])
                         | hostile_text))
    for flag in draw(st.lists(st.sampled_from(COMMAND_FLAGS[command] + ["--bogus"]), max_size=5)):
        args.append(flag)
        if flag in BOOL_FLAGS or flag == "--bogus":
            continue
        if draw(st.integers(0, 9)) == 0:
            break  # flag without its value
        args.append(draw(st.sampled_from(FLAG_VALUES.get(flag, [""])) | hostile_text))
    if command == "recommend" and "--output" not in args:
        args += ["--output", "out.yaml"]  # never the default kvtune-pipeline.yaml of a real run
    if command == "profile" and "--hardware" not in args:
        args += ["--hardware", "h100-sxm"]  # never probe this machine's bandwidth in a fuzz run
    return args


def write_inputs(folder: Path) -> None:
    """The files the generated argv names: a valid pipeline, a broken one, an empty one, a profile, traces."""
    (folder / "pipeline.yaml").write_text(to_yaml(base_doc(("snapkv", {"budget": 0.25}), ("kivi", {"bits": 4}),
                                                          ("gpu", {}), {})))
    (folder / "bad.yaml").write_text("schema_version: 1\ncodec: {method: kivi, params: {bits: 3}}\n")
    (folder / "empty.yaml").write_text("")
    (folder / "trace.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n"
                                      "2023-11-16 18:15:50.99,396,109\n")
    (folder / "bad.csv").write_text("TIMESTAMP,ContextTokens\n\x00,\x1b[2J\n-1,nan\n")


@dataclass
class Outcome:
    args: list[str]
    exit_code: int
    stdout: str
    stderr: str
    crash: str | None  # an exception other than SystemExit: its type and message
    seconds: float


def run_cli(args: list[str], folder: Path) -> Outcome:
    """Run ``kvtune *args`` in-process in ``folder`` (model loading and hardware probing replaced by stand-ins
    that raise :data:`MODEL_SENTINEL` / return a reference GPU, so a fully valid command stops there)."""
    import os
    import time
    from unittest import mock

    from typer.testing import CliRunner

    from kvtune.cli import app
    from kvtune.errors import UserError
    from kvtune.profile import hardware

    def no_model(*_: Any, **__: Any) -> Any:
        raise UserError(MODEL_SENTINEL)

    old = os.getcwd()
    os.chdir(folder)
    started = time.perf_counter()
    try:
        with mock.patch("kvtune.commands.common.load_model", no_model), \
                mock.patch.object(hardware, "probe_hardware", lambda **_: hardware.reference_hardware("h100-sxm")):
            result = CliRunner().invoke(app, args, env={"COLUMNS": "120", "NO_COLOR": "1"})
    finally:
        os.chdir(old)
    crash = None
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        crash = f"{type(result.exception).__name__}: {result.exception}"
    return Outcome(args, result.exit_code, result.stdout, result.stderr, crash, time.perf_counter() - started)


def problems(outcome: Outcome, folder: Path) -> list[str]:
    """What the outcome breaks: exit codes other than 0/2, tracebacks, a multi-line or unprefixed error, raw
    control characters or a secret in the output, staging leftovers."""
    found = []
    if outcome.crash:
        found.append(f"traceback: {outcome.crash}")
    if outcome.exit_code not in (0, 2):
        found.append(f"exit code {outcome.exit_code}")
    if outcome.exit_code == 2:
        lines = [ln for ln in outcome.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("kvtune: error: ")]
        if len(errors) != 1 or not lines[-1].startswith("kvtune: error: "):
            found.append(f"error not one line: {outcome.stderr[-300:]!r}")
    text = outcome.stdout + outcome.stderr
    if "Traceback" in text:
        found.append("traceback text in output")
    if SECRET in text:
        found.append("secret printed")
    if _RAW_CONTROL & set(outcome.stderr):
        found.append(f"raw control character in stderr: {outcome.stderr[-200:]!r}")
    leftovers = [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".kvtune-stage-" in p.name]
    if leftovers:
        found.append(f"partial files left: {leftovers}")
    return found
