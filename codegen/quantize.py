"""Block-wise 8-bit state (``state mu: q8 = 0``): its code, and quantizing in jnp.

A ``q8`` state of a parameter with ``n >= MIN_ELEMENTS`` elements is stored as a
:class:`Quantized` pair of plain arrays: ``codes`` (int8, shaped like the parameter) and
``scales`` (float32, one per block of :data:`BLOCK` consecutive elements of the raveled
parameter, the last block possibly shorter). With ``s`` a block's absmax, ``L = 127``:

.. math::

    c = \\operatorname{sign}(x)\\,\\operatorname{rint}\\big(L\\,(|x| / s)^{1/4}\\big),
    \\qquad x \\approx \\operatorname{sign}(c)\\, s\\, (|c| / L)^{4}

a *power-4 code*: like bitsandbytes' and torchao's dynamic (tree) code it resolves values
down to ``s * 3.8e-9`` (the dynamic code: about ``s * 1e-7``), which the second moment of
Adam needs (a linear code rounds every ``nu < s / 254`` to 0, and ``m / (sqrt(0) + eps)``
explodes), but both directions are closed forms (two square roots, three products) that
vectorize, where the dynamic code needs a binary search per element. docs/quantized.md
has the convergence and speed measured against a linear code.

Smaller parameters keep their state in float32 (as bitsandbytes does below 4096 elements):
their bytes do not matter and a block of a few elements would cost 4 bytes of scale each.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 256  # elements per scale, as bitsandbytes' and torchao's 8-bit optimizers
MIN_ELEMENTS = 4096  # parameters below this keep a q8 state in float32 (bitsandbytes' rule)
LEVELS = 127  # codes in [-127, 127]: symmetric, so the sign costs one bit and 0 is exact
INVERSE_LEVELS = np.float32(1 / LEVELS)  # a product, not a division: the same in every lowering
Q8 = np.dtype(np.int8)  # a q8 state's dtype where the compiler passes storage dtypes


class Quantized(NamedTuple):
    """One parameter's q8 state: int8 ``codes`` shaped like the parameter and one float32
    absmax per block of :data:`BLOCK` elements (a registered pytree of two plain arrays)."""

    codes: jax.Array
    scales: jax.Array


def blocks(size: int) -> int:
    """The number of scales of a parameter with ``size`` elements."""
    return -(-size // BLOCK)


def storage(declared: np.dtype, size: int) -> np.dtype:
    """A state's storage dtype for one parameter: ``Q8`` only where it is declared and the
    parameter is large enough, float32 for a small parameter's q8 state, else as declared."""
    if declared != Q8:
        return declared
    return Q8 if size >= MIN_ELEMENTS else np.dtype(np.float32)


def _as_blocks(x: jax.Array) -> jax.Array:
    flat = jnp.ravel(x)
    count = blocks(flat.size)
    return jnp.pad(flat, (0, count * BLOCK - flat.size)).reshape(count, BLOCK)


def dequantize(q: Quantized) -> jax.Array:
    """float32 values of ``q`` (shaped like its codes)."""
    f = _as_blocks(q.codes).astype(jnp.float32) * INVERSE_LEVELS
    square = f * f
    x = jnp.copysign(square * square * q.scales[:, None], f)
    return x.reshape(-1)[: q.codes.size].reshape(q.codes.shape)


def quantize(x: jax.Array) -> Quantized:
    """``x`` (float32) as codes and per-block absmax scales; a NaN or inf in a block shows in
    its scale (the codes of such a block are 0 or the largest)."""
    values = _as_blocks(x.astype(jnp.float32))
    # The absmax as an integer max of |x|'s bits: they order like |x| with NaN above inf, so a
    # NaN stays in its block's scale (XLA:CPU's float max reduction may drop it).
    bits = jax.lax.bitcast_convert_type(values, jnp.int32) & 0x7FFFFFFF
    scales = jax.lax.bitcast_convert_type(jnp.max(bits, axis=1), jnp.float32)
    s = scales[:, None]
    y = jnp.abs(values) * jnp.where(s > 0, 1 / s, 0.0)  # one division per block
    y = jnp.where(y <= 1, y, 1.0)
    magnitude = jnp.round(LEVELS * jnp.sqrt(jnp.sqrt(y)))
    codes = jnp.copysign(magnitude, values).astype(jnp.int8)
    return Quantized(codes.reshape(-1)[: x.size].reshape(x.shape), scales)


def thresholds() -> np.ndarray:
    """The code's decision points: ``T[k - 1]``, k = 1..127, the least float32 ``y`` in [0, 1]
    whose code ``rint(127 * sqrt(sqrt(y)))`` (each operation rounded to float32) is k. Each
    rounded operation is monotone, so the code never decreases as ``y`` grows and a bisection
    over ``y``'s bits finds each; they lie up to 7 ulps from ``((k - 1/2) / 127)^4``."""

    def code(bits: int) -> int:
        y = np.asarray([bits], np.uint32).view(np.float32)
        return int(np.rint(np.float32(LEVELS) * np.sqrt(np.sqrt(y)))[0])

    found = []
    for k in range(1, LEVELS + 1):
        low, high = 0, 0x3F800000  # code(low) < k <= code(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if code(middle) >= k else (middle, high)
        found.append(high)
    return np.asarray(found, np.uint32).view(np.float32)
