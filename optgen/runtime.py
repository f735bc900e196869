"""The optimizer a spec compiles to: optax's ``init``/``update`` protocol, plus a fused ``step``.

Hyperparameters live in the optimizer state as arrays (as with
``optax.inject_hyperparams``), so changing one between steps never recompiles; a
hyperparameter given as a callable is a schedule, evaluated at each step's count.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optgen.codegen.export import state_dtypes
from optgen.codegen.primitive import run_ir
from optgen.compiler import Compiled
from optgen.diagnostics import SpecError, did_you_mean



class OptState(NamedTuple):
    """An optgen optimizer's state: a pytree of arrays, checkpointable with any JAX tool."""

    count: jax.Array  # int32: updates applied so far
    hyperparams: dict[str, jax.Array]  # non-schedule hyperparameters, changeable between steps
    slots: dict[str, Any]  # each spec `state`: a pytree like the parameters (of 0-d arrays for a
    # `leaf` state), or one 0-d array for a `step` state


def step_dtype() -> np.dtype:
    """Per-step scalars are float64 when JAX's x64 mode is on, else float32."""
    return np.dtype(np.float64 if jax.config.jax_enable_x64 else np.float32)


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1``, saturating at the int32 maximum (as ``optax.safe_increment``)."""
    top = jnp.iinfo(count.dtype).max
    return jnp.where(count < top, count + 1, top)


class Optimizer:
    """An optimizer compiled from a spec; use :func:`optgen.load` to make one.

    ``init(params)`` and ``update(grads, state, params)`` follow optax's
    ``GradientTransformation`` protocol, so an Optimizer drops into ``optax.chain``
    and any optax training loop. ``step(params, grads, state)`` returns the new
    parameters directly, in one fused, jitted kernel that donates ``params`` and
    ``state``.
    """

    def __init__(self, compiled: Compiled, hyperparams: dict[str, float | Callable]):
        self.compiled = compiled
        self.name = compiled.checked.name
        self.description = compiled.checked.spec.description
        self.hyperparams = hyperparams
        self.state_names = tuple(name for name, _ in compiled.program.update.outputs[1:])
        self.extents = compiled.program.extents()
        self.step = jax.jit(self._apply, donate_argnums=(0, 2))
        self._init_slots = jax.jit(self._run_init, static_argnums=2)
        self._update = jax.jit(lambda p, g, s: self._apply(p, g, s, as_update=True))

    def __repr__(self) -> str:
        return f"<optgen.Optimizer {self.name} {self.hyperparams}>"

    def init(self, params) -> OptState:
        """Zero count, the hyperparameters, and each state initialized from its spec expression."""
        hypers = {name: jnp.asarray(value, step_dtype()) for name, value in self.hyperparams.items()
                  if not callable(value)}
        leaves, treedef = jax.tree.flatten(params)
        slots = {}
        if self.state_names:
            scalars = {name: self._hyper(name, hypers, jnp.zeros([], jnp.int32)) for name in self.hyperparams}
            concrete = all(isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) for leaf in leaves)
            out = self._init_slots(leaves, scalars, tuple(leaf.sharding for leaf in leaves) if concrete else None)
            slots = {name: self._slot(out[name], name, treedef) for name in self.state_names}
        return OptState(jnp.zeros([], jnp.int32), hypers, slots)

    def _slot(self, arrays: list, name: str, treedef):
        """A state's outputs as stored: one array for a per-step state, else a pytree like the parameters."""
        return arrays[0] if self.extents[name] == "step" else treedef.unflatten(arrays)

    def _run_init(self, leaves, scalars, shardings):
        out = run_ir(self.compiled.program.init, {"p": leaves}, scalars, self._out_dtypes(leaves, states=True),
                     out_extents=self.extents, factoring=self.compiled.program.factoring)
        if shardings is None:
            return out
        # Each per-element state is laid out like its parameter (sharded the same way), not gathered.
        return {name: [jax.lax.with_sharding_constraint(x, sharding) for x, sharding in zip(xs, shardings, strict=True)]
                if self.extents[name] == "tensor" else xs for name, xs in out.items()}

    def update(self, updates, state: OptState, params=None):
        """optax protocol: gradients in, ``(updates, new_state)`` out; apply with ``optax.apply_updates``."""
        if params is None:
            raise SpecError(f"{self.name}.update needs params",
                            hint="call update(grads, state, params), as optax does for AdamW")
        return self._update(params, updates, state)

    def _apply(self, params, grads, state: OptState, as_update: bool = False):
        leaves, treedef = jax.tree.flatten(params)
        count = safe_increment(state.count)
        if not leaves:
            return params, OptState(count, state.hyperparams, state.slots)
        tensors = {"p": leaves, "g": treedef.flatten_up_to(grads)}
        tensors |= {name: treedef.flatten_up_to(state.slots[name]) for name in self.state_names
                    if self.extents[name] != "step"}
        scalars = {"t": count.astype(step_dtype())}
        scalars |= {name: self._hyper(name, state.hyperparams, state.count) for name in self.hyperparams}
        scalars |= {name: state.slots[name] for name in self.state_names if self.extents[name] == "step"}
        out = run_ir(self.compiled.program.update, tensors, scalars, self._out_dtypes(leaves),
                     delta_output="p" if as_update else None, out_extents=self.extents,
                     factoring=self.compiled.program.factoring)
        slots = {name: self._slot(out[name], name, treedef) for name in self.state_names}
        return treedef.unflatten(out["p"]), OptState(count, state.hyperparams, slots)

    def _hyper(self, name: str, stored: dict, count: jax.Array) -> jax.Array:
        value = self.hyperparams[name]
        # Schedules see the count before this step's increment, as optax's do.
        value = value(count) if callable(value) else stored[name]
        return jnp.asarray(value).astype(step_dtype())

    def _out_dtypes(self, leaves, states: bool = False) -> dict[str, list[np.dtype]]:
        program = self.compiled.program
        per_leaf = [state_dtypes(program, leaf.dtype, step_dtype()) for leaf in leaves]
        shared = state_dtypes(program, step_dtype(), step_dtype())  # per-step states: one scalar
        dtypes = {name: [shared[name]] if self.extents[name] == "step" else [d[name] for d in per_leaf]
                  for name in self.state_names}
        return dtypes if states else {"p": [leaf.dtype for leaf in leaves]} | dtypes


def split_kwargs(compiled_options: dict[str, bool], hyper_defaults: dict[str, float], spec_name: str,
                 kwargs: dict[str, Any]) -> tuple[dict, dict]:
    """Sort ``optgen.load`` keyword arguments into options and hyperparameters."""
    options, hypers = {}, dict(hyper_defaults)
    for key, value in kwargs.items():
        if key in compiled_options:
            options[key] = value
        elif key in hyper_defaults:
            hypers[key] = value
        else:
            known = [*hyper_defaults, *compiled_options]
            raise SpecError(f"'{spec_name}' has no hyperparameter or option '{key}'",
                            hint=did_you_mean(key, known) or f"it takes: {', '.join(known)}")
    return options, hypers
