"""Multi-tensor packing: the state of small parameters lives in one flat buffer per dtype.

Every array that crosses a jitted step's boundary costs a few microseconds whatever its
size (argument handling, donation, a kernel per parameter). With 2,000 bias-sized
parameters, AdamW's four arrays in and three out per parameter cost far more than its
arithmetic. So an optimizer keeps the state of its small parameters packed: for each
state, one flat buffer per dtype group. Inside the step the group's parameters and
gradients are concatenated, the group is updated as one tensor (one fused loop), and
the new parameters are sliced back out (XLA:CPU emits the slices as a few multi-output
kernels). Only ``p`` and ``g`` still cross the boundary once per parameter.
docs/fusion.md has the measurements.

A parameter is packed only where packing changes nothing but speed:

- the spec is elementwise: a per-parameter reduction (``norm(g)``) would see the whole
  group as one parameter (a reduction over every parameter, ``global_norm(g)``, is fine);
- the parameter has at most :data:`PACK_MAX_ELEMENTS` elements: above that, the copies
  in and out of the group cost more than the per-array overhead saved;
- it is replicated (or its sharding is unknown, while tracing): flattening a sharded
  parameter would force a resharding, so it keeps its own state, laid out like it;
- at least two parameters fall into its dtype group.

What users see: where nothing is packed, each state is a pytree shaped like the
parameters, as before. Where something is, it is a :class:`PackedState`: a pytree whose
leaves are the unpacked parameters' arrays and the groups' flat buffers (so it is
checkpointed, donated and sharded like any pytree of arrays); ``.tree()`` is the
parameter-shaped view, and ``state["w"]`` indexes that view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optgen.diagnostics import InputError
from optgen.ir import Program
from optgen.runtime import placement

PACK_MAX_ELEMENTS = 2048  # parameters up to this size are packed; measured in docs/fusion.md


@dataclass(frozen=True)
class Layout:
    """How a step sees the parameters: a list of *units*, each one array it updates.

    A unit is one parameter (a 1-tuple of its index: the array as it is) or a packed
    group (two or more indices: their raveled arrays concatenated in that order).
    """

    shapes: tuple[tuple[int, ...], ...]  # each parameter's shape
    units: tuple[tuple[int, ...], ...]

    @classmethod
    def unpacked(cls, leaves: Sequence) -> Layout:
        """One unit per parameter: the layout of a state that is a plain pytree."""
        return cls(tuple(tuple(x.shape) for x in leaves), tuple((i,) for i in range(len(leaves))))

    @property
    def packed(self) -> bool:
        return any(len(unit) > 1 for unit in self.units)

    def pack(self, leaves: Sequence) -> list:
        """Per-parameter arrays (shaped as ``shapes``) to per-unit arrays."""
        return [
            leaves[unit[0]]
            if len(unit) == 1
            else jnp.concatenate([jnp.ravel(leaves[i]) for i in unit])
            for unit in self.units
        ]

    def unpack(self, arrays: Sequence) -> list:
        """Per-unit arrays back to per-parameter arrays (static slices of the groups)."""
        leaves: list[Any] = [None] * len(self.shapes)
        for unit, array in zip(self.units, arrays, strict=True):
            if len(unit) == 1:
                leaves[unit[0]] = array
                continue
            offset = 0
            for i in unit:
                size = math.prod(self.shapes[i])
                leaves[i] = jax.lax.slice(array, (offset,), (offset + size,)).reshape(
                    self.shapes[i]
                )
                offset += size
        return leaves


def plan(program: Program, leaves: Sequence) -> Layout:
    """The layout for these parameters: small replicated ones packed by dtype (see the
    module doc).
    """
    if not _elementwise(program) or "q8" in program.state_dtypes.values():
        return Layout.unpacked(leaves)  # (a q8 state is quantized per parameter)
    units, groups = [], {}
    for i, leaf in enumerate(leaves):
        if math.prod(leaf.shape) <= PACK_MAX_ELEMENTS and _replicated(leaf):
            groups.setdefault(np.dtype(leaf.dtype), []).append(i)
        else:
            units.append((i,))
    units += [tuple(members) for members in groups.values()]
    return Layout(tuple(tuple(x.shape) for x in leaves), tuple(units))


def _elementwise(program: Program) -> bool:
    """Every value is per step or per element, so the step means the same on a group as on its
    members: no per-parameter (``leaf``) or row/column (``row``, ``col``) values, inputs included.

    One kind of per-parameter value is allowed: a ``sum`` or ``size`` of a tensor that only
    ``gsum`` reads (``global_norm``, skip_nonfinite's count). Summed over every parameter it
    is the same total whether the parameters are grouped or not.
    """
    return all(_packable(func) for func in (program.update, program.init))


def _packable(func) -> bool:
    readers: dict[int, set[str]] = {}
    for op in func.ops:
        for operand in op.operands:
            readers.setdefault(id(operand), set()).add(op.opcode)
    outputs = {id(value) for _, value in func.outputs}
    if any(value.type.extent not in ("step", "tensor") for value in func.inputs):
        return False
    return all(
        op.result.type.extent in ("step", "tensor")
        or (
            op.opcode in ("sum", "size")
            and readers.get(id(op.result)) == {"gsum"}
            and id(op.result) not in outputs
        )
        for op in func.ops
    )


def _replicated(leaf) -> bool:
    """Whether ``leaf`` is known to be whole on each device (so a group holding it reshards
    nothing).
    """
    if placement.has_buffer(leaf):
        return leaf.sharding.is_fully_replicated
    # traced: Explicit mesh axes are in the type
    sharding = getattr(jax.typeof(leaf), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and jax.sharding.AxisType.Explicit in getattr(mesh, "axis_types", ()):
        return all(axis is None for axis in sharding.spec)
    # Auto axes or no mesh: unknown, unless there is nothing to shard over
    return jax.device_count() == 1


@jax.tree_util.register_pytree_node_class
class PackedState:
    """One spec state for every parameter, small parameters' packed into flat buffers.

    Its pytree leaves are the per-unit arrays of ``layout``; ``tree()`` rebuilds the
    parameter-shaped pytree (a copy per packed parameter), and ``state[key]`` indexes it.
    """

    def __init__(self, layout: Layout, treedef, arrays: Sequence):
        self.layout, self.treedef, self.arrays = layout, treedef, list(arrays)

    def tree_flatten(self):
        return tuple(self.arrays), (self.layout, self.treedef)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*aux, children)

    def tree(self):
        """The state as a pytree shaped like the parameters."""
        return self.treedef.unflatten(self.layout.unpack(self.arrays))

    def __getitem__(self, key):
        return self.tree()[key]

    def __repr__(self) -> str:
        groups = sum(len(unit) > 1 for unit in self.layout.units)
        parameters, arrays = len(self.layout.shapes), len(self.arrays)
        return f"PackedState({parameters} parameters in {arrays} arrays, {groups} packed)"


def wrap(layout: Layout, treedef, arrays: Sequence):
    """A state from its per-unit arrays: a plain pytree where nothing is packed (the units may
    still be in another order than the parameters: a lone small parameter comes after the big)."""
    return (
        PackedState(layout, treedef, arrays)
        if layout.packed
        else treedef.unflatten(layout.unpack(arrays))
    )


def layout_of(slots: dict[str, Any], leaves: Sequence) -> Layout:
    """The layout the state was made with (by :func:`plan`, at ``init``); its shapes are checked by
    validate.
    """
    packed = [s.layout for s in slots.values() if isinstance(s, PackedState)]
    if not packed:
        return Layout.unpacked(leaves)
    layout = packed[0]
    if len(packed) != len(slots) or any(other != layout for other in packed):
        raise InputError(
            "the optimizer state's entries are packed differently",
            hint="pass the state that init/step/update returned, unmodified",
            code="E311",
        )
    return layout


def as_tree(slot):
    """A per-parameter state as a pytree shaped like the parameters, packed or not."""
    return slot.tree() if isinstance(slot, PackedState) else slot


def as_tree_shape(slot):
    """:func:`as_tree`'s shapes and dtypes, computed without touching any data."""
    return jax.eval_shape(slot.tree) if isinstance(slot, PackedState) else slot


def unpack_state(state):
    """``state`` (an OptState) with every per-parameter state as a parameter-shaped pytree.

    What validation compares and checkpoints store: it does not depend on which small
    parameters a process chose to pack (that depends on their shardings).
    """
    return state._replace(slots={name: as_tree(slot) for name, slot in state.slots.items()})


def repack_like(template, slot):
    """A parameter-shaped ``slot`` packed as ``template`` (the same state from ``init``) is."""
    if not isinstance(template, PackedState):
        return slot
    return PackedState(
        template.layout,
        template.treedef,
        template.layout.pack(template.treedef.flatten_up_to(slot)),
    )


def units_of(slot, treedef) -> list:
    """A state's per-unit arrays, as the step consumes them."""
    return slot.arrays if isinstance(slot, PackedState) else treedef.flatten_up_to(slot)
