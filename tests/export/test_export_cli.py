"""``kvtune export`` through typer's CliRunner: stdout lists files, stderr the notes, bad input exits 2 in one line.

The command is exercised through a small app that applies the same error rule as kvtune's CLI (UserError -> one
line, exit 2), and through ``kvtune.cli.app`` itself once that module imports (it also imports commands other
engineers are writing).
"""

from __future__ import annotations

import sys

import click
import click.testing
import pytest
import typer
import yaml
from export_cases import CASES
from typer.testing import CliRunner

from kvtune.commands.export import export
from kvtune.errors import UserError


def _small_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("export")(export)

    @app.callback()
    def _root() -> None:  # keep "export" as a named sub-command
        pass

    return app


class _OneLine:
    """Invoke an app; UserError and usage errors become one stderr line and exit 2, as kvtune's _Group does."""

    def __init__(self) -> None:
        self.app = _small_app()

    def invoke(self, args: list[str]):
        runner = click.testing.CliRunner()
        cmd = typer.main.get_command(self.app)

        def main() -> None:
            try:
                cmd.main(args=args, prog_name="kvtune", standalone_mode=False)
            except UserError as exc:
                click.echo(f"kvtune: error: {exc}", err=True)
                sys.exit(2)
            except Exception as exc:  # typer vendors click: match its usage errors by shape, not class
                if not hasattr(exc, "format_message"):
                    raise
                click.echo(f"kvtune: error: {exc.format_message()}", err=True)
                sys.exit(2)

        return runner.invoke(click.Command("wrap", callback=main), [])


def _kvtune_app():
    try:
        from kvtune.cli import app
    except ImportError as exc:
        pytest.skip(f"kvtune.cli does not import yet ({exc}); the command is covered through the small app")
    return app


@pytest.fixture(params=["small", "kvtune"])
def cli(request):
    if request.param == "small":
        return _OneLine().invoke
    app = _kvtune_app()
    return lambda args: CliRunner().invoke(app, args)


def _write(tmp_path, case: str = "snapkv_kivi_offload_cpu"):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(CASES[case], sort_keys=False))
    return path


def test_export_writes_and_reports(cli, tmp_path) -> None:
    src = _write(tmp_path)
    out = tmp_path / "out"
    result = cli(["export", str(src), "--to", "vllm,sglang", "--to", "hf", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [str(out / n) for n in
                                          ("vllm.yaml", "sglang.yaml", "hf_generation_config.json", "hf_kvtune.py")]
    notes = result.stderr.splitlines()
    assert notes and all(line.startswith("kvtune: note: ") for line in notes)
    assert any("vllm.yaml: selection snapkv(" in line and "not expressible" in line for line in notes)
    assert (out / "vllm.yaml").read_text().startswith("# vLLM serve config exported by kvtune")


def test_export_all_and_force(cli, tmp_path) -> None:
    src = _write(tmp_path, "identity")
    first = cli(["export", str(src), "--to", "all", "-o", str(tmp_path)])
    assert first.exit_code == 0, first.output
    assert len(first.stdout.splitlines()) == 8
    same = cli(["export", str(src), "--to", "all", "-o", str(tmp_path)])
    assert same.exit_code == 0, same.output  # files holding exactly what would be written are not conflicts
    src.write_text(yaml.safe_dump({**CASES["identity"], "name": "changed"}, sort_keys=False))
    again = cli(["export", str(src), "--to", "all", "-o", str(tmp_path)])
    assert again.exit_code == 2
    assert again.stderr.strip().count("\n") == 0 and "already exists (pass --force" in again.stderr
    assert "pipeline name: changed" not in (tmp_path / "vllm.yaml").read_text()
    forced = cli(["export", str(src), "--to", "all", "-o", str(tmp_path), "--force"])
    assert forced.exit_code == 0, forced.output
    assert "pipeline name: changed" in (tmp_path / "vllm.yaml").read_text()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("selection: [1, 2\n", "invalid YAML"),
        ("schema_version: 1\nselection: {method: snapkv, params: {budget: 0.2}}\nextra: 1\n", "field 'extra': unknown field"),
        ("schema_version: 7\n", "newer than this kvtune understands"),
        ("- just\n- a list\n", "expected a mapping"),
        ("codec: {method: fp8}\n", "missing 'schema_version'"),
        ("", "empty document"),
        # issue 14: each of these was exported with exit code 0
        ("schema_version: 1\nselection: {method: snapkv, params: {budget: -1}}\n", "budget token count must be in"),
        ("schema_version: 1\ncodec: {method: kivi, params: {bits: 3}}\n", "bits must be 2 or 4"),
        ("schema_version: 1\nplacement: {method: offload, params: {gpu_fraction: 1.5}}\n", "gpu_fraction must be in"),
        ("schema_version: 1\nplacement: {method: offload, params: {gpu_fraction: .nan}}\n", "placement.params.gpu_fraction"),
        ("schema_version: 1\nplacement: {method: offload, params: {block_size: 0}}\n", "block_size must be one of"),
        ("schema_version: 1\nselection: {method: magic}\n", "selection.method: unknown 'magic'"),
        ("schema_version: 1\ncodec: {method: snapkv}\n", "codec.method: unknown 'snapkv'"),
        ("schema_version: 1\nswitches: {gpu_memory_fraction: .inf}\n", "switches.gpu_memory_fraction"),
        ("schema_version: 1\nname: " + "[" * 2000 + "]" * 2000 + "\n", "nested deeper than 64 levels"),
    ],
)
def test_bad_pipeline_is_one_line_exit_2(cli, tmp_path, content: str, expected: str) -> None:
    src = tmp_path / "bad.yaml"
    src.write_text(content)
    result = cli(["export", str(src), "--to", "vllm", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(src) in lines[0] and expected in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists(), "nothing written for a bad pipeline"


def test_unknown_target_and_missing_file(cli, tmp_path) -> None:
    src = _write(tmp_path)
    bad = cli(["export", str(src), "--to", "vllm,tgi"])
    assert bad.exit_code == 2 and "unknown export target 'tgi'" in bad.stderr
    missing = cli(["export", str(tmp_path / "nope.yaml"), "--to", "vllm"])
    assert missing.exit_code == 2 and "no such file" in missing.stderr
    no_to = cli(["export", str(src)])
    assert no_to.exit_code == 2 and "--to" in no_to.stderr
