"""``kvtune scenarios`` and ``kvtune strategies``: what exists, with parameters and citations."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kvtune.commands.common import OutputFormat, emit

FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="table, json or yaml")]


def scenarios(format: FormatOpt = OutputFormat.table) -> None:
    """List the deployment scenarios: what each allows and what it prefers."""
    from kvtune.scenarios import SCENARIOS

    rows = [s.describe() for s in SCENARIOS.values()]
    if format is not OutputFormat.table:
        emit(rows, format)
        return
    table = Table(title="kvtune scenarios", show_lines=True)
    for col in ("scenario", "for", "selection", "codec", "placement", "max loss", "prefers", "TPOT target"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], f"{r['summary']}\n[dim]{r['why']}[/dim]", ", ".join(r["selection"]),
                      ", ".join(r["codecs"]), ", ".join(r["placements"]), f"{r['max_quality_loss']:g}",
                      r["prefer_means"], f"{r['tpot_ms']:g} ms")
    Console(width=160).print(table)


def _strategy_rows() -> list[dict]:
    from kvtune.strategies import AXES, load_plugins

    load_plugins()
    rows = [{"name": "none", "category": "selection", "summary": "keep every token", "citation": "baseline",
             "parameters": {}, "search_space": ""}]
    for axis, registry in AXES.items():
        for name, cls in registry.items():
            params = {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
            rows.append({"name": name, "category": axis, "summary": cls.summary, "citation": cls.citation,
                         "parameters": params, "search_space": cls.search_space_doc()})
    return rows


def strategies(format: FormatOpt = OutputFormat.table) -> None:
    """List every strategy: category, parameters (defaults), citation and search space."""
    rows = _strategy_rows()
    if format is not OutputFormat.table:
        emit(rows, format)
        return
    table = Table(title="kvtune strategies", show_lines=True)
    for col in ("name", "axis", "what", "parameters (default)", "searched", "paper"):
        table.add_column(col, overflow="fold")
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["parameters"].items())
        table.add_row(r["name"], r["category"], r["summary"], params, r["search_space"], r["citation"])
    Console(width=180).print(table)
