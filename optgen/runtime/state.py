"""The optimizer state: a plain NamedTuple pytree, shaped like the parameters where the spec says
so.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class OptState(NamedTuple):
    """An optgen optimizer's state: a registered pytree of arrays that any JAX tool can store,
    restore, reshard, serialize and ``jax.tree.map`` against the parameters.

    Nothing in it depends on the tree definition or the devices it was made on: ``slots``
    holds, for each spec ``state``, a pytree shaped like the parameters (of 0-d arrays for
    a ``leaf`` state, of reduced shapes for ``row``/``col``), or one 0-d array for a
    ``step`` state.
    """

    # int32: calls of update/step so far (with skip_nonfinite or accumulation, not all update p)
    count: jax.Array
    # the hyperparameters given as numbers: changeable between steps
    hyperparams: dict[str, jax.Array]
    slots: dict[str, Any]


def step_dtype() -> np.dtype:
    """Per-step scalars are float64 when JAX's x64 mode is on, else float32."""
    return np.dtype(np.float64 if jax.config.jax_enable_x64 else np.float32)


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the int32 maximum (as ``optax.safe_increment``)."""
    top = jnp.iinfo(count.dtype).max
    return jnp.where(count < top, count + 1, top)
