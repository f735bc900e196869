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

from optgen import packing, placement
from optgen.codegen.export import state_dtypes
from optgen.codegen.primitive import run_ir
from optgen.compiler import Compiled
from optgen.config import get_config
from optgen.diagnostics import InputError, did_you_mean
from optgen.transforms import DEFAULTS as TRANSFORM_OPTIONS, Variant
from optgen.validate import InputChecker, check_params



class OptState(NamedTuple):
    """An optgen optimizer's state: a pytree of arrays, checkpointable with any JAX tool."""

    count: jax.Array  # int32: calls of update/step so far (with skip_nonfinite or accumulation, not all update p)
    hyperparams: dict[str, jax.Array]  # non-schedule hyperparameters, changeable between steps
    # Each spec `state`: a pytree shaped like the parameters (of 0-d arrays for a `leaf` state),
    # one 0-d array for a `step` state, or, where small parameters' per-element state is packed
    # into flat buffers, a packing.PackedState (`.tree()` is the parameter-shaped pytree).
    slots: dict[str, Any]


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

    def __init__(self, compiled: Compiled, hyperparams: dict[str, float | Callable], variant: Variant = Variant()):
        self.compiled = compiled
        self.name = compiled.checked.name
        self.description = compiled.checked.spec.description
        self.hyperparams = hyperparams
        self.variant = variant  # the options applied as transforms (clipnorm, use_ema, ...)
        self.state_names = tuple(name for name, _ in compiled.program.init.outputs)  # read-only ones too
        self.extents = compiled.program.extents()
        self._inputs = InputChecker(self)  # wrong inputs raise InputError before anything is donated
        self.step = self._inputs.guard(jax.jit(self._apply, donate_argnums=(0, 2)))
        self._initialize = jax.jit(self._run_init, static_argnums=(2, 3))
        self._update = self._inputs.guard(jax.jit(lambda p, g, s, i: self._apply(p, g, s, i, as_update=True)))
        self._outputs = jax.jit(self._run_outputs)

    def __repr__(self) -> str:
        return f"<optgen.Optimizer {self.name} {self.hyperparams}>"

    def init(self, params) -> OptState:
        """Zero count, the hyperparameters, and each state initialized from its spec expression."""
        check_params(params)
        hypers = {name: value for name, value in self.hyperparams.items() if not callable(value)}
        leaves, treedef = jax.tree.flatten(params)
        concrete = all(placement.has_buffer(leaf) for leaf in leaves)
        layout = packing.plan(self.compiled.program, leaves)
        shardings = tuple(leaf.sharding for leaf in leaves) if concrete else None
        count, hypers, out = self._initialize(leaves, hypers, shardings, layout)
        if concrete:
            self._spread(out, leaves, layout)
        slots = {name: self._slot(out[name], name, layout, treedef) for name in self.state_names}
        return OptState(count, hypers, slots)

    def _spread(self, out: dict, leaves: list, layout: packing.Layout) -> None:
        """Move any per-element state that landed on its parameter's address modulo 256 MiB
        (``placement``): such a pair made the fused step up to 1.8x slower on CPU."""
        names = [name for name in self.state_names if self.extents[name] == "tensor"]
        for u, unit in enumerate(layout.units):
            param = leaves[unit[0]] if len(unit) == 1 else None
            for name, x in zip(names, placement.spread(param, [out[name][u] for name in names]), strict=True):
                out[name][u] = x

    def _slot(self, arrays: list, name: str, layout: packing.Layout, treedef):
        """A state's outputs as stored: one array for a per-step state; else per parameter, packed by ``layout``."""
        return arrays[0] if self.extents[name] == "step" else packing.wrap(layout, treedef, arrays)

    def _run_init(self, leaves, hypers, shardings, layout):
        # count and the hyperparameters come out of this jitted function, placed as step's
        # outputs will be: created outside it they would be uncommitted, and the second
        # step (given step's committed outputs) would compile the step once more.
        count = jnp.zeros([], jnp.int32)
        hypers = {name: self._hyper(name, hypers, count) for name in hypers}
        if not self.state_names:
            return count, hypers, {}
        scalars = {name: self._hyper(name, hypers, count) for name in self.hyperparams}
        units = layout.pack(leaves)
        out = run_ir(self.compiled.program.init, {"p": units}, scalars, self._out_dtypes(units, states=True),
                     out_extents=self.extents, factoring=self.compiled.program.factoring)
        if shardings is None:
            return count, hypers, out
        # Each per-element state is laid out like its parameter (sharded the same way), not gathered.
        return count, hypers, {name: [jax.lax.with_sharding_constraint(x, shardings[unit[0]])
                                      for x, unit in zip(xs, layout.units, strict=True)]
                               if self.extents[name] == "tensor" else xs for name, xs in out.items()}

    def update(self, updates, state: OptState, params=None, **inputs):
        """optax protocol: gradients in, ``(updates, new_state)`` out; apply with ``optax.apply_updates``.
        A spec's ``input`` declarations arrive as keyword arguments: ``update(g, s, p, hessian=h)``."""
        if params is None:
            raise InputError(f"{self.name}.update needs params",
                             hint="call update(grads, state, params), as optax does for AdamW", code="E301")
        return self._update(params, updates, state, **inputs)

    def _apply(self, params, grads, state: OptState, inputs=None, as_update: bool = False):
        inputs = inputs or {}
        self._inputs.check(params, grads, state, inputs)  # while tracing: structure only, no per-step cost
        leaves, treedef = jax.tree.flatten(params)
        count = safe_increment(state.count)
        if not leaves:
            return params, OptState(count, state.hyperparams, state.slots)
        per_parameter = [name for name in self.state_names if self.extents[name] != "step"]
        layout = packing.layout_of({name: state.slots[name] for name in per_parameter}, leaves)
        units = layout.pack(leaves)
        # Per-leaf inputs (the weight-decay mask) come with leaf ops, so their specs are never packed.
        tensors = {"p": units, "g": layout.pack(treedef.flatten_up_to(grads))} | self.variant.leaf_inputs(params)
        tensors |= {name: packing.units_of(state.slots[name], treedef) for name in per_parameter}
        tensors |= {name: layout.pack(treedef.flatten_up_to(tree)) for name, tree in inputs.items()}
        scalars = {"t": count.astype(step_dtype())}
        scalars |= {name: self._hyper(name, state.hyperparams, state.count) for name in self.hyperparams}
        scalars |= {name: state.slots[name] for name in self.state_names if self.extents[name] == "step"}
        out = run_ir(self.compiled.program.update, tensors, scalars, self._out_dtypes(units),
                     delta_output="p" if as_update else None, out_extents=self.extents,
                     factoring=self.compiled.program.factoring)
        slots = {name: self._slot(out[name], name, layout, treedef) for name in self.state_names if name in out}
        slots = {name: slots.get(name, state.slots[name]) for name in self.state_names}  # read-only: as given
        return treedef.unflatten(layout.unpack(out["p"])), OptState(count, state.hyperparams, slots)

    def outputs(self, params, state: OptState) -> dict:
        """The spec's outputs (``output NAME = EXPR``) for these parameters and state, each a pytree
        shaped like ``params``: Schedule-Free's evaluation point ``x``, for instance. ``t`` in them
        is the number of updates applied, and schedules see that count."""
        if self.compiled.program.derived is None:
            raise InputError(f"'{self.name}' declares no outputs", code="E361",
                             hint="declare one in the spec: output x = (p - (1 - b1) * z) / b1")
        self._inputs.check(params, params, state, {})  # params as their own grads: only the state is in question
        return self._outputs(params, state)

    def _run_outputs(self, params, state: OptState) -> dict:
        derived = self.compiled.program.derived
        leaves, treedef = jax.tree.flatten(params)
        per_parameter = [name for name in self.state_names if self.extents[name] != "step"]
        layout = packing.layout_of({name: state.slots[name] for name in per_parameter}, leaves)
        units = layout.pack(leaves)
        tensors = {"p": units} | {name: packing.units_of(state.slots[name], treedef) for name in per_parameter}
        scalars = {"t": state.count.astype(step_dtype())}
        scalars |= {name: self._hyper(name, state.hyperparams, state.count) for name in self.hyperparams}
        scalars |= {name: state.slots[name] for name in self.state_names if self.extents[name] == "step"}
        names = [name for name, _ in derived.outputs]
        out = run_ir(derived, tensors, scalars, {name: [u.dtype for u in units] for name in names},
                     factoring=self.compiled.program.factoring)
        return {name: treedef.unflatten(layout.unpack(out[name])) for name in names}

    def finalize(self, params, state: OptState):
        """The parameters to keep after training: with ``use_ema``, the moving averages (Keras's
        ``finalize_variable_values``); otherwise ``params`` unchanged."""
        return self.variant.finalize(params, state)

    def get_config(self) -> dict:
        """A plain dict that :func:`optgen.from_config` rebuilds this optimizer from."""
        return get_config(self)

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
            known = [*hyper_defaults, *compiled_options, *TRANSFORM_OPTIONS]
            raise InputError(f"'{spec_name}' has no hyperparameter or option '{key}'",
                             hint=did_you_mean(key, known) or f"it takes: {', '.join(known)}", code="E302")
    return options, hypers
