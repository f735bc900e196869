"""The checker's numeric hazards: declared ranges, constant-zero divisors, roots of negatives."""

from __future__ import annotations

import warnings

import pytest

import optgen
from optgen.checker import check
from optgen.diagnostics import SpecError
from optgen.library import builtin_names
from optgen.parser import parse


def hazards(body: str, decls: str = "") -> list[str]:
    checked = check(parse(f"optimizer h\n{decls}update:\n{body}", "h.spec"))
    return [w.render().splitlines()[0] for w in checked.warnings]


# Built-in specs whose warnings were read and accepted: name -> (codes, why).
ACCEPTED = {
    # v_row and v_col are means of g^2 + eps (never negative) while decay is in [0, 1], i.e. while
    # decay_offset < t, which optax assumes too; the ranges cannot express that relation.
    "adafactor": (
        ("W202", "W202"),
        "v_row, v_col >= 0 whenever decay_offset < t, as optax assumes",
    ),
}


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_specs_have_no_hazards(name):
    """Built-ins declare the ranges their reference implies (b1, b2 in [0, 1), eps >= 0), which
    proves their roots safe; a warning that remains is listed in ACCEPTED with the reason."""
    codes = tuple(w.code for w in optgen.check_spec(name).warnings)
    assert codes == ACCEPTED.get(name, ((), ""))[0], [
        w.render() for w in optgen.check_spec(name).warnings
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optgen.load(name)  # never warns about a built-in: the user cannot fix it


def test_load_warns_about_a_spec_file(tmp_path):
    (tmp_path / "risky.spec").write_text("optimizer risky\nupdate:\n  p = p - sqrt(g)\n")
    with pytest.warns(optgen.SpecWarning, match=r"risky.spec:3:16: warning\[W201\]"):
        optgen.load(str(tmp_path / "risky.spec"))


@pytest.mark.parametrize(
    "expr, decls, warned",
    [
        ("sqrt(g)", "", True),
        ("sqrt(g^2)", "", False),
        ("sqrt(g*g)", "", False),  # the same expression twice: a square
        ("sqrt(sum(g * g) + 1)", "", False),
        ("sqrt(g*p)", "", True),  # two different values
        ("sqrt(abs(g) + 1)", "", False),
        ("log(max(g, 0) + 1e-8)", "", False),
        ("rsqrt(1 - b)", "hyper b = 0.5\n", True),
        ("rsqrt(1 - b)", "hyper b = 0.5 in [0, 1]\n", False),
        ("sqrt(1 - b^t)", "hyper b = 0.5 in [0, 1)\n", False),
        ("sqrt(b^t - 1)", "hyper b = 0.5 in [0, 1)\n", True),
        ("sqrt(clip(g, 0, 1))", "", False),
        ("sqrt(where(g > 0, g, 0))", "", True),
        ("sqrt(norm(g) - 1)", "", True),
    ],
)
def test_root_of_a_possibly_negative_value(expr, decls, warned):
    found = hazards(f"  p = p - {expr}\n", decls)
    assert bool(found) == warned, found
    if warned:
        assert found[0].startswith("h.spec:") and "warning[W201]" in found[0]


def test_state_bounds_are_a_fixpoint():
    decls = "hyper b = 0.9 in [0, 1)\nstate v = 0\n"
    assert hazards("  v = b * v + (1 - b) * g^2\n  p = p - g / sqrt(v)\n", decls) == []
    assert hazards("  v = b * v - g\n  p = p - g / sqrt(v)\n", decls) != []  # v can go negative
    assert (
        hazards(
            "  v = b * v + (1 - b) * g^2\n  p = p - g / sqrt(v)\n", "hyper b = 0.9\nstate v = 0\n"
        )
        != []
    )


@pytest.mark.parametrize(
    "body, code",
    [
        ("  p = p - g / 0\n", "E218"),
        ("  p = p - g / (2 - 2 * 1)\n", "E218"),
        ("  p = p - g / (0 * b)\n", "E218"),
    ],
)
def test_division_by_a_constant_zero(body, code):
    with pytest.raises(SpecError) as err:
        hazards(body, "hyper b = 1\n")
    assert err.value.code == code and err.value.span.line == 4


def test_division_by_a_value_that_may_be_zero_is_fine():
    assert hazards("  p = p - g / b\n", "hyper b = 0 in [0, 1]\n") == []


@pytest.mark.parametrize(
    "decl, ok",
    [
        ("hyper b = 1 in [0, 1)", False),
        ("hyper b = 1 in [0, 1]", True),
        ("hyper b = 0 in (0, 1]", False),
        ("hyper b = -3 in [-inf, 0]", True),
        ("hyper b = 1e9 in [0, inf)", True),
        ("hyper b = 0 in [0, 0]", True),
    ],
)
def test_default_against_its_range(decl, ok):
    text = f"{decl}\n"
    if ok:
        hazards("  p = p - b * g\n", text)
    else:
        with pytest.raises(SpecError) as err:
            hazards("  p = p - b * g\n", text)
        assert err.value.code == "E217" and err.value.span.line == 2


@pytest.mark.parametrize(
    "expr, warned",
    [
        ("g^1.5", True),
        ("abs(g)^1.5", False),
        ("g^3", False),
        ("g^t", False),
        ("g^-0.5", True),
    ],
)
def test_fractional_power_of_a_possibly_negative_value(expr, warned):
    found = hazards(f"  p = p - {expr}\n")
    assert bool(found) == warned and all("warning[W202]" in f for f in found), found


@pytest.mark.parametrize(
    "expr, code",
    [
        ("10^400", "E223"),
        ("exp(1000)", "E223"),
        ("1e300 * 1e300", "E223"),
        ("log(0)", "E223"),
        ("0^-1", "E218"),
        ("(1 - 1)^(0 - 2)", "E218"),
    ],
)
def test_a_constant_that_is_infinite_in_float64_is_refused(expr, code):
    with pytest.raises(SpecError) as err:
        hazards(f"  p = p - {expr} * g\n")
    assert err.value.code == code, err.value.render()
    # finite constants are fine
    assert hazards("  p = p - 2^10 * exp(-1000) * 1e300 * 1e8 * g\n") == []


def test_a_square_past_1e154_does_not_crash_the_range_analysis():
    # x ** 2 of a Python float raises OverflowError past 1e154; the bound is inf instead.
    assert (
        hazards("  y = x * x\n  p = p - sqrt(y) * g\n", "hyper x = 1e200 in [1e200, 1e300]\n") == []
    )
