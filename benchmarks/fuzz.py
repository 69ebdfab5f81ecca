"""Fuzz campaign: thousands of generated malformed inputs against every loader, every exporter and the CLI.

Generated with Hypothesis (seeded: the same cases on every run) from the generators in ``tests/fuzz/fuzzgen.py``,
in six groups:

* ``pipelines``: documented-valid documents (must load), catalogued-bad ones (must be refused), random structure
  and raw YAML text (any outcome but a crash) through :func:`kvtune.pipeline.load_pipeline`;
* ``exports``: valid pipelines whose name, model name/source and a plugin's text parameter are hostile, rendered
  for every target and parsed back (an extra or changed key, JSON value or Python statement is an *injected key*),
  and catalogued-bad pipelines, which must never render;
* ``profiles``: a real profile written by ``kvtune profile`` with random values dropped in, through
  :func:`kvtune.profile.load_profile`;
* ``traces``: generated CSV traces through ``kvtune profile --trace`` (in-process);
* ``cli``: generated argv for every command, in-process through typer's CliRunner (model load and hardware probe
  stubbed: a fully valid ``recommend``/``evaluate`` stops where the model would load);
* ``subprocess``: a sample of the same argv run as real ``kvtune`` processes, for real exit codes and hangs.

Counts per group: cases, tracebacks (an exception other than the one-line :class:`UserError`), exit codes other
than 0/2, hangs (over ``--timeout`` seconds), invalid pipelines accepted, injected keys, other contract breaks
(multi-line errors, raw control characters or a password in the output, partial files left). Prints a table and
writes JSON (default ``benchmarks/results/fuzz.json``)::

    python benchmarks/fuzz.py                 # about 2,400 cases, a few minutes on 2 cores
    python benchmarks/fuzz.py --scale 0.1     # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))

import yaml  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fuzzgen as fg  # noqa: E402
from kvtune.errors import UserError  # noqa: E402
from kvtune.export import TARGETS, render_pipeline  # noqa: E402
from kvtune.pipeline import Pipeline, load_pipeline  # noqa: E402
from kvtune.profile import load_profile  # noqa: E402

FIELDS = ("cases", "accepted", "refused", "tracebacks", "bad_exit", "hangs", "invalid_accepted", "injected_keys",
          "other")


class Hang(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise Hang()


def bounded(seconds: float, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with a wall-clock limit (SIGALRM); :class:`Hang` when it runs over."""
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


class Tally:
    def __init__(self) -> None:
        self.groups: dict[str, Counter] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, group: str, **counts: int) -> None:
        c = self.groups.setdefault(group, Counter({k: 0 for k in FIELDS}))
        c["cases"] += 1
        c.update(counts)

    def note(self, group: str, text: str) -> None:
        found = self.examples.setdefault(group, [])
        if len(found) < 5:
            found.append(text[:300])


def _one_line(exc: UserError) -> bool:
    return "\n" not in str(exc) and "\r" not in str(exc)


def _attempt(tally: Tally, group: str, fn: Callable[[], Any], timeout: float) -> tuple[str, Any]:
    """Run one case bounded in time: ("ok", result) or ("refused", the UserError), counting a refusal's line
    count; a hang or a traceback is counted here and comes back as ("hang" | "crash", None)."""
    try:
        return "ok", bounded(timeout, fn)
    except UserError as exc:
        tally.add(group, refused=1, other=0 if _one_line(exc) else 1)
        return "refused", exc
    except Hang:
        tally.add(group, hangs=1)
        return "hang", None
    except Exception as exc:  # noqa: BLE001 - counting crashes is the point
        tally.add(group, tracebacks=1)
        tally.note(group, f"{type(exc).__name__}: {exc}")
        return "crash", None


def _load(group: str, tally: Tally, folder: Path, text: str, expect: str, timeout: float) -> None:
    path = folder / "p.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    status, got = _attempt(tally, group, lambda: load_pipeline(path), timeout)
    if status == "refused" and expect == "valid":
        tally.groups[group]["other"] += 1
        tally.note(group, f"valid document refused: {got}")
    if status != "ok":
        return
    tally.add(group, accepted=1, invalid_accepted=int(expect == "invalid"))
    if expect == "invalid":
        tally.note(group, f"invalid accepted: {text[:200]!r}")


def run_pipelines(tally: Tally, folder: Path, n: int, timeout: float) -> None:
    def case(expect: str) -> Callable[[Any], None]:
        def body(item: Any) -> None:
            doc = item[0] if isinstance(item, tuple) else item
            text = item if isinstance(item, str) else fg.to_yaml(doc)
            _load("pipelines", tally, folder, text, expect, timeout)
        return body

    plan = [("valid", fg.valid_docs, n // 4), ("invalid", fg.invalid_docs(), n * 3 // 8),
            ("unknown", fg.random_docs(), n // 4), ("unknown", fg.raw_yaml_text, n // 8)]
    for expect, strategy, count in plan:
        _drive(strategy, count, case(expect))


def run_exports(tally: Tally, n: int, timeout: float) -> None:
    import test_fuzz_exports as tfe  # the plugin with a free-text parameter and the text helpers

    tfe.SELECTORS[tfe.Tagged.name] = tfe.Tagged

    def hostile(item: tuple) -> None:
        doc, name, model_name, source, tag = item
        name, model_name, source = name[:512], model_name[:512], source[:512]
        try:
            got = bounded(timeout, lambda: tfe.shapes(tfe.with_text(doc, name, model_name, source, tag)))
            want = tfe.shapes(tfe.with_text(doc, "plain", "plain", source, None if tag is None else "plain"))
        except Hang:
            tally.add("exports", hangs=1)
            return
        except Exception as exc:  # noqa: BLE001
            tally.add("exports", tracebacks=1)
            tally.note("exports", f"{type(exc).__name__}: {exc}")
            return
        injected = sum(got.get(f) != want[f] for f in want) + len(set(got) ^ set(want))
        tally.add("exports", accepted=1, injected_keys=injected)
        if injected:
            tally.note("exports", f"injected: name={name!r} source={source!r} tag={tag!r}")

    def invalid(item: tuple) -> None:
        doc, _ = item

        def render() -> Any:
            pipeline = Pipeline.from_dict(doc, where="p.yaml")
            return render_pipeline(pipeline, TARGETS, where="p.yaml")

        if _attempt(tally, "exports", render, timeout)[0] == "ok":
            tally.add("exports", accepted=1, invalid_accepted=1)
            tally.note("exports", f"invalid rendered: {doc!r}")

    text = st.none() | fg.hostile_text.filter(lambda t: len(t) <= 512)
    _drive(st.tuples(fg.valid_docs, fg.hostile_text, fg.hostile_text, fg.hostile_text, text), n * 3 // 4, hostile)
    _drive(fg.invalid_docs(), n // 4, invalid)
    tfe.SELECTORS.pop(tfe.Tagged.name, None)


def run_profiles(tally: Tally, folder: Path, n: int, timeout: float) -> None:
    outcome = fg.run_cli(["profile", "--trace", "trace.csv", "--hardware", "h100-sxm", "-o", "profile.yaml",
                          "--force", "--format", "json"], folder)
    if outcome.exit_code != 0:
        raise SystemExit(f"could not write a base profile: {outcome.stderr}")
    base = yaml.safe_load((folder / "profile.yaml").read_text())
    paths = [(k,) for k in base] + [(k, s) for k, v in base.items() if isinstance(v, dict) for s in v]

    @st.composite
    def docs(draw: Any) -> str:
        doc = copy.deepcopy(base)
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(paths))
            target = doc
            for key in path[:-1]:
                target = target.get(key) if isinstance(target, dict) else None
            if isinstance(target, dict):
                if draw(st.integers(0, 4)) == 0:
                    target.pop(path[-1], None)
                else:
                    target[path[-1]] = draw(fg.json_values)
        return fg.to_yaml(doc) if draw(st.integers(0, 9)) else draw(fg.raw_yaml_text)

    def body(text: str) -> None:
        path = folder / "fuzz-profile.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        if _attempt(tally, "profiles", lambda: load_profile(path), timeout)[0] == "ok":
            tally.add("profiles", accepted=1)

    _drive(docs(), n, body)


def _cli_case(group: str, tally: Tally, folder: Path, args: list[str], timeout: float) -> None:
    try:
        outcome = bounded(timeout, lambda: fg.run_cli(args, folder))
    except Hang:
        tally.add(group, hangs=1)
        tally.note(group, f"hang: {args!r}")
        return
    found = fg.problems(outcome, folder)
    tracebacks = int(any(p.startswith("traceback") for p in found))
    bad_exit = int(outcome.exit_code not in (0, 2))
    other = int(bool(found) and not tracebacks and not bad_exit)
    tally.add(group, accepted=int(outcome.exit_code == 0), refused=int(outcome.exit_code == 2),
              tracebacks=tracebacks, bad_exit=bad_exit, other=other)
    if found:
        tally.note(group, f"{args!r}: {found}")


def run_traces(tally: Tally, folder: Path, n: int, timeout: float) -> None:
    cell = st.one_of(st.integers(-10, 10**7).map(str), st.text(max_size=12),
                     st.sampled_from(["nan", "-1", "1e309", "\x00", "\x1b[2J", '"', ""]))
    header = st.sampled_from(["TIMESTAMP,ContextTokens,GeneratedTokens", "prompt_len,output_len",
                              "timestamp,input_length,output_length,hash_ids", "", "a,b"])

    def body(item: tuple) -> None:
        head, rows, suffix = item
        trace = folder / f"fuzz-trace{suffix}"
        text = head + "\n" + "\n".join(",".join(r) for r in rows) + "\n"
        if suffix == ".jsonl":
            text = "\n".join(json.dumps(dict(zip(head.split(","), r))) for r in rows) + "\n"
        trace.write_text(text, encoding="utf-8", errors="surrogatepass")
        _cli_case("traces", tally, folder, ["profile", "--trace", str(trace), "--hardware", "h100-sxm",
                                            "--format", "json", "-o", "fuzz-profile.yaml", "--force"], timeout)

    plausible = st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 200_000), st.integers(1, 8192)).map(
        lambda r: [str(v) for v in r]), min_size=1, max_size=8)  # timestamp, input, output: mostly readable
    junk = st.lists(st.lists(cell, min_size=1, max_size=4), max_size=8)
    _drive(st.tuples(header, plausible | junk, st.sampled_from([".csv", ".jsonl", ".txt"])), n, body)


def run_cli(tally: Tally, folder: Path, n: int, timeout: float) -> None:
    _drive(fg.cli_args(), n, lambda args: _cli_case("cli", tally, folder, args, timeout))


def run_subprocess(tally: Tally, folder: Path, n: int, timeout: float) -> None:
    """Real processes (a hang: over 6x ``--timeout``, since each imports torch): argv cannot carry NUL there, and
    only argv that stop before the model loads are sampled (the in-process run with the stub tells which)."""
    exe = str(Path(sys.executable).with_name("kvtune"))
    samples: list[list[str]] = []
    _drive(fg.cli_args(), n * 4, lambda a: samples.append(a))
    chosen = [a for a in samples if "\x00" not in "".join(a) and not _loads_model(a, folder)][:n]
    for args in chosen:
        started = time.perf_counter()
        try:
            proc = subprocess.run([exe, *args], cwd=folder, capture_output=True, text=True, timeout=timeout * 6,
                                  env={**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}, errors="replace")
        except subprocess.TimeoutExpired:
            tally.add("subprocess", hangs=1)
            tally.note("subprocess", f"hang: {args!r}")
            continue
        outcome = fg.Outcome(args, proc.returncode, proc.stdout, proc.stderr, None, time.perf_counter() - started)
        found = fg.problems(outcome, folder)
        tracebacks = int("Traceback" in proc.stderr)
        bad_exit = int(proc.returncode not in (0, 2))
        tally.add("subprocess", accepted=int(proc.returncode == 0), refused=int(proc.returncode == 2),
                  tracebacks=tracebacks, bad_exit=bad_exit, other=int(bool(found) and not tracebacks and not bad_exit))
        if found:
            tally.note("subprocess", f"{args!r}: {found}")


def _loads_model(args: list[str], folder: Path) -> bool:
    """Whether this argv gets as far as loading the model (in-process run with the stub tells)."""
    outcome = fg.run_cli(args, folder)
    return fg.MODEL_SENTINEL in outcome.stderr


def _drive(strategy: Any, count: int, body: Callable[[Any], None]) -> None:
    """Feed ``count`` seeded examples of ``strategy`` to ``body`` (which records, never raises)."""
    if count <= 0:
        return

    @settings(derandomize=True, max_examples=count, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(strategy)
    def run(item: Any) -> None:
        body(item)

    run()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every group's case count")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds after which a case counts as a hang")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz.json")
    args = parser.parse_args()
    counts = {"pipelines": 800, "exports": 400, "profiles": 300, "traces": 250, "cli": 600, "subprocess": 16}
    counts = {k: max(1, int(v * args.scale)) for k, v in counts.items()}
    tally = Tally()
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kvtune-fuzz-") as tmp:
        folder = Path(tmp)
        fg.write_inputs(folder)
        for group, runner in (("pipelines", lambda: run_pipelines(tally, folder, counts["pipelines"], args.timeout)),
                              ("exports", lambda: run_exports(tally, counts["exports"], args.timeout)),
                              ("profiles", lambda: run_profiles(tally, folder, counts["profiles"], args.timeout)),
                              ("traces", lambda: run_traces(tally, folder, counts["traces"], args.timeout)),
                              ("cli", lambda: run_cli(tally, folder, counts["cli"], args.timeout)),
                              ("subprocess", lambda: run_subprocess(tally, folder, counts["subprocess"],
                                                                    args.timeout))):
            started = time.perf_counter()
            runner()
            seconds[group] = round(time.perf_counter() - started, 1)
            print(f"{group}: {dict(tally.groups.get(group, {}))} in {seconds[group]} s", file=sys.stderr)
    total = Counter({k: 0 for k in FIELDS})
    for c in tally.groups.values():
        total.update(c)
    header = f"{'group':<11}" + "".join(f"{f:>17}" for f in FIELDS) + f"{'seconds':>9}"
    print(header)
    for group, c in tally.groups.items():
        print(f"{group:<11}" + "".join(f"{c[f]:>17}" for f in FIELDS) + f"{seconds[group]:>9}")
    print(f"{'total':<11}" + "".join(f"{total[f]:>17}" for f in FIELDS) + f"{sum(seconds.values()):>9.1f}")
    doc = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
        "seeded": "Hypothesis derandomize=True (the same cases on every run)",
        "timeout_s": args.timeout, "groups": {g: dict(c) for g, c in tally.groups.items()}, "total": dict(total),
        "seconds": seconds, "examples": tally.examples,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
