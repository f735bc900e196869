"""Keep each per-element state buffer off its parameter's address modulo 256 MiB (CPU).

A fused step reads and writes ``p``, ``mu`` and ``nu`` in place, element ``i`` of each at
once. When two of those buffers sit at the same address modulo 256 MiB, every access
pair falls in the same memory bank, and on the project's CPU machine the 16M-element
AdamW step ran at 13.4-18.8 ms instead of 8.4-10.4 ms (docs/fusion.md, "Where the
buffers land"). XLA chooses every address, so the optimizer can only look at the
buffers ``init`` got and take another copy of one that landed badly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PERIOD = 1 << 28  # 256 MiB: the alias distance measured to slow the step
MIN_BYTES = 1 << 20  # smaller buffers stay in cache
TRIES = 4


def has_buffer(x) -> bool:
    """``x`` is a concrete ``jax.Array`` (not a tracer, a NumPy array or a shape): its buffers
    exist, so their placement and sharding can be read."""
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """A sharding that holds a whole copy of an array on each device of ``sharding``."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    if len(sharding.device_set) == 1:
        return jax.sharding.SingleDeviceSharding(next(iter(sharding.device_set)))
    devices = np.array(sorted(sharding.device_set, key=lambda d: d.id))
    return jax.sharding.NamedSharding(
        jax.sharding.Mesh(devices, ("devices",)), jax.sharding.PartitionSpec()
    )


def constrain(x, sharding: jax.sharding.Sharding):
    """``x`` laid out by ``sharding`` inside a jitted function, on Auto and Explicit mesh axes
    alike.
    """
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and jax.sharding.AxisType.Explicit in getattr(mesh, "axis_types", ()):
        # with_sharding_constraint refers to Auto axes only
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def address(x) -> int | None:
    """The address of a concrete single-device CPU array of at least MIN_BYTES, else None."""
    if not has_buffer(x) or x.nbytes < MIN_BYTES:
        return None
    devices = x.devices()
    if len(devices) != 1 or next(iter(devices)).platform != "cpu":
        return None
    return x.unsafe_buffer_pointer()


def spread(param, states: list) -> list:
    """``states`` (the state buffers of one parameter, or of one packed group when ``param``
    is None) with any that sits at ``param``'s or an earlier state's address modulo
    :data:`PERIOD` replaced by a copy that does not. Values are unchanged."""
    taken = [a for a in [address(param)] if a is not None]
    spread_out, held = [], []
    for x in states:
        at = address(x)
        for _ in range(TRIES):
            if at is None or all((at - t) % PERIOD for t in taken):
                break
            held.append(x)  # kept alive until we return, so the copy cannot land in its place
            x = jnp.copy(x)
            at = address(x)
        if at is not None:
            taken.append(at)
        spread_out.append(x)
    return spread_out
