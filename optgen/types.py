"""Value types shared by the checker and the IR: a kind (float or bool) and an extent.

The extent says how many copies of a value one step computes, and is what lets the
compiler hoist work out of per-element code:

- ``step``: one scalar per step, shared by every parameter (bias corrections, schedules);
- ``leaf``: one scalar per parameter tensor (a reduction such as ``norm(g)``);
- ``tensor``: one value per element of each parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

# Storage dtypes by their spec names (`state nu: bf16 = 0`, `--dtype bf16`).
DTYPES = {"f32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16),
          "f16": np.dtype(np.float16), "f64": np.dtype(np.float64)}

EXTENTS = ("step", "leaf", "tensor")  # ordered: combining values takes the widest


@dataclass(frozen=True)
class Type:
    extent: str
    kind: str = "float"  # or "bool"

    def __str__(self) -> str:
        return self.extent if self.kind == "float" else f"bool {self.extent}"


def widest(extents) -> str:
    """The extent of an elementwise combination of values of these extents."""
    return max(extents, key=EXTENTS.index, default="step")
