"""Passes: golden IR tests (input -> expected text) and differential tests on every
built-in spec.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from conftest import check_golden
from optgen.codegen.interpret import interpret
from optgen.passes import DEFAULT_PIPELINE, PASSES, parse_pipeline, run_pipeline

import optgen
from optgen.compiler import check_spec, compile_checked
from optgen.ir import IRError, parse_function, print_function, print_program
from optgen.types import NOT_FACTORED, Factoring, stored_shape

GOLDEN = sorted(pathlib.Path(__file__).parent.joinpath("golden").glob("*.ir"))


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_golden(path, update_golden):
    """Each case of tests/golden/PASS.ir, through its RUN line (optgen opt --passes PASS)."""
    assert f"// RUN: optgen opt --split-input-file --passes {path.stem} %s" in path.read_text()
    check_golden(path, update_golden)


def test_every_pass_has_a_golden_test():
    assert {p.stem for p in GOLDEN} == set(PASSES)


def test_a_golden_mismatch_fails_and_update_rewrites_it(tmp_path):
    """The golden check can fail: a wrong CHECK line is reported, and --update-golden fixes it."""
    source = pathlib.Path(__file__).parent / "golden" / "dce.ir"
    wrong = tmp_path / "dce.ir"
    wrong.write_text(
        source.read_text().replace("// CHECK:   %0 = sub %p, %g", "// CHECK:   %0 = sub %g, %p")
    )
    with pytest.raises(AssertionError, match="dce.ir, case 1"):
        check_golden(wrong)
    check_golden(wrong, update=True)
    assert wrong.read_text() == source.read_text()


# Specs that take matrices only (as torch.optim.Muon): a batch of matrices in place of the scalar.
MATRIX_ONLY = {"torch/muon"}


def _random_inputs(func, seed, matrices_only=False):
    rng = np.random.default_rng(seed)
    shapes = [(2, 3, 3), (5, 2), (3, 4)] if matrices_only else [(), (6,), (3, 4)]
    # Nothing is factored here: a row value is the whole tensor, a col value one number.
    tensors = {
        v.name: [rng.normal(size=stored_shape(s, v.type.extent, NOT_FACTORED)) for s in shapes]
        for v in func.inputs
        if v.type.extent != "step"
    }
    tensors = {k: [np.abs(x) if k.startswith("nu") else x for x in v] for k, v in tensors.items()}
    defaults = {
        "learning_rate": 1e-3,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "eps_root": 0.0,
        "weight_decay": 1e-4,
    }
    scalars = {v.name: defaults.get(v.name, 3.0) for v in func.inputs if v.type.extent == "step"}
    return tensors, scalars


@pytest.mark.parametrize("pass_name", sorted(PASSES))
@pytest.mark.parametrize("spec", optgen.builtin_names())
def test_pass_preserves_numbers(spec, pass_name):
    """The reference interpreter gives the same float64 numbers before and after the pass."""
    _check_pass_preserves_numbers(spec, pass_name)


def _check_pass_preserves_numbers(spec, pass_name):
    program = compile_checked(check_spec(spec), passes=()).lowered
    lowered, extents = program.update, program.extents()
    # Run the passes before this one in the default pipeline (all of it for an opt-in pass, one
    # the default pipeline does not run), so each pass sees realistic input.
    before = run_pipeline(
        lowered,
        DEFAULT_PIPELINE[: DEFAULT_PIPELINE.index(pass_name)]
        if pass_name in DEFAULT_PIPELINE
        else DEFAULT_PIPELINE,
    )
    after = run_pipeline(before, [pass_name])
    for seed in range(3):
        tensors, scalars = _random_inputs(before, seed, spec in MATRIX_ONLY)
        expected = interpret(before, tensors, scalars, out_extents=extents)
        got = interpret(after, tensors, scalars, out_extents=extents)
        for name in expected:
            for e, g in zip(expected[name], got[name], strict=True):
                np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-300)


def test_an_opt_in_pass_is_checked_too(monkeypatch):
    """A registered pass outside the default pipeline runs after all of it in the numbers test,
    and a pass that changes the numbers fails that test."""
    monkeypatch.setitem(PASSES, "opt_in", PASSES["dce"])
    _check_pass_preserves_numbers("adamw", "opt_in")

    def wrong(func):  # returns p unchanged
        return func.with_body(
            func.ops, [(n, func.input("p") if n == "p" else v) for n, v in func.outputs]
        )

    monkeypatch.setitem(PASSES, "opt_in", wrong)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        _check_pass_preserves_numbers("adamw", "opt_in")


@pytest.mark.parametrize("spec", optgen.builtin_names())
def test_ir_text_round_trips(spec):
    compiled = compile_checked(check_spec(spec))
    for func in (compiled.lowered.update, compiled.lowered.init, compiled.program.update):
        text = print_function(func)
        assert print_function(parse_function(text)) == text


def _per_element(func, opcode):
    return sum(op.opcode == opcode and op.result.type.extent == "tensor" for op in func.ops)


def test_pipeline_moves_adamw_divisions_and_powers_out_of_per_element_code():
    compiled = compile_checked(check_spec("adamw"))
    before, after = compiled.lowered.update, compiled.program.update
    assert (_per_element(before, "div"), _per_element(after, "div")) == (3, 1)
    assert (_per_element(before, "pow"), _per_element(after, "pow")) == (1, 0)
    assert "pow %b1, %t : step" in print_program(compiled.program)


def test_verify_rejects_broken_ir():
    with pytest.raises(IRError, match="unknown value"):
        parse_function("func @f(%p: tensor) {\n  %0 = add %p, %9 : tensor\n  return p = %0\n}")
    with pytest.raises(IRError, match="typed step, expected tensor"):
        parse_function("func @f(%p: tensor) {\n  %0 = neg %p : step\n  return p = %0\n}")
    with pytest.raises(IRError, match="reduces a tensor"):
        parse_function("func @f(%p: tensor, %t: step) {\n  %0 = sum %t : leaf\n  return p = %p\n}")


def test_unknown_pass_name_suggests():
    with pytest.raises(optgen.SpecError, match="unknown pass 'hoyst'") as err:
        parse_pipeline("fold,hoyst")
    assert "did you mean 'hoist'" in err.value.render()


def test_passes_keep_the_numbers_of_factored_parameters():
    """Adafactor with rows and columns (a matrix, a batch of matrices, and an unfactored vector)."""
    lowered = compile_checked(check_spec("adafactor"), passes=()).lowered.update
    optimized = run_pipeline(lowered, DEFAULT_PIPELINE)
    factoring = Factoring(True, 3)
    rng = np.random.default_rng(0)
    shapes = [(5, 3), (2, 3, 4), (7,)]
    kept = {"row": [(3,), (2, 3), (7,)], "col": [(5,), (2, 4), ()]}
    tensors = {"p": [rng.normal(size=s) for s in shapes], "g": [rng.normal(size=s) for s in shapes]}
    tensors |= {
        name: [np.abs(rng.normal(size=s)) for s in kept[name[2:]]] for name in ("v_row", "v_col")
    }
    scalars = {v.name: 0.5 for v in lowered.inputs if v.type.extent == "step"} | {
        "t": 3.0,
        "eps": 1e-30,
    }
    expected = interpret(lowered, tensors, scalars, factoring=factoring)
    got = interpret(optimized, tensors, scalars, factoring=factoring)
    for name in expected:
        for e, g in zip(expected[name], got[name], strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-12)
