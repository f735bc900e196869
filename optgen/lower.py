"""Checked spec + option values -> IR :class:`~optgen.ir.Program`.

Options are resolved here: each ``if`` keeps the branch its condition selects, so the
IR holds only the code that runs. States that the chosen branches never touch are
left out of the program (and so out of the optimizer's memory).
"""

from __future__ import annotations

from optgen import syntax as ast
from optgen.checker import CheckedSpec
from optgen.diagnostics import SpecError, did_you_mean
from optgen.ir import Builder, Function, Loc, Program, Value
from optgen.ops import FUNCTIONS
from optgen.types import NOT_FACTORED, Factoring, Type

_BINARY = {"+": "add", "-": "sub", "*": "mul", "/": "div", "^": "pow", "<": "lt", "<=": "le",
           ">": "gt", ">=": "ge", "==": "eq", "!=": "ne", "and": "and", "or": "or"}
_UNARY = {"-": "neg", "not": "not"}


def resolve_options(checked: CheckedSpec, given: dict[str, object]) -> dict[str, bool]:
    """The spec's option defaults overridden by ``given``; unknown names and non-bools are errors."""
    options = dict(checked.options)
    for name, value in given.items():
        if name not in options:
            hint = did_you_mean(name, options) or (
                f"its options are: {', '.join(options)}" if options else "it has no options")
            raise SpecError(f"'{checked.name}' has no option '{name}'", hint=hint, code="E303")
        if isinstance(options[name], bool) and not isinstance(value, bool):
            raise SpecError(f"option '{name}' takes true or false, got {value!r}", code="E304")
        if not isinstance(options[name], bool) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise SpecError(f"option '{name}' takes a number, got {value!r}", code="E312")
        options[name] = value
    return options


def lower(checked: CheckedSpec, options: dict[str, bool]) -> Program:
    """Lower ``checked`` with resolved ``options`` to the update and init functions."""
    return _Lowering(checked, options).run()


class _Lowering:
    def __init__(self, checked: CheckedSpec, options: dict[str, bool]):
        self.checked = checked
        self.options = options
        self.filename = checked.spec.source.filename
        self.builder = Builder()

    def loc(self, node) -> Loc:
        return Loc(self.filename, node.span.line, node.span.col)

    def run(self) -> Program:
        spec = self.checked.spec
        body = self.select(spec.body)
        used = {n.id for stmt in body for n in ast.walk(stmt.value) if isinstance(n, ast.Name)}
        used |= {stmt.target.id for stmt in body}
        states = [s for s in self.checked.states if s.name.id in used]
        hypers = [Value(Type("step"), name) for name in self.checked.hypers]
        extents = {s.name.id: self.checked.state_extents[s.name.id] for s in states}
        tensors = [Value(Type("tensor"), n) for n in ("p", "g")]
        slots = [Value(Type(extent), name) for name, extent in extents.items()]
        inputs = (*tensors, *slots, Value(Type("step"), "t"), *hypers)
        env = {v.name: v for v in inputs}
        for stmt in body:
            env[stmt.target.id] = self.expr(stmt.value, env)
        outputs = [(n, env[n]) for n in ("p", *(s.name.id for s in states))]
        update = Function(spec.name.id, inputs, tuple(self.builder.ops), tuple(outputs))

        self.builder = Builder()
        init_inputs = (tensors[0], *hypers)
        init_env = {v.name: v for v in init_inputs}
        init_outputs = tuple((s.name.id, self.expr(s.init, init_env)) for s in states)
        init = Function(f"{spec.name.id}.init", init_inputs, tuple(self.builder.ops), init_outputs)
        dtypes = {name: self.checked.state_dtypes[name] for name in extents}
        factoring = NOT_FACTORED
        if "factored" in self.options and "min_dim_size_to_factor" in self.options:
            factoring = Factoring(self.options["factored"], self.options["min_dim_size_to_factor"])
        return Program(update, init, dtypes, extents, factoring)

    def select(self, stmts) -> list[ast.Assign]:
        """Flatten ``if`` statements to the assignments the options select."""
        out = []
        for stmt in stmts:
            if isinstance(stmt, ast.Assign):
                out.append(stmt)
            else:
                out.extend(self.select(stmt.then if self.condition(stmt.cond) else stmt.orelse))
        return out

    def condition(self, cond: ast.Expr) -> bool:
        if isinstance(cond, ast.Bool):
            return cond.value
        if isinstance(cond, ast.Name):
            return self.options[cond.id]
        if isinstance(cond, ast.Unary):
            return not self.condition(cond.operand)
        left, right = self.condition(cond.left), self.condition(cond.right)
        return (left and right) if cond.op == "and" else (left or right)

    def expr(self, node: ast.Expr, env: dict[str, Value]) -> Value:
        b, loc = self.builder, self.loc(node)
        if isinstance(node, (ast.Number, ast.Bool)):
            return b.const(node.value, loc)
        if isinstance(node, ast.Name):
            return env[node.id]
        if isinstance(node, ast.Unary):
            return b.op(_UNARY[node.op], self.expr(node.operand, env), loc=loc)
        if isinstance(node, ast.Binary):
            return b.op(_BINARY[node.op], self.expr(node.left, env), self.expr(node.right, env), loc=loc)
        args = [self.expr(arg, env) for arg in node.args]
        return self.call(node.func.id, args, loc)

    def call(self, name: str, args: list[Value], loc: Loc) -> Value:
        return builtin_call(self.builder, name, args, loc)


def builtin_call(b: Builder, name: str, args: list[Value], loc: Loc) -> Value:
    """Append the ops a call of the built-in function ``name`` lowers to; return its value.

    Transforms (``optgen.transforms``) build their norms and clips through it too, so a
    built-in has one meaning in specs and in the options every spec takes.
    """
    return FUNCTIONS[name].lower(b, args, loc)
