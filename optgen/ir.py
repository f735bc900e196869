"""The IR: a flat SSA list of typed ops, with a textual form that round-trips.

A :class:`Function` has named inputs, a list of :class:`Op` each defining one
:class:`Value`, and named outputs. Every value has a :class:`~optgen.types.Type`
(kind and extent). Text form::

    func @adamw(%p: tensor, %g: tensor, %mu: tensor, %t: step, %b1: step) {
      %0 = const 1 : step
      %1 = sub %0, %b1 : step loc("adamw.spec":14:20)
      %2 = mul %1, %g : tensor loc("adamw.spec":14:20)
      return p = %2, mu = %2
    }

``print_function`` numbers op results in order, so printing, parsing and printing
again gives the same text.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace

from optgen.ops import DIMS, OPS
from optgen.types import EXTENTS, NOT_FACTORED, ExtentError, Factoring, Type, widest


class IRError(Exception):
    """Malformed IR (from text, or a pass that broke an invariant).

    ``op`` is the index of the op that does not verify (None for text the parser cannot
    read); ``line``, ``col`` and ``width`` locate the mistake when the IR came from text."""

    def __init__(
        self,
        message: str,
        *,
        op: int | None = None,
        line: int | None = None,
        col: int | None = None,
        width: int = 1,
    ):
        super().__init__(message)
        self.message, self.op, self.line, self.col, self.width = message, op, line, col, width

    def at(self, line: int, text: str, part: str | None = None) -> IRError:
        """This error located at ``part`` of ``text`` (the whole line, without indentation,
        when ``part`` is None or not in it), on line ``line``."""
        found = re.search(re.escape(part) + r"(?!\w)", text) if part else None  # %1, not %12
        start = found.start() if found else len(text) - len(text.lstrip())
        part = part if found else text.strip()
        return IRError(self.message, op=self.op, line=line, col=start + 1, width=max(len(part), 1))


@dataclass(frozen=True)
class Loc:
    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f'loc("{self.file}":{self.line}:{self.col})'


class Value:
    """An SSA value. Identity is the value: two ops never share a result."""

    __slots__ = ("type", "name")

    def __init__(self, type: Type, name: str | None = None):
        self.type = type
        self.name = name  # input values have names; op results are numbered when printed

    def __repr__(self) -> str:
        return f"Value({self.name or id(self)}: {self.type})"


@dataclass(frozen=True)
class Op:
    opcode: str
    operands: tuple[Value, ...]
    result: Value
    attr: float | bool | str | None = None  # the constant of a `const`; the dimension a `dim` reads
    loc: Loc | None = None


@dataclass(frozen=True)
class Function:
    name: str
    inputs: tuple[Value, ...]
    ops: tuple[Op, ...]
    outputs: tuple[tuple[str, Value], ...]

    def input(self, name: str) -> Value:
        return next(v for v in self.inputs if v.name == name)

    def with_body(self, ops, outputs=None) -> Function:
        return replace(
            self, ops=tuple(ops), outputs=tuple(self.outputs if outputs is None else outputs)
        )


@dataclass(frozen=True)
class Program:
    """What a spec lowers to: the per-step update and the state initializer."""

    update: Function
    init: Function
    state_dtypes: dict[str, str | None] = field(default_factory=dict)
    # step, leaf, row, col or tensor; p is a tensor
    state_extents: dict[str, str] = field(default_factory=dict)
    factoring: Factoring = NOT_FACTORED  # which parameters have rows and columns (optgen.types)
    derived: Function | None = None  # the spec's outputs, from p, t, the states and hyperparameters
    # per-element inputs of update beside g (Sophia's Hessian estimate)
    extra_inputs: tuple[str, ...] = ()
    rounding: str = (
        "nearest"  # how update's bf16 stores round: or "stochastic" (codegen/rounding.py)
    )

    def extents(self) -> dict[str, str]:
        """The extent of each output of ``update`` (and, for states, of ``init``)."""
        return {"p": "tensor"} | self.state_extents


def result_type(opcode: str, operands: tuple[Value, ...], attr=None) -> Type:
    """The type an op produces from its operands' types, by the op table (raises IRError if they
    misfit).
    """
    if opcode == "const":
        return Type("step", "bool" if isinstance(attr, bool) else "float")
    if opcode not in OPS:
        raise IRError(f"unknown op '{opcode}'")
    spec = OPS[opcode]
    if len(operands) != spec.arity:
        raise IRError(f"'{opcode}' takes {spec.arity} operands, got {len(operands)}")
    kinds = [v.type.kind for v in operands]
    if kinds != list(spec.operands):
        raise IRError(
            f"'{opcode}' takes ({', '.join(spec.operands)}) operands, got ({', '.join(kinds)})"
        )
    if opcode == "dim" and attr not in DIMS:
        raise IRError(f"'dim' reads one of {', '.join(DIMS)}, got {attr!r}")
    try:
        extent = (
            spec.extent(*(v.type.extent for v in operands))
            if spec.extent
            else widest(v.type.extent for v in operands)
        )
    except ExtentError as err:
        raise IRError(f"'{opcode}': {err}") from None
    if spec.reduces is not None:
        if extent not in spec.reduces:
            raise IRError(
                f"'{opcode}' reduces a {' or '.join(spec.reduces)} value, got a {extent} value"
            )
        extent = spec.reduces[extent]
    return Type(extent, spec.result)


class Builder:
    """Appends ops to a growing list, inferring each result's type."""

    def __init__(self):
        self.ops: list[Op] = []

    def op(self, opcode: str, *operands: Value, attr=None, loc: Loc | None = None) -> Value:
        result = Value(result_type(opcode, operands, attr))
        self.ops.append(Op(opcode, tuple(operands), result, attr, loc))
        return result

    def const(self, value: float | bool, loc: Loc | None = None) -> Value:
        return self.op("const", attr=value, loc=loc)


def dependencies(func: Function, roots, follow=lambda value: True) -> set[int]:
    """Ids of ``roots`` and of every value they are computed from, walking back through the
    values ``follow`` accepts (a value it rejects is neither kept nor walked through)."""
    producers = {id(op.result): op for op in func.ops}
    found, stack = set(), list(roots)
    while stack:
        value = stack.pop()
        if id(value) in found or not follow(value):
            continue
        found.add(id(value))
        if id(value) in producers:
            stack.extend(producers[id(value)].operands)
    return found


def verify(func: Function) -> None:
    """Check SSA form and types; raise IRError naming the first broken op."""
    defined = set(map(id, func.inputs))
    for index, op in enumerate(func.ops):
        for operand in op.operands:
            if id(operand) not in defined:
                raise IRError(
                    f"op {index} ({op.opcode}) uses a value before it is defined", op=index
                )
        try:
            expected = result_type(op.opcode, op.operands, op.attr)
        except IRError as err:
            raise IRError(f"op {index}: {err}", op=index) from None
        if expected != op.result.type:
            raise IRError(
                f"op {index} ({op.opcode}) is typed {op.result.type}, expected {expected}", op=index
            )
        if id(op.result) in defined:
            raise IRError(f"op {index} ({op.opcode}) redefines a value", op=index)
        defined.add(id(op.result))
    for name, value in func.outputs:
        if id(value) not in defined:
            raise IRError(f"output '{name}' is not defined")


# -- text form -------------------------------------------------------------------------------


def print_function(func: Function) -> str:
    names = {id(v): f"%{v.name}" for v in func.inputs}
    for i, op in enumerate(func.ops):
        names[id(op.result)] = f"%{i}"
    args = ", ".join(f"%{v.name}: {v.type}" for v in func.inputs)
    lines = [f"func @{func.name}({args}) {{"]
    for op in func.ops:
        operands = {"const": repr(op.attr).lower(), "dim": op.attr}.get(op.opcode) or ", ".join(
            names[id(v)] for v in op.operands
        )
        loc = f" {op.loc}" if op.loc else ""
        lines.append(f"  {names[id(op.result)]} = {op.opcode} {operands} : {op.result.type}{loc}")
    lines.append("  return " + ", ".join(f"{n} = {names[id(v)]}" for n, v in func.outputs))
    lines[-1] = lines[-1].rstrip()  # a stateless spec's init returns nothing
    lines.append("}")
    return "\n".join(lines) + "\n"


def print_program(program: Program) -> str:
    funcs = (program.update, program.init) + ((program.derived,) if program.derived else ())
    return "\n".join(print_function(func) for func in funcs)


_TYPE = r"(?:bool )?(?:" + "|".join(EXTENTS) + r")"
_HEADER = re.compile(r"func @([\w.]+)\((.*)\) \{$")
_ARG = re.compile(rf"%(\w+): ({_TYPE})$")
_OP = re.compile(rf'%(\d+) = (\w+) (.*?) : ({_TYPE})(?: loc\("([^"]*)":(\d+):(\d+)\))?$')
_RETURN = re.compile(r"return(?: (.*))?$")


def _parse_type(text: str) -> Type:
    return Type(text[5:], "bool") if text.startswith("bool ") else Type(text)


def parse_function(text: str) -> Function:
    """Parse the text form of one function (as print_function writes it)."""
    funcs = parse_functions(text)
    if len(funcs) != 1:
        raise IRError(f"expected one function, got {len(funcs)}")
    return funcs[0]


def parse_functions(text: str, first_line: int = 1) -> list[Function]:
    """Parse every function in ``text`` (as print_program writes them), each verified. Lines
    starting with ``//`` are comments. An IRError locates its line, counting from ``first_line``."""
    funcs, body = [], []
    for number, line in enumerate(text.splitlines(), start=first_line):
        stripped = line.strip()
        if not stripped or stripped.startswith("//"):
            continue
        if not body and not _HEADER.match(stripped):
            raise IRError("expected 'func @name(...) {'").at(number, line)
        body.append((number, line))
        if stripped == "}":
            funcs.append(_parse_body(body))
            body = []
    if body:
        raise IRError("the function has no closing '}'").at(*body[-1])
    if not funcs:
        raise IRError("expected 'func @name(...) {' ... '}'", line=first_line, col=1)
    return funcs


def _parse_body(lines: list[tuple[int, str]]) -> Function:
    """One function from its numbered lines, header to closing brace."""
    header_number, header = lines[0]
    head = _HEADER.match(header.strip())
    inputs, values = [], {}
    for arg in filter(None, (a.strip() for a in head.group(2).split(","))):
        if not (m := _ARG.match(arg)):
            raise IRError(f"bad argument '{arg}'").at(header_number, header, arg)
        value = Value(_parse_type(m.group(2)), m.group(1))
        inputs.append(value)
        values[m.group(1)] = value

    ops, op_lines, outputs = [], [], None
    for number, line in lines[1:-1]:
        lookup = functools.partial(_lookup, values, number, line)

        text = line.strip()
        if outputs is not None:
            raise IRError("an op after 'return'").at(number, line)
        if m := _RETURN.match(text):
            outputs = []
            for item in filter(None, (m.group(1) or "").split(",")):
                name, _, ref = item.partition("=")
                outputs.append((name.strip(), lookup(ref)))
            continue
        if not (m := _OP.match(text)):
            raise IRError(f"cannot parse '{text}'").at(number, line)
        result_number, opcode, body, type_text = m.group(1, 2, 3, 4)
        loc = Loc(m.group(5), int(m.group(6)), int(m.group(7))) if m.group(5) is not None else None
        if opcode == "const":
            attr = {"true": True, "false": False}.get(body.strip())
            try:
                attr = float(body) if attr is None else attr
            except ValueError:
                constant = body.strip()
                raise IRError(f"'{constant}' is not a constant").at(
                    number, line, constant
                ) from None
            operands = ()
        elif opcode == "dim":
            attr, operands = body.strip(), ()
        else:
            attr, operands = None, tuple(lookup(r) for r in body.split(","))
        result = Value(_parse_type(type_text))
        ops.append(Op(opcode, operands, result, attr, loc))
        op_lines.append((number, line))
        values[result_number] = result
    if outputs is None:
        raise IRError("missing 'return'").at(*lines[-1])
    func = Function(head.group(1), tuple(inputs), tuple(ops), tuple(outputs))
    try:
        verify(func)
    except IRError as err:
        raise err.at(*op_lines[err.op]) if err.op is not None else err.at(*lines[-2]) from None
    return func


def _lookup(values: dict, number: int, line: str, ref: str) -> Value:
    """The value ``ref`` (``%name``) names, or an IRError at its place on the line."""
    ref = ref.strip()
    if not ref.startswith("%") or ref[1:] not in values:
        raise IRError(f"unknown value '{ref}'").at(number, line, ref)
    return values[ref[1:]]
