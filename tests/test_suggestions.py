"""Every misspelling optgen can see gets a 'did you mean' naming the right word."""

from __future__ import annotations

import pytest

import optgen
from optgen.checker import check
from optgen.diagnostics import SpecError
from optgen.parser import parse

SPEC_TYPOS = {
    "hyperr lr = 0.1\nupdate:\n  p = p - lr * g\n": "hyper",
    "stat m = 0\nupdate:\n  m = g\n  p = p - m\n": "state",
    "updte:\n  p = p - g\n": "update",
    "option o = True\nupdate:\n  p = p - g\n": "true",
    "option o = true\nupdate:\n  p = p - g\n  iff o:\n    p = p - g\n": "if",
    "option o = true\nupdate:\n  p = p - g\n  if o:\n    p = g\n  els:\n    p = g\n": "else",
    "hyper lr = 0.1\nupdate:\n  p = p - lrr * g\n": "lr",
    "update:\n  p = p - sqr(g)\n": "sqrt",
    "state m: bf61 = 0\nupdate:\n  m = g\n  p = p - m\n": "bf16",
    "option nesterov = true\nupdate:\n  p = p - g\n  if nesterv:\n    p = p - g\n": "nesterov",
}


@pytest.mark.parametrize("body", sorted(SPEC_TYPOS))
def test_spec_typos(body):
    with pytest.raises(SpecError) as err:
        check(parse("optimizer typo\n" + body, "typo.spec"))
    assert err.value.hint == f"did you mean '{SPEC_TYPOS[body]}'?", err.value.render()


@pytest.mark.parametrize(
    "call, right",
    [
        (lambda: optgen.load("adamww"), "adamw"),
        (lambda: optgen.load("adamw", weight_decy=0.1), "weight_decay"),
        (lambda: optgen.load("amsgrad", bias_correction_m=False), "bias_correction_mu"),
        (lambda: optgen.passes.parse_pipeline("fold,csee"), "cse"),
    ],
)
def test_api_typos(call, right):
    with pytest.raises(optgen.Diagnostic) as err:
        call()
    assert err.value.hint == f"did you mean '{right}'?", err.value.render()


def test_passes_given_to_load_are_checked():
    with pytest.raises(SpecError) as err:
        optgen.load("adamw", passes=["fold", "csee"])
    assert err.value.code == "E013" and err.value.hint == "did you mean 'cse'?"
    # one name, not its letters
    assert optgen.load("adamw", passes="cse").compiled.program is not None
