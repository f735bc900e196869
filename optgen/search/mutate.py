"""Random edits of a spec's syntax tree: the search's mutations, and ``optgen mutate``.

A mutation edits the update block of a parsed spec (``optgen.syntax``) and the result is
printed back as spec text (``syntax.format_source``) and checked again; a mutant the checker
rejects is redrawn, never returned. Five kinds, after Chen et al. 2023 ("Symbolic Discovery
of Optimization Algorithms"):

- ``insert``: a new statement ``x = EXPR`` (x a new local that a later statement then reads,
  or an existing local, state or ``p``);
- ``delete``: a statement removed;
- ``modify``: one sub-expression changed: an operator, a function, an operand, a constant,
  or a sub-expression redrawn;
- ``state``: a new state ``s = c * s + (1 - c) * X`` that a later statement reads instead of a name;
- ``hyper``: a hyperparameter's default scaled (within its declared range).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, replace

from optgen import syntax as ast
from optgen.checker import check
from optgen.diagnostics import Span, SpecError
from optgen.parser import parse

KINDS = ("insert", "delete", "modify", "state", "hyper")
_UNARY = ("sqrt", "abs", "sign", "exp", "log", "tanh", "rsqrt")
_BINARY_FUNCS = ("max", "min")
_OPERATORS = ("+", "-", "*", "/")
_CONSTANTS = (0.5, 1.0, 2.0, 0.1, 0.9, 0.99, 0.999, 1e-8, 1e-3, 3.0)
_DECAYS = (0.9, 0.95, 0.99, 0.999)
_SCALES = (0.1, 0.5, 2.0, 10.0)
MAX_TRIES = 200  # draws before giving up on a spec whose every mutant is invalid
_HERE = Span(1, 1, 1, 1)  # new nodes point nowhere: the mutant is printed and parsed again


@dataclass(frozen=True)
class Mutant:
    """A checked variant of a spec: its text and the edits that made it."""

    text: str
    edits: tuple[str, ...]


def parse_text(text: str, filename: str = "<mutant>") -> ast.Spec:
    return parse(text, filename)


def mutate(spec: ast.Spec, rng: random.Random, edits: int = 1, tries: int = MAX_TRIES) -> Mutant:
    """A random variant of ``spec`` with ``edits`` mutations in a row, checked.

    Draws until the checker accepts the printed mutant, at most ``tries`` times; raises
    ``SpecError`` (E019) when none is valid.
    """
    for _ in range(tries):
        current, done = spec, []
        for _ in range(edits):
            kind = rng.choice(KINDS)
            edited = _EDITS[kind](current, rng)
            if edited is None:
                break
            current, what = edited
            done.append(what)
        else:
            current = replace(
                current, description=f"{spec.name.id} mutated: {'; '.join(done)}".replace('"', "'")
            )
            text = ast.format_source(current)
            try:
                check(parse(text, "<mutant>"))
            except SpecError:
                continue
            return Mutant(text, tuple(done))
    raise SpecError(
        f"no valid mutant of '{spec.name.id}' in {tries} draws",
        hint="the spec's update block needs at least one statement a mutation can edit",
        code="E019",
    )


# ---- what a statement may read -------------------------------------------------------------


def _visible(spec: ast.Spec, position: int) -> list[str]:
    """Names a statement at ``position`` of the update block may read."""
    names = ["g", "p", *(s.name.id for s in spec.states), *(i.name.id for i in spec.inputs)]
    names += [
        s.target.id
        for s in spec.body[:position]
        if isinstance(s, ast.Assign) and s.target.id not in names
    ]
    return names


def _hypers(spec: ast.Spec) -> list[str]:
    return [h.name.id for h in spec.hypers]


def _fresh(spec: ast.Spec, stem: str) -> str:
    taken = (
        {h.name.id for h in spec.hypers}
        | {s.name.id for s in spec.states}
        | {o.name.id for o in spec.options}
    )
    taken |= {s.target.id for s in spec.body if isinstance(s, ast.Assign)}
    return next(f"{stem}{k}" for k in range(1, 10_000) if f"{stem}{k}" not in taken)


def _leaf(rng: random.Random, names: list[str], hypers: list[str]) -> ast.Expr:
    roll = rng.random()
    if roll < 0.6:
        return ast.Name(rng.choice(names), _HERE)
    if roll < 0.75 and hypers:
        return ast.Name(rng.choice(hypers), _HERE)
    return ast.Number(rng.choice(_CONSTANTS), _HERE)


def _expr(rng: random.Random, names: list[str], hypers: list[str], depth: int = 2) -> ast.Expr:
    """A random expression over ``names``, hyperparameters and constants, at most ``depth`` deep."""
    roll = rng.random()
    if depth == 0 or roll < 0.3:
        return _leaf(rng, names, hypers)
    if roll < 0.55:
        return ast.Call(
            ast.Name(rng.choice(_UNARY), _HERE), (_expr(rng, names, hypers, depth - 1),), _HERE
        )
    if roll < 0.6:
        args = (_expr(rng, names, hypers, depth - 1), _expr(rng, names, hypers, depth - 1))
        return ast.Call(ast.Name(rng.choice(_BINARY_FUNCS), _HERE), args, _HERE)
    if roll < 0.65:
        return ast.Binary(
            "^", _leaf(rng, names, []), ast.Number(rng.choice((2.0, 0.5, 3.0)), _HERE), _HERE
        )
    return ast.Binary(
        rng.choice(_OPERATORS),
        _expr(rng, names, hypers, depth - 1),
        _expr(rng, names, hypers, depth - 1),
        _HERE,
    )


# ---- sub-expressions by path ------------------------------------------------------------------


def _children(expr: ast.Expr) -> tuple[ast.Expr, ...]:
    if isinstance(expr, ast.Unary):
        return (expr.operand,)
    if isinstance(expr, ast.Binary):
        return (expr.left, expr.right)
    if isinstance(expr, ast.Call):
        return expr.args
    return ()


def _paths(expr: ast.Expr, path: tuple[int, ...] = ()):
    yield path, expr
    for i, child in enumerate(_children(expr)):
        yield from _paths(child, (*path, i))


def _replace_at(expr: ast.Expr, path: tuple[int, ...], new: ast.Expr) -> ast.Expr:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(expr, ast.Unary):
        return replace(expr, operand=_replace_at(expr.operand, rest, new))
    if isinstance(expr, ast.Binary):
        side = "left" if head == 0 else "right"
        return replace(expr, **{side: _replace_at(getattr(expr, side), rest, new)})
    args = list(expr.args)
    args[head] = _replace_at(args[head], rest, new)
    return replace(expr, args=tuple(args))


def _assignments(spec: ast.Spec) -> list[int]:
    return [i for i, s in enumerate(spec.body) if isinstance(s, ast.Assign)]


def _with_body(spec: ast.Spec, body: list) -> ast.Spec:
    return replace(spec, body=tuple(body))


def _read_instead(
    spec: ast.Spec, body: list, after: int, new_name: str, rng: random.Random
) -> bool:
    """Make one statement after ``after`` read ``new_name`` in place of a name; False if none reads
    one.
    """
    spots = [
        (i, path)
        for i in range(after + 1, len(body))
        if isinstance(body[i], ast.Assign)
        for path, node in _paths(body[i].value)
        if isinstance(node, ast.Name) and node.id not in _hypers(spec)
    ]
    if not spots:
        return False
    i, path = rng.choice(spots)
    body[i] = replace(body[i], value=_replace_at(body[i].value, path, ast.Name(new_name, _HERE)))
    return True


# ---- the five kinds ---------------------------------------------------------------------------


def _insert(spec: ast.Spec, rng: random.Random):
    body = list(spec.body)
    at = rng.randrange(len(body) + 1)
    names = _visible(spec, at)
    if rng.random() < 0.5:
        target = _fresh(spec, "v")
        body.insert(
            at, ast.Assign(ast.Name(target, _HERE), _expr(rng, names, _hypers(spec)), _HERE)
        )
        if not _read_instead(spec, body, at, target, rng):
            return None
    else:
        target = rng.choice(
            [n for n in names if n != "g" and n not in (i.name.id for i in spec.inputs)]
        )
        body.insert(
            at, ast.Assign(ast.Name(target, _HERE), _expr(rng, names, _hypers(spec)), _HERE)
        )
    return _with_body(spec, body), f"insert {target} = {ast.source_expr(body[at].value)}"


def _delete(spec: ast.Spec, rng: random.Random):
    if len(spec.body) < 2:
        return None
    body = list(spec.body)
    gone = body.pop(rng.randrange(len(body)))
    what = (
        f"{gone.target.id} = {ast.source_expr(gone.value)}"
        if isinstance(gone, ast.Assign)
        else "a block"
    )
    return _with_body(spec, body), f"delete {what}"


def _modify(spec: ast.Spec, rng: random.Random):
    candidates = _assignments(spec)
    if not candidates:
        return None
    i = rng.choice(candidates)
    stmt = spec.body[i]
    path, node = rng.choice(list(_paths(stmt.value)))
    names, hypers = _visible(spec, i), _hypers(spec)
    if isinstance(node, ast.Binary) and node.op in _OPERATORS and rng.random() < 0.5:
        new = replace(node, op=rng.choice([o for o in _OPERATORS if o != node.op]))
    elif (
        isinstance(node, ast.Call)
        and len(node.args) == 1
        and node.func.id in _UNARY
        and rng.random() < 0.5
    ):
        new = replace(
            node, func=ast.Name(rng.choice([f for f in _UNARY if f != node.func.id]), _HERE)
        )
    elif isinstance(node, ast.Number) and rng.random() < 0.7:
        new = replace(
            node, value=node.value * rng.choice(_SCALES) if node.value else rng.choice(_CONSTANTS)
        )
    elif isinstance(node, ast.Name) and rng.random() < 0.7:
        new = ast.Name(rng.choice(names + hypers), _HERE)
    elif rng.random() < 0.3:
        new = ast.Call(ast.Name(rng.choice(_UNARY), _HERE), (node,), _HERE)
    else:
        new = _expr(rng, names, hypers)
    body = list(spec.body)
    body[i] = replace(stmt, value=_replace_at(stmt.value, path, new))
    return _with_body(
        spec, body
    ), f"modify {stmt.target.id}: {ast.source_expr(node)} -> {ast.source_expr(new)}"


def _new_state(spec: ast.Spec, rng: random.Random):
    name = _fresh(spec, "s")
    body = list(spec.body)
    at = rng.randrange(len(body))
    decay = ast.Number(rng.choice(_DECAYS), _HERE)
    tracked = _expr(rng, _visible(spec, at), [], depth=1)
    ema = ast.Binary(
        "+",
        ast.Binary("*", decay, ast.Name(name, _HERE), _HERE),
        ast.Binary("*", ast.Binary("-", ast.Number(1.0, _HERE), decay, _HERE), tracked, _HERE),
        _HERE,
    )
    body.insert(at, ast.Assign(ast.Name(name, _HERE), ema, _HERE))
    if not _read_instead(spec, body, at, name, rng):
        return None
    state = ast.State(ast.Name(name, _HERE), (), ast.Number(0.0, _HERE), _HERE)
    spec = replace(spec, states=(*spec.states, state))
    return _with_body(spec, body), f"state {name} = {ast.source_expr(ema)}"


def _hyper(spec: ast.Spec, rng: random.Random):
    tunable = [h for h in spec.hypers if h.name.id != "learning_rate" and h.default]
    if not tunable:
        return None
    h = rng.choice(tunable)
    # b1, b2: move 1 - value too
    is_decay = h.range is not None and 0 <= h.range.lo and h.range.hi <= 1
    value = (
        (1 - (1 - h.default) * rng.choice(_SCALES))
        if is_decay and rng.random() < 0.5
        else h.default * rng.choice(_SCALES)
    )
    if h.range and not h.range.contains(value):
        return None
    hypers = tuple(dataclasses.replace(x, default=value) if x is h else x for x in spec.hypers)
    return replace(spec, hypers=hypers), f"hyper {h.name.id} = {value:g}"


_EDITS = {
    "insert": _insert,
    "delete": _delete,
    "modify": _modify,
    "state": _new_state,
    "hyper": _hyper,
}
