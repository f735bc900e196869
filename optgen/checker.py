"""AST -> checked spec: names resolve, types agree, and the update is complete.

The checker finds every mistake a user can make in a spec before anything is
lowered, and reports it as a :class:`~optgen.diagnostics.SpecError` at the offending
place. Later stages trust what it accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

from optgen import syntax as ast
from optgen.diagnostics import SpecError, did_you_mean
from optgen.hazards import analyze
from optgen.ops import FUNCTIONS, SHAPE_CONSTANTS
from optgen.types import STATE_DTYPES, STATE_EXTENTS, ExtentError, Type, fits, matmul_extent, widest

RESERVED = {"p": "the parameter", "g": "its gradient", "t": "the step number"} | {
    name: "a shape constant" for name in SHAPE_CONSTANTS
}
OPTION = Type("step", "option")
_COMPARE = ("<", "<=", ">", ">=", "==", "!=")  # a compile-time flag: only `if` may test it
# What one number of a value of these extents stands for, in messages.
_PER = {
    "tensor": "element",
    "axes": "slice of each axis",
    "rr": "pair of rows",
    "cc": "pair of columns",
    "cr": "(column, row) pair",
}


@dataclass(frozen=True)
class CheckedSpec:
    """A spec that passed the checker, with its declarations in order."""

    spec: ast.Spec
    hypers: dict[str, float]
    options: dict[str, bool]
    states: tuple[ast.State, ...]
    state_extents: dict[str, str]  # step, leaf or tensor: how many copies of each state there are
    state_dtypes: dict[str, str | None]  # each state's declared storage dtype, if any
    warnings: tuple[SpecError, ...] = ()  # hazards that do not stop compilation (W codes)
    readonly: frozenset[str] = frozenset()  # states initialized once and never written

    @property
    def name(self) -> str:
        return self.spec.name.id

    @property
    def ranges(self) -> dict[str, ast.Range]:
        """The declared range of each hyperparameter that has one."""
        return {h.name.id: h.range for h in self.spec.hypers if h.range is not None}


def check(spec: ast.Spec) -> CheckedSpec:
    """Check ``spec``; raise :class:`SpecError` at the first mistake."""
    return _Checker(spec).run()


class _Checker:
    def __init__(self, spec: ast.Spec):
        self.spec = spec
        self.assigned: set[str] = set()
        self.extents: dict[str, str] = {}
        self.dtypes: dict[str, str | None] = {}
        self.readonly: set[str] = set()
        # names whose two branches gave different matrix extents
        self.conflicts: dict[str, ast.If] = {}
        self.shape_ifs = 0  # how many ifs on shape constants enclose the statement being checked

    def error(
        self, message: str, span, hint: str | None = None, *, code: str | None = None
    ) -> SpecError:
        return SpecError(message, self.spec.source, span, hint, code=code)

    def run(self) -> CheckedSpec:
        spec = self.spec
        self.declare()
        for state in spec.states:
            self.check_state(state)
        if spec.update_span is None:
            raise self.error(
                "the spec has no 'update:' block",
                spec.name.span,
                "add 'update:' followed by indented statements that assign p",
                code="E201",
            )
        env = {name: Type("tensor") for name in ("p", "g")} | {"t": Type("step")}
        env |= {name: Type("leaf") for name in SHAPE_CONSTANTS}
        env |= {h.name.id: Type("step") for h in spec.hypers}
        env |= {o.name.id: OPTION for o in spec.options}
        env |= {name: Type(extent) for name, extent in self.extents.items()}
        env |= {i.name.id: Type("tensor") for i in spec.inputs}
        self.block(spec.body, env)
        for output in spec.outputs:
            self.check_output(output, env)
        if "p" not in self.assigned:
            raise self.error(
                "the update never assigns p",
                spec.update_span,
                "end the update with 'p = p - ...'",
                code="E202",
            )
        self.expect_p_always_assigned(spec.body)
        for state in spec.states:
            if state.name.id not in self.assigned and state.name.id not in self.readonly:
                raise self.error(
                    f"state '{state.name.id}' is never updated",
                    state.name.span,
                    f"assign '{state.name.id} = ...' in the update, declare it 'state "
                    f"{state.name.id}: readonly' if it keeps its initial value, or remove the "
                    "state",
                    code="E203",
                )
        return CheckedSpec(
            spec,
            {h.name.id: h.default for h in spec.hypers},
            {o.name.id: o.default for o in spec.options},
            spec.states,
            self.extents,
            self.dtypes,
            analyze(spec),
            frozenset(self.readonly),
        )

    def declare(self) -> None:
        # here: transforms import the lowering
        from optgen.transforms import (
            DEFAULTS as TRANSFORM_OPTIONS,
        )

        seen: dict[str, str] = {}
        decls = [
            (d.name, kind)
            for kind, group in (
                ("hyper", self.spec.hypers),
                ("option", self.spec.options),
                ("state", self.spec.states),
                ("input", self.spec.inputs),
                ("output", self.spec.outputs),
            )
            for d in group
        ]
        for name, kind in decls:
            if name.id in RESERVED:
                raise self.error(
                    f"'{name.id}' is reserved for {RESERVED[name.id]}",
                    name.span,
                    "choose another name",
                    code="E204",
                )
            # optgen.load(spec, ema_momentum=...) must mean one thing
            if name.id in TRANSFORM_OPTIONS:
                raise self.error(
                    f"'{name.id}' is the name of an option every spec takes (optgen.load(..., "
                    f"{name.id}=...))",
                    name.span,
                    "choose another name; the option applies to this spec as it is",
                    code="E260",
                )
            if name.id in seen:
                raise self.error(
                    f"'{name.id}' is already declared as a {seen[name.id]}",
                    name.span,
                    "each hyper, option and state needs its own name",
                    code="E205",
                )
            seen[name.id] = kind

    def check_state(self, state: ast.State) -> None:
        name = state.name.id
        extent, dtype = "tensor", None
        seen: set[str] = set()
        for q in state.qualifiers:
            group = (
                "shape"
                if q.id in STATE_EXTENTS
                else "dtype"
                if q.id in STATE_DTYPES
                else "access"
                if q.id == "readonly"
                else None
            )
            if group is None:
                raise self.error(
                    f"unknown state shape or storage dtype '{q.id}'",
                    q.span,
                    did_you_mean(q.id, [*STATE_EXTENTS, *STATE_DTYPES, "readonly"])
                    or f"a shape is one of {', '.join(STATE_EXTENTS)}; "
                    f"a dtype one of {', '.join(STATE_DTYPES)}; or readonly",
                    code="E206",
                )
            if group in seen:
                raise self.error(
                    f"state '{name}' has a second {group} '{q.id}'",
                    q.span,
                    f"give at most one {group}",
                    code="E219",
                )
            seen.add(group)
            if group == "shape":
                extent = q.id
            elif group == "dtype":
                dtype = q.id
            else:
                self.readonly.add(name)
        self.extents[name], self.dtypes[name] = extent, dtype
        if dtype == "q8" and extent != "tensor":
            q8 = next(q for q in state.qualifiers if q.id == "q8")
            raise self.error(
                f"state '{name}' is one value per {extent}, and only a per-element state can be q8",
                q8.span,
                "q8 stores blocks of 256 elements of a parameter with one scale each; "
                "drop q8 (or the shape) here",
                code="E400",
            )
        if extent in ("row", "col"):
            self.expect_factoring(state.qualifiers[0].span if state.qualifiers else state.name.span)
        env = {"p": Type("tensor")} | {h.name.id: Type("step") for h in self.spec.hypers}
        init = self.expect_float(state.init, env, "a state's initial value")
        self.expect_fits(state.init, init, name, extent)

    def check_output(self, output: ast.Output, update_env: dict[str, Type]) -> None:
        """An output is computed from p, t, the states, hyperparameters and shape constants, after a
        step.
        """
        env = {
            name: ty
            for name, ty in update_env.items()
            if name in ("p", "t")
            or self.declared_kind(name) in ("hyper", "state")
            or name in SHAPE_CONSTANTS
        }
        env = {name: ty for name, ty in env.items() if self.declared_kind(name) != "input"}
        env |= {name: Type(extent) for name, extent in self.extents.items()}
        ty = self.expect_float(output.value, env, "an output")
        if not fits(ty.extent, "tensor"):
            raise self.error(
                f"output '{output.name.id}' is one value per element of its parameter, but this "
                f"value has one per {ty.extent}",
                output.value.span,
                "multiply a matrix value into a tensor first",
                code="E237",
            )

    def expect_factoring(self, span) -> None:
        """Row and column values need the factoring rule's two options, with optax's names."""
        wanted = {"factored": bool, "min_dim_size_to_factor": float}
        for name, kind in wanted.items():
            found = [o for o in self.spec.options if o.name.id == name]
            if not found or isinstance(found[0].default, bool) != (kind is bool):
                example = "true" if kind is bool else "128"
                raise self.error(
                    f"row and column values need 'option {name} = {example}'",
                    span,
                    "they decide which parameters are factored, as optax.adafactor does",
                    code="E221",
                )

    def expect_fits(self, node: ast.Expr, ty: Type, name: str, extent: str) -> None:
        """A state of ``extent`` holds ``ty`` only if ``ty`` has no more copies (a narrower one
        broadcasts).
        """
        if not fits(ty.extent, extent):
            raise self.error(
                f"state '{name}' holds one number per {_PER.get(extent, extent)}, but this value "
                f"has one per {_PER.get(ty.extent, ty.extent)}",
                node.span,
                f"reduce it (sum, mean, norm) or declare 'state {name}: {ty.extent}'",
                code="E220",
            )

    # -- statements -----------------------------------------------------------------------

    def block(self, stmts, env: dict[str, Type]) -> dict[str, Type]:
        for stmt in stmts:
            if isinstance(stmt, ast.Assign):
                self.assign(stmt, env)
            elif isinstance(stmt, ast.Repeat):
                self.repeat(stmt, env)
            else:
                self.if_stmt(stmt, env)
        return env

    def repeat(self, stmt: ast.Repeat, env: dict[str, Type]) -> None:
        count = stmt.count
        if isinstance(count, ast.Name):
            if self.declared_kind(count.id) != "option" or isinstance(
                self.option_default(count.id), bool
            ):
                raise self.error(
                    f"'repeat {count.id}' needs a number fixed at compile time",
                    count.span,
                    f"write a count (repeat 5:) or declare 'option {count.id} = 5'",
                    code="E234",
                )
            value = self.option_default(count.id)
        else:
            value = count.value
        if value < 1 or value != int(value):
            raise self.error(
                f"a repeat count is a positive whole number, got {value:g}",
                count.span,
                "for example: repeat 5:",
                code="E234",
            )
        # Twice: the second pass sees the types the first one left (a loop-carried value may widen).
        self.block(stmt.body, env)
        self.block(stmt.body, env)

    def assign(self, stmt: ast.Assign, env: dict[str, Type]) -> None:
        name = stmt.target
        kind = self.declared_kind(name.id)
        if name.id in ("g", "t"):
            raise self.error(
                f"cannot assign to '{name.id}', {RESERVED[name.id]}",
                name.span,
                "assign to a new local name instead",
                code="E207",
            )
        if kind in ("hyper", "option"):
            raise self.error(
                f"cannot assign to {kind} '{name.id}'",
                name.span,
                f"{kind}s are read-only in the update; assign to a new local name",
                code="E208",
            )
        if kind == "input":
            raise self.error(
                f"cannot assign to input '{name.id}': it arrives with the gradients",
                name.span,
                "assign to a new local name instead",
                code="E238",
            )
        value = self.expect_float(stmt.value, env, "an assigned value")
        if kind == "state" and name.id in self.readonly:
            raise self.error(
                f"state '{name.id}' is read-only: it keeps its initial value",
                name.span,
                f"remove 'readonly' from 'state {name.id}' to update it, or assign to a new local "
                "name",
                code="E236",
            )
        if kind == "state" and self.shape_ifs and self.extents[name.id] == "step":
            raise self.error(
                f"state '{name.id}' is one number per step, shared by every parameter, so it "
                "cannot be assigned under an 'if' on a parameter's shape",
                name.span,
                f"declare 'state {name.id}: leaf' to keep one per parameter",
                code="E235",
            )
        if kind == "state":
            # A state is stored in its declared shape, whatever narrower value is assigned to it.
            self.expect_fits(stmt.value, value, name.id, self.extents[name.id])
        # Until the step ends, the name holds the value as assigned (a per-step value stays one
        # number, as the lowering keeps it), so a reduction of it is refused here (E2xx), not
        # by the IR builder.
        env[name.id] = value
        self.assigned.add(name.id)

    def expect_p_always_assigned(self, stmts, later: bool = False) -> None:
        """An ``if`` that assigns p on one side only, with nothing assigning it after (``later``:
        after the enclosing block), is an error: with the other options p never changes."""
        for i, stmt in enumerate(stmts):
            if not isinstance(stmt, ast.If):
                continue
            after = later or _assigns_p(stmts[i + 1 :])
            then, orelse = _assigns_p(stmt.then), _assigns_p(stmt.orelse)
            if (
                then != orelse
                and not after
                and not _may_assign_p(stmt.orelse if then else stmt.then)
            ):
                raise self.error(
                    f"p is assigned only when this condition is {'true' if then else 'false'}: "
                    f"when it is {'false' if then else 'true'}, the update never changes the "
                    "parameters",
                    stmt.span,
                    "assign p in both branches (add an 'else:'), or after the if",
                    code="E224",
                )
            self.expect_p_always_assigned(stmt.then, after)
            self.expect_p_always_assigned(stmt.orelse, after)

    def if_stmt(self, stmt: ast.If, env: dict[str, Type]) -> None:
        self.check_condition(stmt.cond)
        on_shapes = any(
            isinstance(n, ast.Name) and n.id in SHAPE_CONSTANTS for n in ast.walk(stmt.cond)
        )
        self.shape_ifs += on_shapes
        then = self.block(stmt.then, dict(env))
        orelse = self.block(stmt.orelse, dict(env))
        self.shape_ifs -= on_shapes
        # After the if, a name is defined only if both branches define it (with extents that
        # combine).
        for name in then.keys() & orelse.keys():
            try:
                env[name] = Type(widest((then[name].extent, orelse[name].extent)), then[name].kind)
            except ExtentError:
                env.pop(name, None)
                self.conflicts[name] = stmt

    def check_condition(self, cond: ast.Expr) -> None:
        """An ``if`` tests options and, per parameter when the step is traced, its shape
        constants.
        """
        stack = [cond]
        while stack:
            node = stack.pop()
            if isinstance(node, ast.Unary) and node.op == "not":
                stack.append(node.operand)
                continue
            if isinstance(node, ast.Binary) and node.op in ("and", "or"):
                stack.extend((node.left, node.right))
                continue
            if isinstance(node, ast.Bool):
                continue
            if isinstance(node, ast.Binary) and node.op in _COMPARE and self.is_shape_expr(node):
                continue
            if isinstance(node, ast.Name) and self.declared_kind(node.id) == "option":
                if not isinstance(self.option_default(node.id), bool):
                    raise self.error(
                        f"option '{node.id}' is a number, not a flag",
                        node.span,
                        "test a true/false option here",
                        code="E222",
                    )
                continue
            if isinstance(node, ast.Name) and node.id not in self.all_declared():
                raise self.unknown_name(node, list(o.name.id for o in self.spec.options))
            raise self.error(
                "an 'if' tests options and shapes, which are fixed at compile time",
                node.span,
                "declare 'option NAME = false' to test it here, or compare shape constants "
                f"({', '.join(SHAPE_CONSTANTS)}: if ndim == 2:); for a per-element choice use "
                "where(cond, a, b)",
                code="E210",
            )

    def is_shape_expr(self, expr: ast.Binary) -> bool:
        """A comparison of numbers and shape constants (with + - * /): known per parameter at trace
        time.
        """
        leaves = [
            n
            for n in ast.walk(expr)
            if not (isinstance(n, ast.Binary) and n.op in "+-*/")
            and not (isinstance(n, ast.Unary) and n.op == "-")
            and n is not expr
        ]
        return any(isinstance(n, ast.Name) for n in leaves) and all(
            isinstance(n, ast.Number) or (isinstance(n, ast.Name) and n.id in SHAPE_CONSTANTS)
            for n in leaves
        )

    # -- expressions ----------------------------------------------------------------------

    def expect_float(self, expr: ast.Expr, env: dict[str, Type], what: str) -> Type:
        ty = self.expr(expr, env)
        if ty.kind != "float":
            raise self.error(
                f"{what} must be a number, not a condition",
                expr.span,
                "use where(cond, a, b) to choose between numbers",
                code="E211",
            )
        return ty

    def expr(self, expr: ast.Expr, env: dict[str, Type]) -> Type:
        if isinstance(expr, ast.Number):
            return Type("step")
        if isinstance(expr, ast.Bool):
            return Type("step", "bool")
        if isinstance(expr, ast.Name):
            if expr.id not in env and expr.id in self.conflicts:
                raise self.error(
                    f"'{expr.id}' is a different kind of matrix in the two branches of the 'if' on "
                    f"line {self.conflicts[expr.id].span.line}",
                    expr.span,
                    "use it inside each branch, or give the two values different names",
                    code="E233",
                )
            if expr.id not in env:
                raise self.unknown_name(expr, env)
            if env[expr.id] is OPTION:
                raise self.error(
                    f"option '{expr.id}' can only be tested by 'if'",
                    expr.span,
                    f"write 'if {expr.id}:' around the statements it selects",
                    code="E213",
                )
            return env[expr.id]
        if isinstance(expr, ast.Unary):
            inner = self.expr(expr.operand, env)
            want = "bool" if expr.op == "not" else "float"
            self.expect_kind(expr.operand, inner, want, f"'{expr.op}'")
            return inner
        if isinstance(expr, ast.Binary):
            return self.binary(expr, env)
        return self.call(expr, env)

    def binary(self, expr: ast.Binary, env: dict[str, Type]) -> Type:
        left, right = self.expr(expr.left, env), self.expr(expr.right, env)
        logical = expr.op in ("and", "or")
        for node, ty in ((expr.left, left), (expr.right, right)):
            self.expect_kind(node, ty, "bool" if logical else "float", f"'{expr.op}'")
        kind = "bool" if logical or expr.op in _COMPARE else "float"
        if expr.op == "@":
            try:
                return Type(matmul_extent(left.extent, right.extent))
            except ExtentError as err:
                raise self.error(
                    f"this matrix product does not fit: {err}",
                    expr.span,
                    "a product takes matrices (per-element values of a matrix parameter) whose "
                    "inner axes agree: g @ transpose(g), transpose(g) @ g",
                    code="E231",
                ) from None
        return Type(self.combine(expr, (left.extent, right.extent)), kind)

    def combine(self, expr: ast.Expr, extents) -> str:
        extents = tuple(extents)
        try:
            return widest(extents)
        except ExtentError as err:
            if "axes" in set(extents):
                raise self.error(
                    f"a per-axis statistic does not combine with these values: {err}",
                    expr.span,
                    "read it per element with axis_min(v), or make one from a tensor with "
                    "axis_max(x)",
                    code="E239",
                ) from None
            raise self.error(
                f"these values have different shapes: {err}",
                expr.span,
                "a Gram matrix (x @ transpose(x)) combines only with itself and with scalars; "
                "multiply it into a tensor first",
                code="E230",
            ) from None

    def call(self, expr: ast.Call, env: dict[str, Type]) -> Type:
        fn = FUNCTIONS.get(expr.func.id)
        if fn is None:
            raise self.error(
                f"unknown function '{expr.func.id}'",
                expr.func.span,
                did_you_mean(expr.func.id, FUNCTIONS)
                or f"the functions are {', '.join(sorted(FUNCTIONS))}",
                code="E214",
            )
        if len(expr.args) != fn.arity:
            s = "" if fn.arity == 1 else "s"
            raise self.error(
                f"{fn.name} takes {fn.arity} argument{s}, got {len(expr.args)}",
                expr.span,
                f"{fn.name}: {fn.doc}",
                code="E215",
            )
        types = [self.expr(arg, env) for arg in expr.args]
        for arg, ty, kind in zip(expr.args, types, fn.operands, strict=True):
            self.expect_kind(arg, ty, kind, fn.name)
        if fn.extent is not None:
            try:
                return Type(fn.extent(*(ty.extent for ty in types)))
            except ExtentError as err:
                if fn.name == "eye":
                    raise self.error(
                        f"eye: {err}",
                        expr.args[0].span,
                        "eye(a) is the identity of a Gram matrix a = x @ transpose(x) or "
                        "transpose(x) @ x, or of a state declared 'rr' or 'cc'",
                        code="E241",
                    ) from None
                raise self.error(
                    f"{fn.name}: {err}",
                    expr.args[0].span,
                    f"pass a per-element value of a matrix parameter to {fn.name}",
                    code="E231",
                ) from None
        extent = self.combine(expr, (ty.extent for ty in types))
        if fn.reduces is None:
            return Type(extent)
        if extent not in fn.reduces and set(fn.reduces) == {"axes"}:
            raise self.error(
                f"{fn.name} reads per-axis statistics, but this is one number per "
                f"{_PER.get(extent, extent)}",
                expr.args[0].span,
                "pass a state declared 'state v: axes = 0' or a value of axis_max(x)",
                code="E240",
            )
        if extent not in fn.reduces:
            raise self.error(
                f"{fn.name} reduces over a tensor's elements, but this is one number per "
                f"{_PER.get(extent, extent)}",
                expr.args[0].span,
                f"pass a per-element value such as g or p to {fn.name}",
                code="E216",
            )
        if fn.reduces[extent] in ("row", "col"):
            self.expect_factoring(expr.func.span)
        return Type(fn.reduces[extent])

    def expect_kind(self, node: ast.Expr, ty: Type, want: str, where: str) -> None:
        if ty.kind == want:
            return
        if want == "bool":
            raise self.error(
                f"{where} needs a condition, not a number",
                node.span,
                "compare it, e.g. x > 0",
                code="E212",
            )
        raise self.error(
            f"{where} needs a number, not a condition",
            node.span,
            "use where(cond, a, b) to turn a condition into a number",
            code="E211",
        )

    # -- names ----------------------------------------------------------------------------

    def declared_kind(self, name: str) -> str | None:
        for kind, group in (
            ("hyper", self.spec.hypers),
            ("option", self.spec.options),
            ("state", self.spec.states),
            ("input", self.spec.inputs),
        ):
            if any(d.name.id == name for d in group):
                return kind
        return None

    def option_default(self, name: str) -> bool | float:
        return next(o.default for o in self.spec.options if o.name.id == name)

    def all_declared(self) -> set[str]:
        return {
            d.name.id
            for group in (self.spec.hypers, self.spec.options, self.spec.states, self.spec.inputs)
            for d in group
        } | set(RESERVED)

    def unknown_name(self, name: ast.Name, candidates) -> SpecError:
        hint = did_you_mean(name.id, candidates)
        if hint is None and name.id in self.all_declared():
            hint = f"'{name.id}' cannot be used here"
        return self.error(
            f"unknown name '{name.id}'",
            name.span,
            hint or "declare it with 'hyper', 'state' or 'option', or assign it before this line",
            code="E209",
        )


def _may_assign_p(stmts) -> bool:
    """Whether ``stmts`` assign p with some options (a nested ``if`` then says which)."""
    return any(
        isinstance(s, ast.Assign)
        and s.target.id == "p"
        or isinstance(s, ast.If)
        and (_may_assign_p(s.then) or _may_assign_p(s.orelse))
        for s in stmts
    )


def _assigns_p(stmts) -> bool:
    """Whether ``stmts`` assign p whatever the options."""
    return any(
        isinstance(s, ast.Assign)
        and s.target.id == "p"
        or isinstance(s, ast.If)
        and _assigns_p(s.then)
        and _assigns_p(s.orelse)
        for s in stmts
    )
