"""The reference interpreter: runs IR with NumPy, in any float dtype (float64 included).

It is the oracle for pass tests (same numbers before and after a pass) and for
codegen tests (StableHLO through XLA against float64 NumPy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import numpy as np
from optgen.codegen.evaluate import evaluate

from optgen.ir import Function
from optgen.ops import OPS
from optgen.types import NOT_FACTORED, Factoring

# The meaning of every elementwise IR op on NumPy values: the op table's NumPy column.
NUMPY_OPS = {name: op.numpy for name, op in OPS.items() if op.numpy is not None}
# uint32 arithmetic (stochastic rounding's hash, codegen/rounding.py), wrapping as on XLA.
INTEGER_OPS = {
    "add": "add",
    "mul": "multiply",
    "xor": "bitwise_xor",
    "and": "bitwise_and",
    "shr": "right_shift",
}


class NumpyBackend:
    """Backend for :func:`codegen.evaluate.evaluate` over NumPy arrays.

    With ``xp=jax.numpy`` and ``ops=JAX_OPS`` (:mod:`codegen.jnp_backend`) the same
    code evaluates the IR with jnp: the plain path that JAX transformations take.
    """

    def __init__(self, xp=np, ops=NUMPY_OPS):
        self.xp, self.ops = xp, ops

    def at(self, loc):
        return contextlib.nullcontext()

    def dtype_of(self, x) -> np.dtype:
        return np.dtype(self.xp.asarray(x).dtype)

    def constant(self, value, dtype):
        return self.xp.asarray(value, dtype=bool if isinstance(value, bool) else dtype)

    def apply(self, opcode, operands):
        with np.errstate(all="ignore"):  # inf and nan follow IEEE, as on XLA
            return self.xp.asarray(self.ops[opcode](*operands))

    def convert(self, x, dtype):
        return self.xp.asarray(x).astype(dtype)

    def round_to(self, x, dtype):
        """``x`` rounded to ``dtype`` (to nearest, ties to even), kept in its own dtype."""
        return self.convert(self.convert(x, dtype), self.dtype_of(x))

    def broadcast(self, x, like):
        return self.xp.broadcast_to(x, self.xp.shape(like))

    def broadcast_to(self, x, shape):
        return self.xp.broadcast_to(x, shape)

    def reshape(self, x, shape):
        return self.xp.reshape(x, shape)

    def shape_of(self, x):
        return tuple(self.xp.shape(x))

    def slice(self, x, start, stop):
        return x[start:stop]

    def concatenate(self, xs):
        return self.xp.concatenate(xs)

    def reduce_sum(self, x):
        return self.xp.sum(x, dtype=self.xp.asarray(x).dtype)

    def mean(self, x, axes):
        return (
            self.xp.mean(x, axis=axes, keepdims=True, dtype=self.xp.asarray(x).dtype) if axes else x
        )

    def reduce_max(self, x, axes):
        return self.xp.max(x, axis=axes, keepdims=True) if axes else x

    def size(self, x, dtype):
        return self.xp.asarray(self.xp.size(x), dtype=dtype)

    def barrier(self, xs):
        return list(xs)

    def matmul(self, x, y):
        with np.errstate(all="ignore"):
            return self.xp.matmul(x, y)

    def transpose(self, x):
        return self.xp.swapaxes(x, -1, -2)

    def dim(self, x, axis, dtype):
        return self.xp.asarray(self.xp.shape(x)[axis], dtype=dtype)

    def integer(self, opcode, operands):
        with np.errstate(all="ignore"):
            return self.xp.asarray(getattr(self.xp, INTEGER_OPS[opcode])(*operands))

    def bitcast(self, x, dtype):
        return self.xp.asarray(x).view(dtype)

    def element_index(self, x):
        """Each element's position in ``x`` read in row-major order, as uint32."""
        shape = self.xp.shape(x)
        return self.xp.reshape(self.xp.arange(int(np.prod(shape)), dtype=np.uint32), shape)


def interpret(
    func: Function,
    tensors: Mapping[str, Sequence[np.ndarray]],
    scalars: Mapping[str, float],
    dtype=np.float64,
    delta_output: str | None = None,
    factoring: Factoring = NOT_FACTORED,
    out_extents: dict[str, str] | None = None,
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
    return evaluate(
        func,
        NumpyBackend(),
        tensors,
        dict(scalars),
        dtype,
        out_dtypes,
        delta_output,
        out_extents=out_extents,
        factoring=factoring,
    )
