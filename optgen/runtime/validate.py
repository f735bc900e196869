"""Checks on what a caller hands an optimizer, before anything runs or is donated.

Every check reads only structure: tree definitions, shapes, dtypes, and hyperparameters
that are host numbers. Nothing waits on the device, and a rejected call leaves the
caller's arrays untouched. The structural checks run while ``jax.jit`` traces the step,
so they cost nothing once a step is compiled (jit's cache, keyed by trees and avals,
remembers what passed) and raise before anything is dispatched or donated; per call,
only the hyperparameters that are host numbers are range-checked.

Every mistake raises :class:`~optgen.diagnostics.InputError` naming the leaf
(``grads['w']``, as ``jax.tree_util.keystr`` writes paths) and what was expected.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from optgen.diagnostics import InputError, did_you_mean
from optgen.runtime import packing
from optgen.runtime.state import OptState, step_dtype
from optgen.syntax import Range
from optgen.transforms import HYPER_RANGES

if TYPE_CHECKING:
    from optgen.runtime.optimizer import Plan


def check_hyperparams(spec_name: str, ranges: dict[str, Range], values: dict[str, Any]) -> None:
    """Each hyperparameter is a real number in its declared range, or a schedule (a callable)."""
    for name, value in values.items():
        if callable(value):
            continue
        _check_hyper_value(spec_name, name, value, ranges.get(name), f"hyperparameter '{name}'")


def _check_hyper_value(
    spec_name: str, name: str, value: Any, bounds: Range | None, where: str
) -> None:
    if isinstance(value, jax.Array):  # on the device: reading it would wait for it; shape only
        if value.shape != () or not jax.numpy.issubdtype(value.dtype, jax.numpy.number):
            raise InputError(
                f"{where} is an array of shape {value.shape} and dtype {value.dtype}",
                hint="give a scalar number",
                code="E305",
            )
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (numbers.Real, np.ndarray, np.generic))
        or np.ndim(value) != 0
        or not np.issubdtype(np.asarray(value).dtype, np.number)
    ):
        raise InputError(
            f"{where} must be a number or a schedule (a callable of the step count), got "
            f"{type(value).__name__} {value!r:.60}",
            hint="for example 1e-3",
            code="E305",
        )
    if np.iscomplexobj(value):
        raise InputError(
            f"{where} is complex ({value!r:.40})", hint="give a real number", code="E305"
        )
    if np.isnan(float(value)):
        raise InputError(f"{where} is nan", hint="give a number", code="E305")
    with np.errstate(over="ignore"):
        overflows = np.isfinite(float(value)) and not np.isfinite(np.asarray(value, step_dtype()))
    if overflows:
        raise InputError(
            f"{where} = {float(value):g} is beyond {step_dtype().name}, in which the step computes",
            hint="give a smaller number, or enable jax_enable_x64 for float64 steps",
            code="E305",
        )
    if bounds is not None and not bounds.contains(float(value)):
        raise InputError(
            f"{where} = {float(value):g} is outside its range {bounds}",
            hint=f"the {spec_name} spec declares '{name}' in {bounds}",
            code="E306",
        )


def check_params(params, what: str = "params") -> None:
    """Every leaf of ``params`` (or of gradients, ``what``) is a floating-point array (or a tracer
    of one).
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.complexfloating):
            raise InputError(
                f"{what}{jax.tree_util.keystr(path)} is complex ({np.dtype(dtype).name}); optgen's "
                "specs are written for real numbers",
                hint="keep the real and imaginary parts as two float parameters",
                code="E310",
            )
        if (
            getattr(leaf, "shape", None) is None
            or dtype is None
            or not jax.numpy.issubdtype(dtype, jax.numpy.floating)
        ):
            raise InputError(
                f"{what}{jax.tree_util.keystr(path)} is {_describe(leaf)}, not a float array",
                hint=f"{what} are float arrays (jnp.asarray(x, jnp.float32))",
                code="E310",
            )


class InputChecker:
    """Validates ``update``/``step`` arguments of the optimizers of one plan."""

    def __init__(self, plan: Plan):
        self.plan = plan
        # the spec's, and its options' (clipnorm > 0)
        self.ranges = plan.compiled.checked.ranges | HYPER_RANGES
        self._fitting: dict = {}  # signatures check_once passed, newest last

    def check_once(self, params, grads, state, inputs: dict) -> None:
        """:meth:`check`, skipped for arguments whose trees, shapes and dtypes passed it before
        (about 2 us a leaf instead of 50): for a step run in parts, where a misfit found in a
        later part would come after the first part gave up its buffers."""
        leaves, treedef = jax.tree.flatten((params, grads, state, inputs))
        key = (treedef, tuple((getattr(x, "shape", x), getattr(x, "dtype", x)) for x in leaves))
        if key in self._fitting:
            return
        self.check(params, grads, state, inputs)
        self._fitting[key] = None
        if len(self._fitting) > 8:  # a few shapes at a time; forget the oldest
            del self._fitting[next(iter(self._fitting))]

    def check_call(self, params, grads, state) -> None:
        """The per-call checks: the state's hyperparameters that are host numbers are in range."""
        hypers = state.hyperparams if isinstance(getattr(state, "hyperparams", None), dict) else {}
        # host numbers may change every step; device arrays are not read
        for (
            name,
            value,
        ) in hypers.items():
            if name in self.ranges and not isinstance(value, jax.Array):
                _check_hyper_value(
                    self.plan.name, name, value, self.ranges[name], f"state.hyperparams['{name}']"
                )

    def check_input_names(self, inputs: dict) -> None:
        """The spec's ``input`` declarations, each given (E362)."""
        declared = self.plan.compiled.program.extra_inputs
        for name in inputs:
            if name not in declared:
                raise InputError(
                    f"{self.plan.name} takes no input '{name}'",
                    code="E362",
                    hint=did_you_mean(name, declared)
                    or (f"its inputs are: {', '.join(declared)}" if declared else "it takes none"),
                )
        for name in declared:
            if name not in inputs:
                raise InputError(
                    f"{self.plan.name} needs the input '{name}' at each step",
                    code="E362",
                    hint=f"pass it beside the gradients: update(grads, state, params, {name}=...)",
                )

    def check(self, params, grads, state, inputs=None) -> None:
        """Raise InputError if grads, the spec's inputs or state do not fit params; reads shapes and
        dtypes only. ``inputs`` None (outputs, a saved state) checks no inputs; a dict (a step)
        needs every declared one.
        """
        check_params(params)
        # Gradients may come in another float dtype than their parameters, as optax accepts.
        _same_tree("grads", grads, "params", params, check_dtype=False)
        check_params(grads, "grads")
        if inputs is not None:
            self.check_input_names(inputs)
        for input_name, tree in (inputs or {}).items():  # checked like the gradients
            _same_tree(input_name, tree, "params", params, check_dtype=False)
            check_params(tree, input_name)
        if not isinstance(state, OptState):
            raise InputError(
                f"state is {_describe(state)}, not an optgen OptState",
                hint="make it with opt.init(params)",
                code="E311",
            )
        # Compared as parameter-shaped trees: packing is the state's own business (packing.py).
        expected = packing.unpack_state(self.plan.state_shapes(params))
        name = self.plan.name
        unknown = sorted(state.hyperparams.keys() - expected.hyperparams.keys())
        missing = sorted(expected.hyperparams.keys() - state.hyperparams.keys())
        if len(unknown) == 1 and did_you_mean(unknown[0], missing):  # one mistyped name
            raise InputError(
                f"state.hyperparams has '{unknown[0]}', which {name} does not take",
                hint=did_you_mean(unknown[0], missing),
                code="E302",
            )
        if unknown or missing or set(state.slots) != set(expected.slots):
            raise InputError(
                "state is from another optimizer: it holds hyperparameters "
                f"{sorted(state.hyperparams)} and states {sorted(state.slots)}; {name} keeps "
                f"{sorted(expected.hyperparams)} and {sorted(expected.slots)}",
                hint=f"make it with {name}'s init",
                code="E311",
            )
        for key, value in state.hyperparams.items():
            _check_hyper_value(
                name, key, value, self.ranges.get(key), f"state.hyperparams['{key}']"
            )
        for slot in expected.slots:
            _same_tree(
                f"state.slots['{slot}']",
                packing.as_tree_shape(state.slots[slot]),
                f"{name}'s state for these params",
                expected.slots[slot],
                check_dtype=True,
            )
        _same_tree("state.count", state.count, "an int32 scalar", expected.count, check_dtype=True)


def _same_tree(what: str, got, expected_what: str, expected, check_dtype: bool) -> None:
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
    want_leaves, want_def = jax.tree_util.tree_flatten_with_path(expected)
    if got_def != want_def:
        got_paths = [jax.tree_util.keystr(p) for p, _ in got_leaves]
        want_paths = [jax.tree_util.keystr(p) for p, _ in want_leaves]
        missing = [p for p in want_paths if p not in got_paths]
        extra = [p for p in got_paths if p not in want_paths]
        detail = (
            f"it has no leaf {what}{missing[0]}"
            if missing
            else f"it has a leaf {what}{extra[0]} that {expected_what} lacks"
            if extra
            else f"its containers differ: {str(got_def):.120} vs {str(want_def):.120}"
        )
        raise InputError(
            f"{what} does not have the tree structure of {expected_what}: {detail}",
            hint="pass trees of the same structure (same keys, same containers)",
            code="E307",
        )
    for (path, leaf), (_, want) in zip(got_leaves, want_leaves, strict=True):
        where = f"{what}{jax.tree_util.keystr(path)}"
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        if shape is None or dtype is None:
            raise InputError(f"{where} is {_describe(leaf)}, not an array", code="E310")
        if tuple(shape) != tuple(want.shape):
            raise InputError(
                f"{where} has shape {tuple(shape)}, expected {tuple(want.shape)}",
                hint=f"it must match {expected_what}",
                code="E308",
            )
        if check_dtype and np.dtype(dtype) != np.dtype(want.dtype):
            raise InputError(
                f"{where} has dtype {np.dtype(dtype).name}, expected {np.dtype(want.dtype).name}",
                hint="cast it with .astype(...)",
                code="E309",
            )


def _describe(x) -> str:
    return f"a {type(x).__name__}" if not hasattr(x, "shape") else f"an array of dtype {x.dtype}"
