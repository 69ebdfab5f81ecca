"""The ``kvtune`` command line: thin typer commands over library functions.

Data goes to stdout, logs and progress to stderr. Bad input raises :class:`kvtune.errors.UserError`, which
:class:`_Group` turns into one line on stderr and exit code 2; so does a bad flag. Every message passes through
:func:`kvtune.errors.printable`, so no byte quoted from an input (NUL, ESC, a terminal title sequence, a newline)
reaches the terminal raw.

Commands load lazily: each lives in its own module (:data:`COMMANDS`), imported only when that command runs or
shows its own help. ``kvtune --version`` and ``kvtune --help`` import neither torch nor transformers (the
listing reads each command's one-line summary from its docstring without importing the module).
"""

from __future__ import annotations

import ast
import importlib
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

import kvtune
from kvtune.errors import UserError, printable

try:  # typer >= 0.26 carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
    from typer.exceptions import Abort, Exit
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import Abort, Exit, NoArgsIsHelpError, UsageError

# name -> (module, function), in --help order; each function is a plain typer command
COMMANDS: dict[str, tuple[str, str]] = {
    "recommend": ("kvtune.commands.recommend", "recommend"),
    "evaluate": ("kvtune.commands.evaluate", "evaluate"),
    "scenarios": ("kvtune.commands.listing", "scenarios"),
    "strategies": ("kvtune.commands.listing", "strategies"),
    "profile": ("kvtune.profile.command", "profile"),
    "export": ("kvtune.commands.export", "export"),
    "worker": ("kvtune.commands.worker", "worker"),
}


@lru_cache(maxsize=None)
def command_summary(name: str) -> str:
    """First line of the command function's docstring, read from its source without importing it."""
    module, func = COMMANDS[name]
    # the file is found from kvtune's own folder: find_spec would import the parent packages (and their imports)
    source = Path(kvtune.__file__).parent.joinpath(*module.split(".")[1:]).with_suffix(".py")
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except OSError:  # pragma: no cover - a broken install
        return ""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == func:
            doc = ast.get_docstring(node) or ""
            return doc.strip().splitlines()[0] if doc.strip() else ""
    return ""


@lru_cache(maxsize=None)
def load_command(name: str) -> TyperCommand:
    """The real click command for ``name`` (imports its module)."""
    module, func = COMMANDS[name]
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                      context_settings={"help_option_names": ["-h", "--help"]})
    sub.command(name)(getattr(importlib.import_module(module), func))
    command = typer.main.get_command(sub)
    command.name = name
    return command


class _Group(TyperGroup):
    """Command group whose errors are one line and exit code 2 (no usage block, no traceback), and whose
    commands are imported only when used."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, cmd_name: str) -> TyperCommand | None:
        # listing (root --help) gets a light stand-in; resolve_command swaps in the real command
        if cmd_name not in COMMANDS:
            return None
        summary = command_summary(cmd_name)
        return TyperCommand(cmd_name, help=summary, short_help=summary)

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, TyperCommand | None, list[str]]:
        name, _, rest = super().resolve_command(ctx, args)
        return name, load_command(name) if name else None, rest

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D401
        try:
            rv = super().main(args=args, prog_name=prog_name or "kvtune", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:
            typer.echo(exc.format_message())
            sys.exit(0)
        except UsageError as exc:
            ctx = getattr(exc, "ctx", None)
            where = f"kvtune {ctx.info_name}" if ctx is not None and ctx.parent is not None else "kvtune"
            typer.echo(f"kvtune: error: {printable(exc.format_message())} (see '{where} --help')", err=True)
            sys.exit(2)
        except UserError as exc:
            typer.echo(f"kvtune: error: {printable(exc)}", err=True)
            sys.exit(exc.exit_code)
        except Exit as exc:
            sys.exit(exc.exit_code)
        except OSError as exc:  # a path the OS refuses (name too long, no space, permission, ...): one line
            where = f"{printable(exc.filename, 120)}: " if exc.filename is not None else ""
            typer.echo(f"kvtune: error: {where}{printable(exc.strerror or exc)}", err=True)
            sys.exit(2)
        except ValueError as exc:
            if "embedded null byte" not in str(exc):  # only a path holding NUL (argv never does; in-process may)
                raise
            typer.echo("kvtune: error: a path holds a NUL byte", err=True)
            sys.exit(2)
        except Abort:
            typer.echo("kvtune: aborted", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            typer.echo("kvtune: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Group,
    name="kvtune",
    help="Hardware-aware auto-tuner and policy advisor for the KV cache of LLM inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from kvtune import __version__

        typer.echo(f"kvtune {__version__}")
        raise Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Hardware-aware auto-tuner and policy advisor for the KV cache of LLM inference."""


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
