"""The kernel calibration table: what fraction of a GPU's roofline each kind of work reaches.

The serving model (:mod:`kvtune.measure.serving`) prices a decode step from bytes and FLOPs; these factors turn
bandwidth and peak FLOP/s into achieved rates. One table, three sources, each entry labelled:

* ``assumed`` — the seed shipped in ``kvtune.profiles/calibration/kernels.yaml`` (kvtune's own values, no GPU
  measured them; the file says so entry by entry);
* ``measured`` — written by ``benchmarks/kernels.py --calibration-out FILE`` on a GPU, read from files given with
  ``--calibration`` or found in ``~/.config/kvtune/calibration/*.yaml``;
* ``calibrated`` — fitted on this machine (the CPU step model, :mod:`kvtune.measure.cpu_calibration`), not stored here.

Lookup: the most specific entry wins — an entry naming the hardware (a reference profile name such as
``h100-sxm``, or a substring of the device name such as ``NVIDIA H200``) before the ``"*"`` entry; among equals,
a measured entry before an assumed one.

Ops and their value: ``decode_attention`` (per codec: stored KV bytes read per step / time / HBM bandwidth),
``weights_gemv`` (the same for the weight reads of a decode step), ``step_overhead_ms`` (fixed time per decode
step), ``prefill_mfu`` and ``decode_mfu`` (achieved fraction of peak dense FLOP/s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvtune.errors import UserError
from kvtune.io import read_yaml

SEED = "kernels.yaml"
USER_FOLDER = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "kvtune" / "calibration"
OPS = ("decode_attention", "weights_gemv", "step_overhead_ms", "prefill_mfu", "decode_mfu")
CODECS = ("fp16", "bf16", "fp8", "int8", "kivi-4", "kivi-2", "lowrank")


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hardware: str = Field(min_length=1)
    op: Literal["decode_attention", "weights_gemv", "step_overhead_ms", "prefill_mfu", "decode_mfu"]
    codec: str | None = None
    efficiency: float | None = Field(None, gt=0.0, le=1.0)
    value: float | None = Field(None, ge=0.0, allow_inf_nan=False)
    source: Literal["measured", "assumed"]
    citation: str = Field(min_length=1)

    @model_validator(mode="after")
    def _one_value(self) -> "Entry":
        if (self.efficiency is None) == (self.value is None):
            raise ValueError("give exactly one of 'efficiency' or 'value'")
        if self.op == "decode_attention" and self.codec not in CODECS:
            raise ValueError(f"decode_attention needs a codec, one of {', '.join(CODECS)}")
        if self.op in ("weights_gemv", "prefill_mfu", "decode_mfu") and not 0 < self.number <= 1:
            raise ValueError(f"{self.op} must be in (0, 1]")
        return self

    @property
    def number(self) -> float:
        return float(self.efficiency if self.efficiency is not None else self.value)  # type: ignore[arg-type]


class Table(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    hbm_copy_gbps: float | None = Field(None, gt=0, allow_inf_nan=False)
    entries: list[Entry] = Field(default_factory=list)


@dataclass(frozen=True)
class Factor:
    """One looked-up factor with its provenance."""

    value: float
    source: str  # "measured" | "assumed"
    citation: str

    def label(self) -> str:
        return f"{self.source}: {self.citation}"


def load_table(path: str | os.PathLike[str]) -> Table:
    data = read_yaml(path)
    try:
        return Table.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "document"
        raise UserError(f"{path}: not a kvtune calibration table (field {loc}: {err['msg']})") from None


def _seed() -> Table:
    ref = resources.files("kvtune.profiles").joinpath("calibration", SEED)
    with resources.as_file(ref) as path:
        return load_table(path)


class Calibration:
    """All entries from the seed plus measured files; :meth:`factor` looks one up for a device."""

    def __init__(self, extra_files: list[str | os.PathLike[str]] | None = None, *, user_folder: Path | None = USER_FOLDER):
        self.entries: list[Entry] = list(_seed().entries)
        self.files: list[str] = []
        found = sorted(user_folder.glob("*.yaml")) if user_folder is not None and user_folder.is_dir() else []
        for path in [*found, *(extra_files or [])]:
            self.entries += load_table(path).entries
            self.files.append(str(path))

    def factor(self, op: str, device_names: tuple[str, ...], codec: str | None = None) -> Factor:
        """The most specific entry for ``op`` (and ``codec``) on a device known by any of ``device_names``."""
        if op not in OPS:
            raise KeyError(op)
        names = tuple(n.lower() for n in device_names if n)

        def rank(e: Entry) -> tuple[int, int] | None:
            if e.op != op or (codec is not None and e.codec != codec):
                return None
            hw = e.hardware.lower()
            if hw == "*":
                specific = 0
            elif any(hw == n or hw in n for n in names):
                specific = 1
            else:
                return None
            return specific, 1 if e.source == "measured" else 0

        ranked = [(r, i, e) for i, e in enumerate(self.entries) if (r := rank(e)) is not None]
        if not ranked:
            raise UserError(f"calibration: no entry for {op}{f' / {codec}' if codec else ''} (not even the seed's)")
        _, _, best = max(ranked, key=lambda t: (t[0], t[1]))  # later files win among equals
        return Factor(best.number, best.source, best.citation)


def codec_keys(method: str) -> tuple[str, ...]:
    """Every calibration codec a codec method may be priced at, whatever its parameters."""
    if method == "kivi":
        return ("kivi-4", "kivi-2")
    if method == "mixed":
        return ("kivi-4", "kivi-2", "int8", "fp8")
    return (method,) if method in CODECS else ("fp16",)


def codec_key(method: str, params: dict[str, Any]) -> str:
    """The calibration codec name of a codec stage (``kivi`` with ``bits: 2`` -> ``kivi-2``)."""
    if method == "kivi":
        return f"kivi-{int(params.get('bits', 4))}"
    if method == "mixed":  # most layers use the middle codec; price the step at its kernel
        middle = str(params.get("middle", "kivi2"))
        return {"kivi4": "kivi-4", "kivi2": "kivi-2"}.get(middle, middle if middle in CODECS else "fp16")
    if method in CODECS:
        return method
    return "fp16"  # unknown/plugin codecs are priced as dense reads (said in the notes by the caller)
