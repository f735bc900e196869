"""Checked spec + option values -> IR :class:`~optgen.ir.Program`.

Options are resolved here: each ``if`` on options keeps the branch its condition
selects, so the IR holds only the code that runs, and ``repeat N:`` is unrolled. An
``if`` on shape constants (``if ndim == 2:``) cannot be resolved before the step sees
its parameters: both branches are lowered, and each name they assign becomes a
``select`` of the two on the condition, a per-parameter value that the evaluator knows
when it traces the step (so it computes only the branch each parameter takes). States
that the chosen branches never touch are left out of the program (and so out of the
optimizer's memory).
"""

from __future__ import annotations

from optgen import syntax as ast
from optgen.checker import CheckedSpec
from optgen.diagnostics import SpecError, did_you_mean
from optgen.ir import Builder, Function, IRError, Loc, Program, Value
from optgen.ops import BINARY_OPCODES, FUNCTIONS, SHAPE_CONSTANTS, UNARY_OPCODES
from optgen.types import NOT_FACTORED, Factoring, Type


def resolve_options(
    checked: CheckedSpec, given: dict[str, object], shared: tuple[str, ...] = ()
) -> dict[str, bool]:
    """The spec's option defaults overridden by ``given``; unknown names and non-bools are errors.
    ``shared`` names the options every spec takes, for the 'did you mean' of a misspelt one."""
    options = dict(checked.options)
    for name, value in given.items():
        if name in checked.hypers:
            raise SpecError(
                f"'{name}' is a hyperparameter of '{checked.name}', not an option",
                code="E303",
                hint="a hyperparameter is set when the optimizer runs, not compiled in: "
                f"optgen.load('{checked.name}', {name}=...), or the kernel's '{name}' input",
            )
        if name not in options:
            spec_options = (
                f"its own options are: {', '.join(options)}"
                if options
                else "it has no options of its own"
            )
            hint = did_you_mean(name, [*options, *shared]) or (
                f"{spec_options}; every spec takes {', '.join(shared)}" if shared else spec_options
            )
            raise SpecError(f"'{checked.name}' has no option '{name}'", hint=hint, code="E303")
        if isinstance(options[name], bool) and not isinstance(value, bool):
            raise SpecError(f"option '{name}' takes true or false, got {value!r}", code="E304")
        if not isinstance(options[name], bool) and (
            isinstance(value, bool) or not isinstance(value, (int, float))
        ):
            raise SpecError(f"option '{name}' takes a number, got {value!r}", code="E312")
        options[name] = value
    return options


def lower_spec(checked: CheckedSpec, options: dict[str, bool]) -> Program:
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
        used = {
            n.id for stmt in _assigns(body) for n in ast.walk(stmt.value) if isinstance(n, ast.Name)
        }
        used |= {stmt.target.id for stmt in _assigns(body)}
        states = [s for s in self.checked.states if s.name.id in used]
        hypers = [Value(Type("step"), name) for name in self.checked.hypers]
        extents = {s.name.id: self.checked.state_extents[s.name.id] for s in states}
        tensors = [Value(Type("tensor"), n) for n in ("p", "g", *(i.name.id for i in spec.inputs))]
        slots = [Value(Type(extent), name) for name, extent in extents.items()]
        inputs = (*tensors, *slots, Value(Type("step"), "t"), *hypers)
        env = self.block(body, {v.name: v for v in inputs})
        # A read-only state is an input of the update, never an output: it costs no write.
        outputs = [
            (n, env[n])
            for n in ("p", *(s.name.id for s in states))
            if n not in self.checked.readonly
        ]
        update = Function(spec.name.id, inputs, tuple(self.builder.ops), tuple(outputs))

        self.builder = Builder()
        init_inputs = (tensors[0], *hypers)
        init_env = {v.name: v for v in init_inputs}
        init_outputs = tuple((s.name.id, self.expr(s.init, init_env)) for s in states)
        init = Function(f"{spec.name.id}.init", init_inputs, tuple(self.builder.ops), init_outputs)
        derived = self.derived(
            spec, (tensors[0], *slots, inputs[len(tensors) + len(slots)], *hypers)
        )
        dtypes = {name: self.checked.state_dtypes[name] for name in extents}
        factoring = NOT_FACTORED
        if "factored" in self.options and "min_dim_size_to_factor" in self.options:
            factoring = Factoring(self.options["factored"], self.options["min_dim_size_to_factor"])
        return Program(
            update, init, dtypes, extents, factoring, derived, tuple(i.name.id for i in spec.inputs)
        )

    def derived(self, spec: ast.Spec, inputs) -> Function | None:
        """The function of the spec's outputs, or None without any."""
        if not spec.outputs:
            return None
        self.builder = Builder()
        env = {v.name: v for v in inputs}
        outputs = tuple((o.name.id, self.expr(o.value, env)) for o in spec.outputs)
        return Function(f"{spec.name.id}.outputs", tuple(inputs), tuple(self.builder.ops), outputs)

    def select(self, stmts) -> list:
        """Resolve options: keep the branches they select and unroll repeats; an ``if`` on shapes
        stays, with its branches resolved.
        """
        out = []
        for stmt in stmts:
            if isinstance(stmt, ast.Assign):
                out.append(stmt)
            elif isinstance(stmt, ast.Repeat):
                count = (
                    stmt.count.value
                    if isinstance(stmt.count, ast.Number)
                    else self.options[stmt.count.id]
                )
                out.extend(self.select(stmt.body) * int(count))
            else:
                cond = self.condition(stmt.cond)
                if isinstance(cond, bool):
                    out.extend(self.select(stmt.then if cond else stmt.orelse))
                else:
                    out.append(
                        ast.If(
                            cond,
                            tuple(self.select(stmt.then)),
                            tuple(self.select(stmt.orelse)),
                            stmt.span,
                        )
                    )
        return out

    def condition(self, cond: ast.Expr) -> bool | ast.Expr:
        """``cond`` with its options replaced by their values: a bool, or what is left to test on
        shapes.
        """
        if isinstance(cond, ast.Bool):
            return cond.value
        if isinstance(cond, ast.Name):
            return self.options[cond.id]
        if isinstance(cond, ast.Unary):
            inner = self.condition(cond.operand)
            return (not inner) if isinstance(inner, bool) else ast.Unary("not", inner, cond.span)
        if cond.op not in ("and", "or"):
            return cond  # a comparison of shape constants
        left, right = self.condition(cond.left), self.condition(cond.right)
        short = cond.op == "or"  # the value that decides `or` (True) or `and` (False) alone
        for side, other in ((left, right), (right, left)):
            if isinstance(side, bool):
                return short if side == short else other
        return ast.Binary(cond.op, left, right, cond.span)

    def block(self, stmts, env: dict[str, Value]) -> dict[str, Value]:
        for stmt in stmts:
            if isinstance(stmt, ast.Assign):
                env[stmt.target.id] = self.expr(stmt.value, env)
                continue
            cond = self.expr(stmt.cond, env)
            then, orelse = self.block(stmt.then, dict(env)), self.block(stmt.orelse, dict(env))
            for name in [name for name in _assigned(stmt) if name in then and name in orelse]:
                if then[name] is orelse[name]:
                    continue
                try:
                    env[name] = self.builder.op(
                        "select", cond, then[name], orelse[name], loc=self.loc(stmt)
                    )
                except IRError:
                    # two matrix extents: the checker refuses any use after the if (E233)
                    env.pop(name, None)
        return env

    def expr(self, node: ast.Expr, env: dict[str, Value]) -> Value:
        b, loc = self.builder, self.loc(node)
        if isinstance(node, (ast.Number, ast.Bool)):
            return b.const(node.value, loc)
        if isinstance(node, ast.Name):
            if node.id in SHAPE_CONSTANTS and node.id not in env:
                return b.op("dim", attr=SHAPE_CONSTANTS[node.id], loc=loc)
            return env[node.id]
        if isinstance(node, ast.Unary):
            return b.op(UNARY_OPCODES[node.op], self.expr(node.operand, env), loc=loc)
        if isinstance(node, ast.Binary):
            return b.op(
                BINARY_OPCODES[node.op],
                self.expr(node.left, env),
                self.expr(node.right, env),
                loc=loc,
            )
        args = [self.expr(arg, env) for arg in node.args]
        return self.call(node.func.id, args, loc)

    def call(self, name: str, args: list[Value], loc: Loc) -> Value:
        return builtin_call(self.builder, name, args, loc)


def _assigns(stmts):
    """Every assignment in ``stmts``, inside ifs too."""
    for stmt in stmts:
        if isinstance(stmt, ast.Assign):
            yield stmt
        else:
            yield from _assigns((*stmt.then, *stmt.orelse))


def _assigned(stmt: ast.If) -> list[str]:
    """The names an if assigns, in the order of their first assignment (so the IR's selects come in
    one order, not a set's, which changes with Python's string hashing from run to run)."""
    return list(dict.fromkeys(a.target.id for a in _assigns((stmt,))))


def builtin_call(b: Builder, name: str, args: list[Value], loc: Loc) -> Value:
    """Append the ops a call of the built-in function ``name`` lowers to; return its value.

    Transforms (``optgen.transforms``) build their norms and clips through it too, so a
    built-in has one meaning in specs and in the options every spec takes.
    """
    return FUNCTIONS[name].lower(b, args, loc)
