"""The optimizer a spec compiles to: optax's ``init``/``update`` protocol, plus a fused ``step``.

Hyperparameters come in three kinds, by the value given to :func:`optgen.load`:

- a number lives in the state (``state.hyperparams``, as with ``optax.inject_hyperparams``),
  so changing it between steps never recompiles;
- a callable is a schedule, evaluated at each step's count;
- a JAX array (or tracer) is used as given at every call, as optax's optimizers use
  their arguments: this is what ``optax.inject_hyperparams(optgen_factory)`` passes.

The jitted step, update and init are shared by every optimizer with the same
:class:`Plan`, so a second ``optgen.load`` of the same spec (which
``optax.inject_hyperparams`` does at every update) compiles nothing again.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# trace_state_clean: no public way to ask whether a transformation runs
from jax._src import (
    core as jax_core,
)

from optgen.codegen import quantize
from optgen.codegen.export import state_dtypes
from optgen.codegen.primitive import run_ir
from optgen.compiler import Compiled
from optgen.diagnostics import InputError
from optgen.ir import dependencies
from optgen.runtime import packing, parts, placement
from optgen.runtime.config import get_config
from optgen.runtime.state import OptState, safe_increment, step_dtype
from optgen.runtime.validate import InputChecker, check_params
from optgen.transforms import TransformOptions, ema


def is_number(value) -> bool:
    """A hyperparameter value that lives in the state: a host number (not a JAX array, not a
    callable).
    """
    return isinstance(value, (numbers.Number, np.ndarray, np.generic)) and not isinstance(
        value, jax.Array
    )


class Plan:
    """Everything a compiled step depends on except hyperparameter values.

    It is the static argument of the shared jitted functions below; two plans are equal
    when they were built from the same cached compilation (``identity``, from
    :func:`optgen.load`), with the same packing and the same hyperparameter kinds and
    schedules.
    """

    def __init__(
        self,
        compiled: Compiled,
        transform_options: TransformOptions,
        hyperparams: dict[str, Any],
        pack: bool,
        identity: Any = None,
        lowering: str = "auto",
    ):
        self.compiled, self.transform_options, self.pack, self.lowering = (
            compiled,
            transform_options,
            pack,
            lowering,
        )
        self.name = compiled.checked.name
        # read-only ones too
        self.state_names = tuple(name for name, _ in compiled.program.init.outputs)
        self.extents = compiled.program.extents()
        self.stored = tuple(sorted(name for name, value in hyperparams.items() if is_number(value)))
        self.schedules = tuple(
            sorted(
                ((name, value) for name, value in hyperparams.items() if callable(value)),
                key=lambda item: item[0],
            )
        )
        self.bound = tuple(
            sorted(hyperparams.keys() - set(self.stored) - {name for name, _ in self.schedules})
        )
        self.delta_reads_params = _delta_reads_params(compiled.program.update)
        self.per_parameter = tuple(
            name for name in self.state_names if self.extents[name] != "step"
        )
        self.splittable = parts.splittable(
            compiled.program, pack, masked=transform_options.has_leaf_inputs()
        )
        self.checker = InputChecker(self)
        self._key = (
            (identity, pack, lowering, self.stored, self.schedules)
            if identity is not None
            else (object(),)
        )

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other) -> bool:
        return isinstance(other, Plan) and self._key == other._key

    def hyper_values(self, count: jax.Array, stored: dict, bound: dict) -> dict[str, jax.Array]:
        """Each hyperparameter's value for the step after ``count`` calls, in the step dtype."""
        # Schedules see the count before this step's increment, as optax's do.
        values = {name: schedule(count) for name, schedule in self.schedules}
        values |= {name: stored[name] for name in self.stored} | {
            name: bound[name] for name in self.bound
        }
        return {name: _scalar(name, value) for name, value in values.items()}

    def initialize(self, leaves: list, stored: dict, bound: dict, layout: packing.Layout):
        """count, the stored hyperparameters and each state's per-unit arrays (traced under jit)."""
        count = jnp.zeros([], jnp.int32)
        hypers = {name: _scalar(name, stored[name]) for name in self.stored}
        if not self.state_names or not leaves:
            return (
                count,
                hypers,
                {name: [] for name in self.state_names if self.extents[name] != "step"}
                | {
                    name: [jnp.zeros([], step_dtype())]
                    for name in self.state_names
                    if self.extents[name] == "step"
                },
            )
        units = layout.pack(leaves)
        out = run_ir(
            self.compiled.program.init,
            {"p": units},
            self.hyper_values(count, hypers, bound),
            self.out_dtypes(units, states_only=True),
            out_extents=self.extents,
            factoring=self.compiled.program.factoring,
        )
        return count, hypers, out

    def state_shapes(self, params) -> OptState:
        """The shapes and dtypes of ``init(params)``'s state, every per-parameter state unpacked."""
        leaves, treedef = jax.tree.flatten(params)
        layout = packing.Layout.unpacked(leaves)
        zeros = {name: 0.0 for name in self.bound}
        count, hypers, out = jax.eval_shape(
            lambda xs: self.initialize(xs, {name: 0.0 for name in self.stored}, zeros, layout),
            leaves,
        )
        return OptState(
            count,
            hypers,
            {name: self.slot(out[name], name, layout, treedef) for name in self.state_names},
        )

    def apply(
        self,
        params,
        grads,
        state: OptState,
        bound: dict,
        as_update: bool,
        inputs: dict | None = None,
    ):
        """One step: new params (or, ``as_update``, their change) and the new state; ``inputs``
        holds the spec's ``input`` trees.
        """
        inputs = inputs or {}
        # while tracing: structure only, no per-step cost
        self.checker.check(params, grads, state, inputs)
        leaves, treedef = jax.tree.flatten(params)
        count = safe_increment(state.count)
        if not leaves:
            return params, OptState(count, state.hyperparams, state.slots)
        per_parameter = self.per_parameter
        layout = packing.layout_of({name: state.slots[name] for name in per_parameter}, leaves)
        units = layout.pack(leaves)
        # Per-leaf inputs (the weight-decay mask) come with leaf ops, so their specs are never
        # packed.
        tensors = {
            "p": units,
            "g": layout.pack(treedef.flatten_up_to(grads)),
        } | self.transform_options.leaf_inputs(params)
        tensors |= {name: packing.units_of(state.slots[name], treedef) for name in per_parameter}
        tensors |= {name: layout.pack(treedef.flatten_up_to(tree)) for name, tree in inputs.items()}
        scalars = {"t": count.astype(step_dtype())} | self.hyper_values(
            state.count, state.hyperparams, bound
        )
        scalars |= {
            name: state.slots[name] for name in self.state_names if self.extents[name] == "step"
        }
        out = run_ir(
            self.compiled.program.update,
            tensors,
            scalars,
            self.out_dtypes(units),
            delta_output="p" if as_update else None,
            out_extents=self.extents,
            factoring=self.compiled.program.factoring,
            in_place=not as_update,
            lowering=self.lowering,
            rounding=self.compiled.program.rounding,
        )
        slots = {
            name: self.slot(out[name], name, layout, treedef)
            for name in self.state_names
            if name in out
        }
        # read-only: as given
        slots = {name: slots.get(name, state.slots[name]) for name in self.state_names}
        return treedef.unflatten(layout.unpack(out["p"])), OptState(count, state.hyperparams, slots)

    def outputs(self, params, state: OptState, bound: dict) -> dict:
        """The spec's ``output`` values for these parameters and state, each a pytree like
        ``params``.
        """
        derived = self.compiled.program.derived
        leaves, treedef = jax.tree.flatten(params)
        per_parameter = self.per_parameter
        layout = packing.layout_of({name: state.slots[name] for name in per_parameter}, leaves)
        units = layout.pack(leaves)
        tensors = {"p": units} | {
            name: packing.units_of(state.slots[name], treedef) for name in per_parameter
        }
        scalars = {"t": state.count.astype(step_dtype())} | self.hyper_values(
            state.count, state.hyperparams, bound
        )
        scalars |= {
            name: state.slots[name] for name in self.state_names if self.extents[name] == "step"
        }
        names = [name for name, _ in derived.outputs]
        out = run_ir(
            derived,
            tensors,
            scalars,
            {name: [u.dtype for u in units] for name in names},
            factoring=self.compiled.program.factoring,
            lowering=self.lowering,
        )
        return {name: treedef.unflatten(layout.unpack(out[name])) for name in names}

    def slot(self, arrays: list, name: str, layout: packing.Layout, treedef):
        """A state's outputs as stored: one array for a per-step state; else per parameter, packed
        by ``layout``.
        """
        return arrays[0] if self.extents[name] == "step" else packing.wrap(layout, treedef, arrays)

    def out_dtypes(self, leaves, states_only: bool = False) -> dict[str, list[np.dtype]]:
        program = self.compiled.program
        per_leaf = [state_dtypes(program, leaf.dtype, step_dtype()) for leaf in leaves]
        shared = state_dtypes(program, step_dtype(), step_dtype())  # per-step states: one scalar
        dtypes = {
            name: [shared[name]]
            if self.extents[name] == "step"
            else [
                quantize.storage(d[name], leaf.size)
                for d, leaf in zip(per_leaf, leaves, strict=True)
            ]
            for name in self.state_names
        }
        return dtypes if states_only else {"p": [leaf.dtype for leaf in leaves]} | dtypes


def _scalar(name: str, value) -> jax.Array:
    value = jnp.asarray(value)
    if value.shape != ():
        raise InputError(
            f"hyperparameter '{name}' has shape {value.shape}, not a scalar",
            hint="a hyperparameter (or a schedule's value) is one number per step; to run several "
            "values at once, jax.vmap over them",
            code="E380",
        )
    return value.astype(step_dtype())


def _delta_reads_params(update) -> bool:
    """Whether the change of ``p`` (what ``update`` returns) depends on ``p``: false for
    ``p = p - X`` with ``X`` free of ``p`` (Adam), true with weight decay (AdamW)."""
    p_in = update.input("p")
    outputs = dict(update.outputs)
    final = next((op for op in update.ops if op.result is outputs["p"]), None)
    if final is None or final.opcode not in ("add", "sub") or final.operands[0] is not p_in:
        return True
    roots = [final.operands[1], *(value for name, value in update.outputs if name != "p")]
    return id(p_in) in dependencies(update, roots)


def _init(plan: Plan, leaves, stored, bound, shardings, layout):
    count, hypers, out = plan.initialize(leaves, stored, bound, layout)
    if shardings is None:
        return count, hypers, out
    # Laid out as step's outputs will be: each per-element state like its parameter (sharded the
    # same way, not gathered), everything else replicated on the parameters' devices.
    replicated = placement.replicated(shardings[0])
    place = placement.constrain
    out = {
        name: [
            place(
                x,
                shardings[unit[0]]
                if plan.extents[name] == "tensor"
                else placement.replicated(shardings[unit[0]]),
            )
            for x, unit in zip(xs, layout.units, strict=True)
        ]
        if plan.extents[name] != "step"
        else [place(x, replicated) for x in xs]
        for name, xs in out.items()
    }
    return place(count, replicated), {name: place(v, replicated) for name, v in hypers.items()}, out


_initialize = jax.jit(_init, static_argnums=(0, 4, 5))


def _run_step(plan: Plan, params, grads, state, bound, inputs):
    return plan.apply(params, grads, state, bound, False, inputs)


_step = jax.jit(_run_step, static_argnums=0, donate_argnums=(1, 3))


def _run_part(plan: Plan, as_update: bool, bound, params, grads, slots, shared, inputs):
    count, hypers, steps = shared
    state = OptState(count, hypers, slots | steps)
    return plan.apply(params, grads, state, bound, as_update, inputs)


# One part of many parameters (runtime/parts.py): its params and per-parameter states are donated,
# not the count and hyperparameters every part reads.
_step_part = jax.jit(_run_part, static_argnums=(0, 1), donate_argnums=(3, 5))
_update_part = jax.jit(_run_part, static_argnums=(0, 1))
# step's form for traced arguments (under jax.grad, vmap or a user's jit): nothing to donate there,
# and donating the concrete leaves a transformation passes along (count, hyperparameters) would
# delete arrays the caller still holds.
_step_kept = jax.jit(_run_step, static_argnums=0)
_update = jax.jit(
    lambda plan, params, grads, state, bound, inputs: plan.apply(
        params, grads, state, bound, True, inputs
    ),
    static_argnums=0,
)
_outputs = jax.jit(
    lambda plan, params, state, bound: plan.outputs(params, state, bound), static_argnums=0
)


class Optimizer:
    """An optimizer compiled from a spec; use :func:`optgen.load` to make one.

    ``init(params)`` and ``update(grads, state, params)`` follow optax's
    ``GradientTransformation`` protocol, so an Optimizer drops into ``optax.chain``,
    ``optax.inject_hyperparams``, flax's ``nnx.Optimizer`` and any optax training loop.
    ``step(params, grads, state)`` returns the new parameters directly, in one fused,
    jitted kernel that donates ``params`` and ``state``.
    """

    def __init__(
        self,
        compiled: Compiled,
        hyperparams: dict[str, float | Callable | jax.Array],
        transform_options: TransformOptions = TransformOptions(),
        pack: bool = False,
        identity: Any = None,
        lowering: str = "auto",
    ):
        self.compiled = compiled
        self.name = compiled.checked.name
        self.description = compiled.checked.spec.description
        self.hyperparams = hyperparams
        self.transform_options = (
            transform_options  # the options applied as transforms (clipnorm, use_ema, ...)
        )
        self.pack = pack  # small parameters' state packed into flat buffers (packing.py)
        self.lowering = lowering  # how the step becomes machine code (codegen/fusion.py)
        self._plan = Plan(compiled, transform_options, hyperparams, pack, identity, lowering)
        self.state_names = self._plan.state_names
        self.extents = self._plan.extents  # each output's extent: tensor, leaf, row, col or step
        # those given as numbers: kept in state.hyperparams
        self.stored_hyperparams = self._plan.stored
        self.step = _Jitted(self, _step, traced=_step_kept, part=_step_part)
        self._update = _Jitted(self, _update, part=_update_part)

    def __repr__(self) -> str:
        return f"<optgen.Optimizer {self.name} {self.hyperparams}>"

    def __deepcopy__(self, memo) -> Optimizer:
        return self  # immutable: its hyperparameter values and compiled program never change

    def init(self, params) -> OptState:
        """Zero count, the stored hyperparameters, and each state initialized from its spec
        expression.
        """
        check_params(params)
        leaves, treedef = jax.tree.flatten(params)
        layout = (
            packing.plan(self.compiled.program, leaves)
            if self.pack
            else packing.Layout.unpacked(leaves)
        )
        concrete = bool(leaves) and all(
            placement.has_buffer(leaf) and leaf.committed for leaf in leaves
        )
        shardings = tuple(leaf.sharding for leaf in leaves) if concrete else None
        stored, bound = self._stored(), self._bound()
        if parts.wanted(self._plan, leaves):
            count, hypers, out = parts.initialize(
                lambda xs, where: _initialize(
                    self._plan, xs, stored, bound, where, packing.Layout.unpacked(xs)
                ),
                self._plan.per_parameter,
                leaves,
                shardings,
            )
        else:
            count, hypers, out = _initialize(self._plan, leaves, stored, bound, shardings, layout)
        if concrete:
            self._spread(out, leaves, layout)
        slots = {
            name: self._plan.slot(out[name], name, layout, treedef) for name in self.state_names
        }
        return OptState(count, hypers, slots)

    def check(self, params, grads, state: OptState) -> None:
        """Raise :class:`~optgen.diagnostics.InputError` if ``grads`` or ``state`` do not fit
        ``params`` (tree structure, shapes, dtypes; reads nothing on the device).
        """
        self._plan.checker.check(params, grads, state)

    def _stored(self) -> dict:
        return {name: self.hyperparams[name] for name in self._plan.stored}

    def _bound(self) -> dict:
        return {name: self.hyperparams[name] for name in self._plan.bound}

    def _spread(self, out: dict, leaves: list, layout: packing.Layout) -> None:
        """Move any per-element state that landed on its parameter's address modulo 256 MiB
        (``placement``): such a pair made the fused step up to 1.8x slower on CPU."""
        names = [name for name in self.state_names if self._plan.extents[name] == "tensor"]
        for u, unit in enumerate(layout.units):
            param = leaves[unit[0]] if len(unit) == 1 else None
            for name, x in zip(
                names, placement.spread(param, [out[name][u] for name in names]), strict=True
            ):
                out[name][u] = x

    def update(self, updates, state: OptState, params=None, **inputs):
        """optax protocol: gradients in, ``(updates, new_state)`` out; apply with
        ``optax.apply_updates``. A spec's ``input`` declarations arrive as keyword arguments:
        ``update(g, s, p, hessian=h)``.

        ``params`` may be left out where the change of ``p`` does not depend on ``p``
        (``p = p - X``, as Adam), as optax allows for such optimizers.
        """
        if params is None:
            if self._plan.delta_reads_params:
                raise InputError(
                    f"{self.name}.update needs params: its change of p depends on p",
                    hint="call update(grads, state, params), as optax does for AdamW",
                    code="E301",
                )
            # p enters only as p - X: with p = 0 the change is exactly -X.
            params = jax.tree.map(jnp.zeros_like, updates)
        return self._update(params, updates, state, **inputs)

    def outputs(self, params, state: OptState) -> dict:
        """The spec's outputs (``output NAME = EXPR``) for these parameters and state, each a pytree
        shaped like ``params``: Schedule-Free's evaluation point ``x``, for instance. ``t`` in them
        is the number of updates applied, and schedules see that count."""
        if self.compiled.program.derived is None:
            raise InputError(
                f"'{self.name}' declares no outputs",
                code="E361",
                hint="declare one in the spec: output x = (p - (1 - b1) * z) / b1",
            )
        # params as their own grads: only the state is in question
        self._plan.checker.check(params, params, state)
        return _outputs(self._plan, params, state, self._bound())

    def finalize(self, params, state: OptState):
        """The parameters to keep after training: with ``use_ema``, the moving averages (Keras's
        ``finalize_variable_values``); otherwise ``params`` unchanged."""
        return (
            packing.as_tree(state.slots[ema.AVERAGE])
            if self.transform_options["use_ema"]
            else params
        )

    def get_config(self) -> dict:
        """A plain dict that :func:`optgen.from_config` rebuilds this optimizer from."""
        return get_config(self)


def explain_donation(params, grads, state) -> None:
    """Raise InputError if a step failed because an argument's buffer was donated already, or
    because one buffer appears twice among the arrays step donates (tied parameters)."""
    named = [
        (f"{what}{jax.tree_util.keystr(path)}", leaf)
        for what, tree in (("params", params), ("grads", grads), ("state", state))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if placement.has_buffer(leaf)
    ]
    for name, leaf in named:
        if leaf.is_deleted():
            raise InputError(
                f"{name} was donated to an earlier step: its buffer is gone",
                hint="step donates params and state: pass on the params and state it returned (or "
                "keep copies, jnp.copy, of what you need again)",
                code="E382",
            )
    seen: dict[int, str] = {}
    for name, leaf in named:
        key = id(leaf)
        if key in seen and not (name.startswith("grads") and seen[key].startswith("grads")):
            raise InputError(
                f"{name} and {seen[key]} are one array, and step donates it: one buffer cannot be "
                "given up twice, or read after it is given up",
                hint="pass distinct arrays (jnp.copy), or use update and optax.apply_updates, "
                "which donate nothing",
                code="E383",
            )
        seen.setdefault(key, name)


class _Jitted:
    """One of the shared jitted functions, bound to an optimizer, behind the per-call input checks.

    ``lower(params, grads, state)`` lowers it as jit's ``lower`` does. A spec's ``input``
    declarations are keyword arguments of both.
    """

    def __init__(self, opt: Optimizer, jitted, part, traced=None):
        self.opt, self.jitted, self.part, self.traced = opt, jitted, part, traced or jitted

    def __call__(self, params, grads, state, **inputs):
        plan = self.opt._plan
        plan.checker.check_call(params, grads, state)
        plan.checker.check_input_names(inputs)
        bound = self.opt._bound()
        # inside jit, grad, vmap...: 0.2 us (a scan for tracers: 2 ms)
        traced = not jax_core.trace_state_clean()
        try:
            if traced:
                return self.traced(plan, params, grads, state, bound, inputs)
            if parts.wanted(plan, params):
                # a misfit found in a later part would come after the first gave up its buffers
                plan.checker.check_once(params, grads, state, inputs)
                as_update = self.jitted is _update
                return parts.run(
                    functools.partial(self.part, plan, as_update, bound),
                    plan.per_parameter,
                    params,
                    grads,
                    state,
                    inputs,
                )
            return self.jitted(plan, params, grads, state, bound, inputs)
        except TypeError:
            # jit refuses a leaf that is no array before tracing: name it as InputError
            plan.checker.check(params, grads, state, inputs)
            raise
        except (
            ValueError,
            RuntimeError,
        ):
            # XLA's words for a donated or doubly donated buffer: say which
            # a wrong tree is the first thing to say (in the user's tree, not a part's list)
            plan.checker.check(params, grads, state, inputs)
            if self.jitted is _step:
                explain_donation(params, grads, state)
            raise

    def lower(self, params, grads, state, **inputs):
        return self.jitted.lower(self.opt._plan, params, grads, state, self.opt._bound(), inputs)
