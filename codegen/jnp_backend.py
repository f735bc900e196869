"""The IR evaluated with ``jax.numpy``: the plain path that JAX transformations take.

The fused step is a primitive whose lowering emits StableHLO directly, which JAX cannot
differentiate or batch. Under ``jax.jvp``/``jax.grad``/``jax.vmap`` the primitive's rules
(:mod:`codegen.primitive`) run the same IR through the shared evaluator with this
backend instead: ordinary jnp ops, which JAX knows how to transform. Each op means what
it means in :data:`codegen.interpret.NUMPY_OPS`, its NumPy twin of the same name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from optgen.codegen.interpret import NUMPY_OPS, NumpyBackend

# Ops whose NumPy meaning is a lambda have no jnp function of the same name.
_UNNAMED = {
    "rsqrt": jax.lax.rsqrt,
    "bf16": lambda x: x.astype(jnp.bfloat16).astype(x.dtype),
}


def _jnp_twin(opcode: str, numpy_fn):
    if opcode in _UNNAMED:
        return _UNNAMED[opcode]
    return getattr(jnp, numpy_fn.__name__)  # an AttributeError here: add the op to _UNNAMED


JAX_OPS = {opcode: _jnp_twin(opcode, fn) for opcode, fn in NUMPY_OPS.items()}


class JnpBackend(NumpyBackend):
    def round_to(self, x, dtype):
        # one reduce_precision, as codegen/stablehlo.py emits (XLA's GPU pipelines keep it)
        if dtype == jnp.bfloat16:
            return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
        return super().round_to(x, dtype)


def jnp_backend() -> NumpyBackend:
    """A backend for :func:`codegen.evaluate.evaluate` that computes with jnp."""
    return JnpBackend(jnp, JAX_OPS)
