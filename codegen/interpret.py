"""The reference interpreter: runs IR with NumPy, in any float dtype (float64 included).

It is the oracle for pass tests (same numbers before and after a pass) and for
codegen tests (StableHLO through XLA against float64 NumPy).
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import numpy as np

from optgen.codegen.evaluate import evaluate
from optgen.ir import Function
from optgen.ops import OPS
from optgen.types import NOT_FACTORED, Factoring

class NumpyBackend:
    """Backend for :func:`codegen.evaluate.evaluate` over NumPy arrays."""

    def at(self, loc):
        return contextlib.nullcontext()

    def dtype_of(self, x) -> np.dtype:
        return np.asarray(x).dtype

    def constant(self, value, dtype):
        return np.asarray(value, dtype=bool if isinstance(value, bool) else dtype)

    def apply(self, opcode, operands):
        with np.errstate(all="ignore"):  # inf and nan follow IEEE, as on XLA
            return np.asarray(OPS[opcode].numpy(*operands))

    def convert(self, x, dtype):
        return np.asarray(x).astype(dtype)

    def broadcast(self, x, like):
        return np.broadcast_to(x, np.shape(like))

    def broadcast_to(self, x, shape):
        return np.broadcast_to(x, shape)

    def reshape(self, x, shape):
        return np.reshape(x, shape)

    def shape_of(self, x):
        return np.shape(x)

    def reduce_sum(self, x):
        return np.sum(x, dtype=np.asarray(x).dtype)

    def mean(self, x, axes):
        return np.mean(x, axis=axes, keepdims=True, dtype=np.asarray(x).dtype) if axes else x

    def reduce_max(self, x, axes):
        return np.max(x, axis=axes, keepdims=True) if axes else x

    def size(self, x, dtype):
        return np.asarray(np.size(x), dtype=dtype)

    def barrier(self, xs):
        return list(xs)

    def matmul(self, x, y):
        with np.errstate(all="ignore"):
            return np.matmul(x, y)

    def transpose(self, x):
        return np.swapaxes(x, -1, -2)

    def dim(self, x, axis, dtype):
        return np.asarray(np.shape(x)[axis], dtype=dtype)


def interpret(func: Function, tensors: Mapping[str, Sequence[np.ndarray]], scalars: Mapping[str, float],
              dtype=np.float64, delta_output: str | None = None,
              factoring: Factoring = NOT_FACTORED, out_extents: dict[str, str] | None = None,
              ) -> dict[str, list[np.ndarray]]:
    """Run ``func`` with every value computed in ``dtype``; outputs are returned in ``dtype`` too.

    ``tensors`` maps each tensor input (``p``, ``g``, states) to one array per
    parameter; ``scalars`` maps ``t`` and each hyperparameter to a number. ``out_extents``
    and ``factoring`` as in :func:`codegen.evaluate.evaluate` (by default every output is
    stored per element).
    """
    dtype = np.dtype(dtype)
    tensors = {k: [np.asarray(x, dtype) for x in v] for k, v in tensors.items()}
    out_dtypes = {name: [dtype] * len(tensors["p"]) for name, _ in func.outputs}
    return evaluate(func, NumpyBackend(), tensors, dict(scalars), dtype, out_dtypes, delta_output,
                    out_extents=out_extents, factoring=factoring)
