"""Value types shared by the checker and the IR: a kind (float or bool) and an extent.

The extent says how many copies of a value one step computes, and is what lets the
compiler hoist work out of per-element code:

- ``step``: one scalar per step, shared by every parameter (bias corrections, schedules);
- ``leaf``: one scalar per parameter tensor (a reduction such as ``norm(g)``);
- ``row`` and ``col``: one value per row, or per column, of each parameter seen as a
  matrix (Adafactor's factored statistics). A *factored* parameter's rows run along its
  second-largest axis and its columns along its largest, any other axes being a batch;
  a parameter that is not factored is one column (so a ``row`` value is the whole
  tensor, a ``col`` value one number). Which parameters are factored is decided per
  parameter from its shape, at trace time (:func:`factoring`);
- ``tensor``: one value per element of each parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

# Storage dtypes by their spec names (`state nu: bf16 = 0`, `--dtype bf16`).
DTYPES = {"f32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16),
          "f16": np.dtype(np.float16), "f64": np.dtype(np.float64)}

EXTENTS = ("step", "leaf", "row", "col", "tensor")  # ordered, but row and col combine to tensor


@dataclass(frozen=True)
class Type:
    extent: str
    kind: str = "float"  # or "bool"

    def __str__(self) -> str:
        return self.extent if self.kind == "float" else f"bool {self.extent}"


def widest(extents) -> str:
    """The extent of an elementwise combination of values of these extents."""
    extents = set(extents)
    if {"row", "col"} <= extents:
        return "tensor"
    return max(extents, key=EXTENTS.index, default="step")


def fits(extent: str, container: str) -> bool:
    """Whether a value of ``extent`` broadcasts to ``container`` (e.g. leaf into row, not row into col)."""
    return widest((extent, container)) == container


@dataclass(frozen=True)
class Factoring:
    """Which parameters are factored: as ``optax.adafactor``, those with at least two axes whose
    second-largest has at least ``min_dim_size`` elements (when ``enabled``)."""

    enabled: bool
    min_dim_size: float

    def axes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The axes a ``row`` value and a ``col`` value of a parameter of ``shape`` are reduced over."""
        if self.enabled and len(shape) >= 2:
            order = sorted(range(len(shape)), key=lambda axis: (shape[axis], axis))  # as np.argsort
            second, largest = order[-2], order[-1]
            if shape[second] >= self.min_dim_size:
                return (largest,), (second,)
        return (), tuple(range(len(shape)))


NOT_FACTORED = Factoring(False, 0)
