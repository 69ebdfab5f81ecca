"""Property-based fuzzing of the command line (Hypothesis, seeded): generated argv for every command.

Each argv runs in-process through typer's CliRunner, with the model load and the hardware probe replaced by
stand-ins (a fully valid ``recommend``/``evaluate`` stops where the model would load, with one line). Contract:
exit code 0 or 2, never a traceback; exit 2 is one ``kvtune: error:`` line; no raw control character and no
password reaches the terminal; nothing half-written is left behind. Trace files reach the readers through
``kvtune profile --trace``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from fuzzgen import SECRET, cli_args, problems, run_cli, write_inputs  # noqa: E402

HC = list(HealthCheck)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz-cli")
    write_inputs(path)
    return path


@settings(derandomize=True, max_examples=120, deadline=None, suppress_health_check=HC)
@given(args=cli_args())
def test_generated_command_lines(folder, args):
    outcome = run_cli(args, folder)
    assert not problems(outcome, folder), (args, problems(outcome, folder))


@settings(derandomize=True, max_examples=40, deadline=None, suppress_health_check=HC)
@given(rows=st.lists(st.lists(st.one_of(st.integers(-10, 10**7).map(str), st.text(max_size=12),
                                        st.sampled_from(["nan", "-1", "1e309", "\x00", "\x1b[2J", '"'])),
                              min_size=1, max_size=4), max_size=8),
       header=st.sampled_from(["TIMESTAMP,ContextTokens,GeneratedTokens", "prompt_len,output_len", "", "a,b"]))
def test_generated_traces(folder, rows, header):
    trace = folder / "fuzz-trace.csv"
    trace.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n", encoding="utf-8",
                     errors="surrogatepass")
    outcome = run_cli(["profile", "--trace", str(trace), "--hardware", "h100-sxm", "--format", "json",
                       "-o", "fuzz-profile.yaml", "--force"], folder)
    assert not problems(outcome, folder), problems(outcome, folder)


@pytest.mark.parametrize("storage", [f"postgresql://kv:{SECRET}@127.0.0.1:1/optuna",
                                     f"postgresql://kv:p@{SECRET}:w@localhost/db",
                                     f"postgresql://kv@localhost/db?password={SECRET}"])
def test_storage_secrets_never_printed(folder, storage):
    outcome = run_cli(["recommend", "--storage", storage, "--output", "out.yaml"], folder)
    assert outcome.exit_code == 2 and SECRET not in outcome.stdout + outcome.stderr
    assert "***" in outcome.stderr and not problems(outcome, folder)
