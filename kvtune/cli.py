"""The ``kvtune`` command line: thin typer commands over library functions.

Data goes to stdout, logs and progress to stderr. Bad input raises :class:`kvtune.errors.UserError`, which
:class:`_Group` turns into one line on stderr and exit code 2; so does a bad flag.
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from kvtune.errors import UserError

try:  # typer >= 0.26 carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
    from typer.exceptions import Abort, Exit
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import Abort, Exit, NoArgsIsHelpError, UsageError


class _Group(TyperGroup):
    """Command group whose errors are one line and exit code 2 (no usage block, no traceback)."""

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
            typer.echo(f"kvtune: error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(2)
        except UserError as exc:
            typer.echo(f"kvtune: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Exit as exc:
            sys.exit(exc.exit_code)
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


def _register() -> None:
    # Each command lives in kvtune/commands/<name>.py as a plain function; the order here is the --help order.
    from kvtune.commands import recommend as _recommend
    from kvtune.commands import evaluate as _evaluate
    from kvtune.commands import listing as _listing

    app.command("recommend")(_recommend.recommend)
    app.command("evaluate")(_evaluate.evaluate)
    app.command("scenarios")(_listing.scenarios)
    app.command("strategies")(_listing.strategies)
    # -- other commands register below (one import + one app.command line each) --
    from kvtune.profile.command import profile as _profile
    app.command("profile")(_profile)
    from kvtune.commands import export as _export
    app.command("export")(_export.export)


_register()


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
