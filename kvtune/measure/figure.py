"""A number with its provenance: every figure kvtune prints says where it came from.

* ``measured`` — timed or read on a machine (the basis names which);
* ``calibrated`` — a model fitted to measurements (the basis names which);
* ``assumed`` — a datasheet, a paper or a kvtune seed value (the basis names which).

A figure computed from others takes the weakest label of its inputs: assumed < calibrated < measured.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("assumed", "calibrated", "measured")


@dataclass(frozen=True)
class Figure:
    value: float
    source: str  # one of SOURCES
    basis: str  # what it was measured on, fitted to, or taken from

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"figure source must be one of {SOURCES}, got {self.source!r}")


def weakest(*sources: str) -> str:
    """The label of a figure computed from figures with these labels."""
    return min(sources, key=SOURCES.index) if sources else "measured"
