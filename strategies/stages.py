"""A pipeline built into strategy objects: one selector (or none), one codec, one placement.

This is what every consumer of a pipeline document works with (the runtime inside transformers, the quality
and cost measurements, the search's pre-check): the document names methods and parameters, :class:`Stages`
holds the validated strategy instances. It lives beside the registry because it is nothing more than the
registry applied to the three axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtune.strategies.base import Codec, Selector
from kvtune.strategies.placement import Placement

if TYPE_CHECKING:  # the document type lives above the strategies; only its three stage fields are read
    from kvtune.pipeline import Pipeline


@dataclass
class Stages:
    """A pipeline turned into strategy objects."""

    selector: Selector | None
    codec: Codec
    placement: Placement

    @classmethod
    def of(cls, pipeline: "Pipeline") -> "Stages":
        from kvtune.strategies import build  # the registry imports this module

        return cls(
            selector=build("selection", pipeline.selection.method, pipeline.selection.params),  # type: ignore[arg-type]
            codec=build("codec", pipeline.codec.method, pipeline.codec.params),  # type: ignore[arg-type]
            placement=build("placement", pipeline.placement.method, pipeline.placement.params),  # type: ignore[arg-type]
        )
