"""Stochastic rounding of float32 values stored in bfloat16, from a counter-based hash.

Round-to-nearest drops every update smaller than half a bfloat16 ulp of the value it is
added to: a bf16 parameter of 1.0 (ulp 2^-7) never moves under steps of 1e-3. Stochastic
rounding keeps them in expectation. For a float32 ``x`` between the neighbouring bf16
values ``lo <= x < hi``,

    round(x) = hi  with probability (x - lo) / (hi - lo),  else lo,   so  E[round(x)] = x.

It is computed on the bits: a float32's top 16 bits are its bfloat16 truncation, so adding
16 uniform random bits ``r`` to the bit pattern and clearing the low 16 carries into the
kept part with exactly that probability (for either sign: the bits are sign and
magnitude). NaN is stored as round-to-nearest stores it.

The random bits are a hash of (step ``t``, parameter, output, element index): no state,
and every lowering (XLA's loops, optgen's own CPU loop, the NumPy and jnp evaluators)
computes the same bits, so they round alike. The hash is ``lowbias32`` (Chris Wellons'
integer hash search), two multiplies and three xor-shifts of uint32.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_U32 = np.dtype(np.uint32)
# lowbias32's constants, and two odd constants (golden ratio, murmur3's) that spread the
# parameter and output numbers over the key's bits.
_MIX = (0x7FEB352D, 0x846CA68B)
_LEAF, _OUTPUT = 0x9E3779B9, 0x85EBCA6B


def applies(backend, x, dtype) -> bool:
    """Whether storing ``x`` in ``dtype`` rounds stochastically: float32 values into bfloat16."""
    return np.dtype(dtype) == BFLOAT16 and backend.dtype_of(x) == np.dtype(np.float32)


def key(backend, t, leaf, output: int):
    """The per-(step, parameter, output) key: a uint32 scalar. ``t`` is the step number (a
    float scalar holding an integer), ``leaf`` the parameter's number (a uint32 scalar)."""
    step = _mix(backend, backend.convert(t, _U32))
    mixed = _int(backend, "mul", leaf, _const(backend, _LEAF, leaf))
    mixed = _int(backend, "xor", mixed, _const(backend, output * _OUTPUT % 2**32, leaf))
    return _mix(backend, _int(backend, "xor", step, mixed))


def round_to_bfloat16(backend, x, seed):
    """``x`` (float32) stored in bfloat16 with stochastic rounding; ``seed`` from :func:`key`."""
    index = backend.element_index(x)
    bits = _mix(backend, _int(backend, "add", index, backend.broadcast(seed, index)))
    noise = _int(backend, "and", bits, _const(backend, 0xFFFF, bits))
    raised = _int(backend, "add", backend.bitcast(x, _U32), noise)
    kept = _int(backend, "and", raised, _const(backend, 0xFFFF0000, raised))
    rounded = backend.bitcast(kept, np.float32)  # exactly a bfloat16 value: the convert is exact
    rounded = backend.apply("select", [backend.apply("ne", [x, x]), x, rounded])
    return backend.convert(rounded, BFLOAT16)


def _mix(backend, x):
    """lowbias32: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16."""
    for shift, factor in ((16, _MIX[0]), (15, _MIX[1]), (16, None)):
        x = _int(backend, "xor", x, _int(backend, "shr", x, _const(backend, shift, x)))
        if factor is not None:
            x = _int(backend, "mul", x, _const(backend, factor, x))
    return x


def _int(backend, opcode: str, x, y):
    return backend.integer(opcode, [x, y])


def _const(backend, value: int, like):
    constant = backend.constant(value, _U32)
    return constant if backend.shape_of(like) == () else backend.broadcast(constant, like)
