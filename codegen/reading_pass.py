"""A step with reductions, cut into the passes optgen's own CPU loop runs: read, combine, update.

A per-tensor reduction (``sum``, and ``norm``, ``mean`` built on it) or a global one
(``gsum``: ``global_norm``, ``global_sum``, the ``global_clipnorm`` and ``skip_nonfinite``
options) must finish before any element that depends on it is updated. Its minimum is one
*reading pass* over the inputs it reads, then the one update pass:

- ``reading``: per element, the value each ``sum`` adds up (output ``_sum<k>``); the loop
  accumulates them instead of storing them. A value the update also computes (LAMB's Adam
  direction, whose norm sets the trust ratio) is recomputed here from the inputs: reading
  them again costs less than writing and re-reading it;
- ``combine``: the per-parameter and per-step values computed from the sums (norms, trust
  ratios, ``gsum`` over every parameter, per-step outputs such as Prodigy's estimate), with
  each sum an input (``_sum<k>``, one per parameter): a handful of scalars per parameter,
  left to XLA;
- ``update``: the step with what ``combine`` computed as inputs (``_r<k>``: per parameter,
  or per step), per element like any elementwise step.

A reduction of a value computed from another reduction would need a second reading pass;
:func:`split` refuses it (the step then runs XLA's loops).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from optgen.ir import Builder, Function, Op, Value, dependencies
from optgen.types import Type

REDUCTIONS = ("sum", "size", "gsum")  # the structural ops the passes take apart


@dataclass(frozen=True)
class Stages:
    reading: Function
    combine: Function
    update: Function


def has_reductions(func: Function) -> bool:
    return any(op.opcode in REDUCTIONS for op in func.ops)


def refusal(func: Function, out_extents: dict[str, str]) -> str | None:
    """Why the step cannot be cut into one reading pass and one update pass (None when it can)."""
    reduced = _reduced(func)
    for op in func.ops:
        if op.opcode != "sum":
            continue
        if op.operands[0].type.extent != "tensor":
            return f"it sums a {op.operands[0].type.extent} value"
        if id(op.operands[0]) in reduced:
            return "a reduction reads another reduction's result (it needs two reading passes)"
    for name, value in func.outputs:
        if out_extents.get(name, "tensor") == "leaf" and id(value) not in reduced:
            return f"the per-parameter output '{name}' is not computed from a reduction"
    return None


def split(func: Function, out_extents: dict[str, str]) -> Stages:
    """Cut ``func`` (which :func:`refusal` accepts) into its reading, combine and update stages."""
    reduced = _reduced(func)
    sums = [op for op in func.ops if op.opcode == "sum"]
    reading = _prune(
        func.with_body(func.ops, [(f"_sum{k}", op.operands[0]) for k, op in enumerate(sums)])
    )
    reading = _reading_only(reading)

    # combine: the sums become per-parameter inputs; its outputs are what the update reads of
    # the reduced scalars, and the outputs that are reduced scalars themselves.
    sum_inputs = {id(op.result): Value(op.result.type, f"_sum{k}") for k, op in enumerate(sums)}
    crossing = _crossing(func, reduced)
    outputs = [(f"_r{k}", v) for k, v in enumerate(crossing)]
    outputs += [
        (name, v)
        for name, v in func.outputs
        if id(v) in reduced and out_extents.get(name, "tensor") != "tensor"
    ]
    combine = _prune(
        _substitute(func, sum_inputs, [op for op in func.ops if op.opcode != "sum"], outputs)
    )

    # update: each crossing value is an input, a float one (a condition is read back as != 0)
    b, given = Builder(), {}
    new_inputs = []
    for k, v in enumerate(crossing):
        new_inputs.append(Value(Type(v.type.extent), f"_r{k}"))
        given[id(v)] = new_inputs[-1]
        if v.type.kind == "bool":
            given[id(v)] = b.op("ne", new_inputs[-1], b.const(0.0))
    kept = [(name, v) for name, v in func.outputs if (name, v) not in outputs]
    ops = b.ops + [op for op in func.ops if id(op.result) not in given]
    update = _reading_only(_prune(_substitute(func, given, ops, kept, extra_inputs=new_inputs)))
    return Stages(reading, combine, update)


def _reading_only(func: Function) -> Function:
    """``func`` without the per-element inputs it does not read, except ``p`` (it sets the compute
    dtypes) and those named like an output (stored over in place)."""
    read = dependencies(func, [v for _, v in func.outputs])
    names = {"p"} | {name for name, _ in func.outputs}
    kept = [v for v in func.inputs if id(v) in read or v.type.extent == "step" or v.name in names]
    return replace(func, inputs=tuple(kept))


def _reduced(func: Function) -> set[int]:
    """Ids of the values computed from a reduction."""
    reduced: set[int] = set()
    for op in func.ops:
        if op.opcode in REDUCTIONS or any(id(v) in reduced for v in op.operands):
            reduced.add(id(op.result))
    return reduced


def _crossing(func: Function, reduced: set[int]) -> list[Value]:
    """The reduced scalars that per-element ops read, in order of first use."""
    seen: dict[int, Value] = {}
    for op in func.ops:
        if op.result.type.extent == "tensor":
            for v in op.operands:
                if id(v) in reduced and v.type.extent != "tensor":
                    seen.setdefault(id(v), v)
    return list(seen.values())


def _substitute(func: Function, given: dict, ops, outputs, extra_inputs=()) -> Function:
    """``func`` over ``ops`` with the values in ``given`` replaced (by new inputs, or by values
    of earlier ops), their given inputs added."""
    new_inputs = [v for v in given.values() if v.name is not None and v not in extra_inputs]
    rebuilt = []
    for op in ops:
        operands = tuple(given.get(id(v), v) for v in op.operands)
        rebuilt.append(Op(op.opcode, operands, op.result, op.attr, op.loc))
    outputs = [(name, given.get(id(v), v)) for name, v in outputs]
    inputs = tuple(func.inputs) + tuple(new_inputs) + tuple(extra_inputs)
    return Function(func.name, inputs, tuple(rebuilt), tuple(outputs))


def _prune(func: Function) -> Function:
    """``func`` without the ops its outputs do not need (its inputs stay)."""
    needed = dependencies(func, [v for _, v in func.outputs])
    return func.with_body([op for op in func.ops if id(op.result) in needed])
