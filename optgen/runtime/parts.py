"""Many parameters, several executables: an eager ``step``, ``update`` or ``init`` over more
than :data:`SPLIT_ABOVE_LEAVES` parameters runs as equal parts of at most :data:`PART_LEAVES`,
one jitted call each.

XLA's compile time and memory grow faster than linearly with the arrays of one jitted
function (copy insertion and layout assignment over tens of thousands of donated arguments):
an AdamW step over 10,000 leaves ran out of 23 GB after 106 s, optax's as well. A part of
1,000 compiles in about 2 s and 0.7 GB, and equal parts of a model that repeats its blocks
share one executable. The numbers are the same as in one call: each parameter's update reads
only its own arrays and the step's scalars.

Not split: a spec that reduces over every parameter (``global_norm``, ``global_sum``, the
``global_clipnorm`` and ``skip_nonfinite`` options), a packed state (``pack=True``), a
weight-decay mask (it is looked up by the parameters' paths), and anything traced — inside a
user's jit, grad or vmap the whole tree is one computation, as with optax.
"""

from __future__ import annotations

import jax

from optgen.ops import OPS
from optgen.runtime.state import OptState

# A part compiles in about 2 s and 0.7 GB for AdamW on this CPU; splitting costs about 3 us a
# leaf per call (the arguments' signature, checked before the first part gives up its buffers),
# so a step that still compiles in seconds stays one call (docs/fusion.md).
PART_LEAVES = 1024
SPLIT_ABOVE_LEAVES = 2048


def splittable(program, pack: bool, masked: bool) -> bool:
    """Whether a step may run over the parameters in parts: no op reduces to one number per step
    (a sum over every parameter), nothing is packed and no mask is looked up by path."""
    reduces_all = any(
        "step" in (OPS[op.opcode].reduces or {}).values()
        for func in (program.init, program.update)
        for op in func.ops
        if op.opcode in OPS
    )
    return not (reduces_all or pack or masked)


def wanted(plan, params) -> bool:
    """Whether ``plan``'s eager step over ``params`` runs in parts."""
    return plan.splittable and jax.tree.structure(params).num_leaves > SPLIT_ABOVE_LEAVES


def bounds(count: int) -> list[tuple[int, int]]:
    """``count`` leaves as equal, contiguous parts of at most PART_LEAVES (the first ones one
    longer where they do not divide evenly)."""
    parts = -(-count // PART_LEAVES)
    size, extra = divmod(count, parts)
    starts = [i * size + min(i, extra) for i in range(parts + 1)]
    return list(zip(starts, starts[1:], strict=False))


def run(call, per_parameter: tuple[str, ...], params, grads, state: OptState, inputs: dict):
    """``call(params, grads, slots, shared, inputs)`` on each part, as lists of leaves, and the
    results put back in the parameters' tree.

    ``shared`` (count, stored hyperparameters, per-step states) goes to every part unchanged;
    every part returns the same new count and per-step states (they depend on no parameter), and
    the first part's are kept.
    """
    leaves, treedef = jax.tree.flatten(params)
    grad_leaves = treedef.flatten_up_to(grads)
    slots = {name: treedef.flatten_up_to(state.slots[name]) for name in per_parameter}
    steps = {name: v for name, v in state.slots.items() if name not in per_parameter}
    extra = {name: treedef.flatten_up_to(tree) for name, tree in inputs.items()}
    shared = (state.count, state.hyperparams, steps)
    results = [
        call(
            leaves[start:stop],
            grad_leaves[start:stop],
            {name: xs[start:stop] for name, xs in slots.items()},
            shared,
            {name: xs[start:stop] for name, xs in extra.items()},
        )
        for start, stop in bounds(len(leaves))
    ]
    first = results[0][1]
    new_slots = {
        name: treedef.unflatten([x for _, part in results for x in part.slots[name]])
        if name in per_parameter
        else first.slots[name]
        for name in state.slots
    }
    new_params = treedef.unflatten([x for out, _ in results for x in out])
    return new_params, OptState(first.count, first.hyperparams, new_slots)


def initialize(call, per_parameter: tuple[str, ...], leaves: list, shardings):
    """``call(leaves, shardings)`` (``init``'s count, hyperparameters and per-state lists of
    arrays) on each part, the lists joined; the count, hyperparameters and per-step states are
    the first part's."""
    results = [
        call(leaves[start:stop], shardings and shardings[start:stop])
        for start, stop in bounds(len(leaves))
    ]
    count, hypers, first = results[0]
    out = {
        name: [x for _, _, part in results for x in part[name]] if name in per_parameter else xs
        for name, xs in first.items()
    }
    return count, hypers, out
