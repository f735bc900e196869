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
- ``tensor``: one value per element of each parameter;
- ``cr``, ``rr``, ``cc``: for a parameter seen as a matrix (its last two axes are rows and
  columns, any leading axes a batch), one value per (column, row), (row, row) or
  (column, column) pair: the transpose ``transpose(g)`` is ``cr``, the Gram matrix
  ``g @ transpose(g)`` is ``rr``. A ``tensor`` is then ``rc``. Matrix products follow the
  axes: ``rr @ tensor`` is a ``tensor``, ``cr @ tensor`` is ``cc``
  (:func:`matmul_extent`). Values of different matrix extents do not combine elementwise.
  A state may be ``rr`` or ``cc`` (Shampoo's statistics), stored as such per matrix (one
  unused number for a parameter of fewer than two axes, which never takes a matrix branch);
- ``axes``: one value per slice of each axis of the parameter (for a parameter of shape
  (d1, ..., dn), d1 values along axis 1, ..., dn along axis n: SM3's statistics, a cover of
  the elements by the slices through them). It is stored as one vector of d1 + ... + dn
  values (one value for a 0-d parameter, its only slice), and combines elementwise only with
  itself and with per-step and per-leaf scalars; ``axis_max`` makes one from a tensor and
  ``axis_min`` reads one back per element.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

# Storage dtypes by their spec names (`state nu: bf16 = 0`, `--dtype bf16`).
DTYPES = {
    "f32": np.dtype(np.float32),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "f16": np.dtype(np.float16),
    "f64": np.dtype(np.float64),
}
# State-only storage: block-wise 8-bit (codegen/quantize.py), int8 codes and per-block scales.
STATE_DTYPES = DTYPES | {"q8": np.dtype(np.int8)}

EXTENTS = ("step", "leaf", "row", "col", "tensor", "axes", "cr", "rr", "cc")
# The shapes a state may be declared with: a Gram-shaped state (Shampoo's statistics) is square.
STATE_EXTENTS = (*EXTENTS[:6], "rr", "cc")
# Extents whose values combine elementwise only with themselves and with scalars.
SEPARATE_EXTENTS = ("axes", "cr", "rr", "cc")
# The axes of each matrix extent: (rows of the value, columns of the value), in the parameter's
# axes.
MATRIX_AXES = {"tensor": ("r", "c"), "cr": ("c", "r"), "rr": ("r", "r"), "cc": ("c", "c")}
_BY_AXES = {axes: extent for extent, axes in MATRIX_AXES.items()}
SCALAR_EXTENTS = ("step", "leaf")


class ExtentError(ValueError):
    """Values whose extents do not combine (a Gram matrix and a tensor, or a bad matrix product)."""


@dataclass(frozen=True)
class Type:
    extent: str
    kind: str = "float"  # or "bool"

    def __str__(self) -> str:
        return self.extent if self.kind == "float" else f"bool {self.extent}"


def widest(extents) -> str:
    """The extent of an elementwise combination of values of these extents (ExtentError if none).

    ``step`` < ``leaf`` < ``row``, ``col`` < ``tensor``, and a ``row`` and a ``col`` value
    combine to a ``tensor``; a matrix extent (``cr``, ``rr``, ``cc``) and ``axes`` combine
    only with themselves and with per-step and per-leaf scalars."""
    extents = set(extents)
    separate = extents & set(SEPARATE_EXTENTS)
    if separate:
        if len(separate) > 1 or extents - separate - set(SCALAR_EXTENTS):
            raise ExtentError(
                f"values of extents {', '.join(sorted(extents, key=EXTENTS.index))} do not combine"
            )
        return separate.pop()
    if {"row", "col"} <= extents:
        return "tensor"
    return max(extents, key=EXTENTS.index, default="step")


def matmul_extent(left: str, right: str) -> str:
    """The extent of ``left @ right``: (a, b) @ (b, c) is (a, c); scalars and row/col
    values refuse.
    """
    if left not in MATRIX_AXES or right not in MATRIX_AXES:
        raise ExtentError(f"a matrix product takes matrices, got {left} @ {right}")
    (a, b), (b2, c) = MATRIX_AXES[left], MATRIX_AXES[right]
    if b != b2:
        raise ExtentError(
            f"a matrix product's inner axes differ: {left} @ {right} is {a}{b} @ {b2}{c}"
        )
    return _BY_AXES[(a, c)]


def transpose_extent(extent: str) -> str:
    """The extent of ``transpose(x)``: its two matrix axes swapped."""
    if extent not in MATRIX_AXES:
        raise ExtentError(f"transpose takes a matrix, got a {extent} value")
    a, b = MATRIX_AXES[extent]
    return _BY_AXES[(b, a)]


def square_extent(extent: str) -> str:
    """The extent of ``eye(x)``: x's, which must be square (``rr`` or ``cc``)."""
    if extent not in ("rr", "cc"):
        raise ExtentError(
            f"eye takes a square matrix (a Gram matrix such as x @ transpose(x)), got a {extent} "
            "value"
        )
    return extent


def fits(extent: str, container: str) -> bool:
    """Whether a value of ``extent`` broadcasts to ``container`` (e.g. leaf into row, not row into
    col).
    """
    try:
        return widest((extent, container)) == container
    except ExtentError:
        return False


@dataclass(frozen=True)
class Factoring:
    """Which parameters are factored: as ``optax.adafactor``, those with at least two axes whose
    second-largest has at least ``min_dim_size`` elements (when ``enabled``)."""

    enabled: bool
    min_dim_size: float

    def axes(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The axes a ``row`` value and a ``col`` value of a parameter of ``shape`` are reduced
        over.
        """
        if self.enabled and len(shape) >= 2:
            order = sorted(range(len(shape)), key=lambda axis: (shape[axis], axis))  # as np.argsort
            second, largest = order[-2], order[-1]
            if shape[second] >= self.min_dim_size:
                return (largest,), (second,)
        return (), tuple(range(len(shape)))


NOT_FACTORED = Factoring(False, 0)


def stored_shape(shape: tuple, extent: str, factoring: Factoring) -> tuple:
    """The shape a per-parameter value of ``extent`` is stored with, for a parameter of ``shape``:
    a ``row`` or ``col`` value without the axes it reduces (as optax stores Adafactor's ``v_row``
    and ``v_col``), an ``axes`` value as one vector of its per-axis statistics end to end, a
    matrix-shaped value (``rr``: rows x rows) after the parameter's batch axes, or as one unused
    number for a parameter of fewer than two axes (which never takes a matrix branch), a scalar
    as 0-d; a ``tensor`` as the parameter. (``shape`` may hold symbolic sizes.)"""
    if extent in SCALAR_EXTENTS:
        return ()
    if extent == "axes":
        return (sum(shape),) if shape else (1,)
    # a parameter that is no matrix keeps one unused number
    if extent in MATRIX_AXES and extent != "tensor":
        if len(shape) < 2:
            return ()
        sizes = {"r": shape[-2], "c": shape[-1]}
        return (*shape[:-2], *(sizes[axis] for axis in MATRIX_AXES[extent]))
    reduced = dict(zip(("row", "col"), factoring.axes(tuple(shape)), strict=True)).get(extent, ())
    return tuple(size for axis, size in enumerate(shape) if axis not in reduced)
