"""Every user mistake is a diagnostic: file:line:col, the line, a caret under the place, a hint."""

from __future__ import annotations

import re

import pytest

from optgen.checker import check
from optgen.diagnostics import SpecError
from optgen.parser import parse

HEADER = 'optimizer bad "test"\nhyper lr = 0.1\nstate m = 0\n'

# (spec body after HEADER, message fragment, caret line text, caret, hint fragment)
CASES = {
    "syntax": (
        "update:\n  m = g\n  p = p - lr * * m\n",
        "unexpected '*'",
        "    p = p - lr * * m",
        "                 ^",
        None,
    ),
    "power written **": (
        "update:\n  m = g\n  p = p - lr * m ** 2\n",
        "unexpected '*'",
        None,
        None,
        "write powers as a ^ b",
    ),
    "unknown name": (
        "update:\n  m = g\n  p = p - lr * mm\n",
        "unknown name 'mm'",
        "    p = p - lr * mm",
        "                 ^~",
        "did you mean 'm'?",
    ),
    "unknown function": (
        "update:\n  m = g\n  p = p - lr * sqr(m)\n",
        "unknown function 'sqr'",
        None,
        "                 ^~~",
        "did you mean 'sqrt'?",
    ),
    "assign hyper": (
        "update:\n  m = g\n  lr = 2\n  p = p - lr * m\n",
        "cannot assign to hyper 'lr'",
        "    lr = 2",
        "    ^~",
        "read-only",
    ),
    "assign g": (
        "update:\n  m = g\n  g = 2 * g\n  p = p - lr * m\n",
        "cannot assign to 'g'",
        None,
        "    ^",
        "new local name",
    ),
    "assign t": (
        "update:\n  m = g\n  t = 1\n  p = p - lr * m\n",
        "cannot assign to 't'",
        None,
        None,
        None,
    ),
    "duplicate": (
        "hyper lr = 0.2\nupdate:\n  m = g\n  p = p - lr * m\n",
        "'lr' is already declared",
        "  hyper lr = 0.2",
        "        ^~",
        "its own name",
    ),
    "reserved": (
        "hyper t = 1\nupdate:\n  m = g\n  p = p - lr * m\n",
        "'t' is reserved",
        None,
        None,
        None,
    ),
    "arity": (
        "update:\n  m = max(g)\n  p = p - lr * m\n",
        "max takes 2 arguments, got 1",
        None,
        "        ^~~~~~",
        "elementwise maximum",
    ),
    "state never updated": (
        "update:\n  p = p - lr * g\n",
        "state 'm' is never updated",
        "  state m = 0",
        "        ^",
        "remove the state",
    ),
    "p never updated": (
        "update:\n  m = g\n",
        "the update never assigns p",
        None,
        None,
        "p = p - ...",
    ),
    "no update block": ("", "has no 'update:' block", None, None, None),
    "bad dtype": (
        "state v: bf61 = 0\nupdate:\n  m = g\n  v = g\n  p = p - lr * m\n",
        "unknown state shape or storage dtype 'bf61'",
        None,
        None,
        "did you mean 'bf16'?",
    ),
    "two shapes": (
        "state v: leaf step = 0\nupdate:\n  m = g\n  v = 1\n  p = p - lr * m\n",
        "state 'v' has a second shape 'step'",
        None,
        None,
        "at most one shape",
    ),
    "per-step state from a tensor": (
        "state v: step = 0\nupdate:\n  m = g\n  v = v + g\n  p = p - lr * m\n",
        "state 'v' holds one number per step, but this value has one per element",
        None,
        None,
        "reduce it",
    ),
    # p (or a state) holds a per-step value as assigned until the step ends: reducing it is a
    # checker error, not an IRError from the lowering (found by the mutation property test)
    "reduction of p set to a per-step value": (
        "update:\n  m = g\n  p = lr\n  p = p - lr * rms(p) * m\n",
        "rms reduces over a tensor's elements, but this is one number per step",
        "    p = p - lr * rms(p) * m",
        "                     ^",
        "pass a per-element value",
    ),
    "row state without the factoring rule": (
        "state v: row = 0\nupdate:\n  m = g\n  v = row_mean(g)\n  p = p - lr * m\n",
        "row and column values need 'option factored = true'",
        None,
        None,
        "optax.adafactor",
    ),
    "numeric option in if": (
        "option k = 3\nupdate:\n  m = g\n  if k:\n    m = 2 * g\n  p = p - lr * m\n",
        "option 'k' is a number, not a flag",
        None,
        None,
        "true/false option",
    ),
    "per-leaf state init from p": (
        "state v: leaf = p\nupdate:\n  m = g\n  v = sum(g)\n  p = p - lr * m\n",
        "holds one number per leaf",
        None,
        None,
        "declare 'state v: tensor'",
    ),
    "condition as number": (
        "update:\n  m = g > 0\n  p = p - lr * m\n",
        "must be a number",
        None,
        None,
        "where",
    ),
    "if on a tensor": (
        "update:\n  m = g\n  if g:\n    m = 2 * g\n  p = p - lr * m\n",
        "an 'if' tests options",
        None,
        None,
        "where(cond, a, b)",
    ),
    "reduction of a scalar": (
        "update:\n  m = g\n  p = p - norm(lr) * m\n",
        "norm reduces over a tensor",
        None,
        None,
        None,
    ),
    "unclosed paren": (
        "update:\n  m = g\n  p = (p - lr * m\n",
        "unexpected",
        None,
        None,
        "not closed",
    ),
    "local defined in one branch": (
        "option o = true\nupdate:\n  m = g\n  if o:\n    k = 2\n  p = p - k * m\n",
        "unknown name 'k'",
        None,
        None,
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_diagnostic(case):
    body, message, line, caret, hint = CASES[case]
    with pytest.raises(SpecError) as err:
        check(parse(HEADER + body, "bad.spec"))
    text = err.value.render()
    first = text.splitlines()[0]
    assert first.startswith("bad.spec:") and re.search(r": error\[E\d{3}\]: ", first), text
    assert message in first, text
    file_, line_no, col, *_ = first.split(":")
    assert int(line_no) >= 1 and int(col) >= 1
    lines = text.splitlines()
    if line is not None:
        assert lines[1] == line, text
    if caret is not None:
        assert lines[2] == caret, text
    assert "^" in lines[2], text
    if hint is not None:
        assert hint in text.splitlines()[-1] and text.splitlines()[-1].startswith("hint: "), text


def test_caret_points_at_the_reported_column():
    with pytest.raises(SpecError) as err:
        check(parse(HEADER + "update:\n  m = g\n  p = p - lr * mu_hatt\n", "x.spec"))
    first, source, caret = err.value.render().splitlines()[:3]
    col = int(first.split(":")[2])
    assert caret.index("^") == source.index("mu_hatt") == col + 1  # both lines are indented by 2


P_UNDER_OPTIONS = {  # update body -> line of the `if` blamed (None: accepted)
    "  if f:\n    p = p - g\n": 5,
    "  if f:\n    p = p - g\n  else:\n    m = g\n": 5,
    "  if f:\n    p = p - g\n  p = p - 0.1 * g\n": None,
    "  if f:\n    p = p - g\n  else:\n    p = p + g\n": None,
    "  if f:\n    if h:\n      p = p - g\n  p = p + g\n": None,
    "  if f:\n    p = p - g\n  else:\n    if h:\n      p = p + g\n": 8,
}


@pytest.mark.parametrize("body", sorted(P_UNDER_OPTIONS))
def test_p_assigned_only_under_some_options_is_refused(body):
    text = f"optimizer o\noption f = false\noption h = true\nupdate:\n{body}"
    line = P_UNDER_OPTIONS[body]
    if line is None:
        check(parse(text, "o.spec"))
        return
    with pytest.raises(SpecError) as err:
        check(parse(text, "o.spec"))
    assert err.value.code == "E224" and err.value.span.line == line, err.value.render()
