"""Matrices, choices by shape, bounded loops, row/column maxima, per-axis statistics and global
sums: golden lowering, IR round trip, and the StableHLO backend against the NumPy interpreter on
vectors, matrices of both orientations and batches.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from optgen.codegen.interpret import interpret
from optgen.codegen.primitive import run_ir
from optgen.passes import DEFAULT_PIPELINE

import optgen
from optgen.compiler import check_spec, compile_checked
from optgen.ir import parse_function, print_function
from optgen.types import stored_shape

GOLDEN = sorted(pathlib.Path(__file__).parent.joinpath("golden", "lower").glob("*.spec"))
SHAPES = [(), (7,), (5, 3), (3, 5), (4, 4), (2, 3, 4), (2, 1, 3, 2)]


def _lowered(path, **options):
    return compile_checked(check_spec(str(path)), options, passes=()).lowered.update


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_golden_lowering(path):
    """Each construct's IR as lowered (before any pass) is the text in the .ir file beside its spec:
    the update function, and the outputs' function where the spec declares outputs."""
    program = compile_checked(check_spec(str(path)), passes=()).lowered
    funcs = [program.update] + ([program.derived] if program.derived else [])
    texts = [print_function(func).replace(str(path.parent) + "/", "") for func in funcs]
    assert "\n".join(texts).strip() == path.with_suffix(".ir").read_text().strip()
    for text in texts:
        assert print_function(parse_function(text)) == text


def _inputs(func, seed, program):
    """Random inputs, each state stored as the runtime stores it (row and col without the axes they
    reduce, per-axis statistics end to end)."""
    rng = np.random.default_rng(seed)
    tensors = {
        v.name: [rng.normal(size=stored_shape(s, v.type.extent, program.factoring)) for s in SHAPES]
        for v in func.inputs
        if v.type.extent != "step"
    }
    scalars = {v.name: 0.1 for v in func.inputs if v.type.extent == "step"} | {"t": 3.0}
    return tensors, scalars


@pytest.mark.parametrize(
    "spec", [*(str(p) for p in GOLDEN), "muon", "sm3", "prodigy", "schedule_free_adamw"]
)
@pytest.mark.parametrize("passes", ["none", "default"])
def test_stablehlo_matches_the_interpreter(spec, passes, x64):
    """Differential, float64: every shape takes its own branch, the same in both backends (the
    update, and the outputs' function where the spec declares outputs)."""
    compiled = compile_checked(
        check_spec(spec), passes=() if passes == "none" else DEFAULT_PIPELINE
    )
    program = compiled.program
    for func in filter(None, (program.update, program.derived)):
        tensors, scalars = _inputs(func, 0, program)
        extents = program.extents() if func is program.update else {}
        expected = interpret(
            func, tensors, scalars, factoring=program.factoring, out_extents=extents
        )
        got = run_ir(
            func,
            {k: [jax.numpy.asarray(x) for x in v] for k, v in tensors.items()},
            {k: jax.numpy.asarray(v, np.float64) for k, v in scalars.items()},
            {name: [np.float64] * len(expected[name]) for name, _ in func.outputs},
            out_extents=extents,
            factoring=program.factoring,
        )
        for name, values in expected.items():
            # a step output is one value; a per-parameter one, one per shape
            for shape, e, x in zip(SHAPES[: len(values)], values, got[name], strict=True):
                np.testing.assert_allclose(
                    np.asarray(x), e, rtol=1e-12, atol=1e-300, err_msg=f"{name} {shape}"
                )


def test_a_shape_choice_emits_only_the_branch_each_parameter_takes():
    program = optgen.compile_checked(check_spec("muon")).program
    from optgen.codegen import export

    vector = export.stablehlo_text(program, np.dtype(np.float32), "7")
    matrix = export.stablehlo_text(program, np.dtype(np.float32), "5,3")
    assert "dot_general" not in vector and "sqrt" in vector
    # 5 Newton-Schulz steps of three products each, on the 3 x 3 Gram matrix x^T x.
    assert matrix.count("stablehlo.dot_general") == 15 and "tensor<3x3xf32>" in matrix


def test_repeat_unrolls_its_count_and_the_option_changes_it():
    spec = pathlib.Path(__file__).parent / "golden" / "lower" / "repeat.spec"
    assert sum(op.opcode == "pow" for op in _lowered(spec).ops) == 2
    assert sum(op.opcode == "pow" for op in _lowered(spec, steps=5).ops) == 5


@pytest.mark.parametrize("spec", ["muon", "sm3", str(GOLDEN[0].parent / "matmul.spec")])
def test_the_jnp_path_matches_the_interpreter(spec, x64):
    """The path JAX transformations take (codegen/jnp_backend.py) evaluates matrices, choices by
    shape and row/column maxima as the NumPy interpreter does; and jax.grad runs through it."""
    from optgen.codegen.evaluate import evaluate
    from optgen.codegen.jnp_backend import jnp_backend

    program = compile_checked(check_spec(spec)).program
    func = program.update
    tensors, scalars = _inputs(func, 1, program)
    expected = interpret(
        func, tensors, scalars, factoring=program.factoring, out_extents=program.extents()
    )
    got = evaluate(
        func,
        jnp_backend(),
        {k: [jax.numpy.asarray(x) for x in v] for k, v in tensors.items()},
        {k: jax.numpy.asarray(v, np.float64) for k, v in scalars.items()},
        np.dtype(np.float64),
        {name: [np.float64] * len(expected[name]) for name, _ in func.outputs},
        out_extents=program.extents(),
        factoring=program.factoring,
    )
    for name, values in expected.items():
        for e, x in zip(values, got[name], strict=True):
            np.testing.assert_allclose(np.asarray(x), e, rtol=1e-12, atol=1e-300, err_msg=name)


def test_grad_and_vmap_go_through_a_matrix_spec():
    opt = optgen.load("muon", weight_decay=0.1)
    params = {"w": jax.numpy.arange(12.0).reshape(4, 3) / 10, "b": jax.numpy.ones(3)}
    grads = jax.tree.map(lambda x: x * 0.1 + 1, params)
    state = opt.init(params)

    def loss(p):
        updates, _ = opt.update(grads, state, p)
        return sum(jax.numpy.sum(u) for u in jax.tree.leaves(updates))

    # The update's dependence on p is the weight decay: -learning_rate * weight_decay per element
    # on the matrix, and AdamW's adam_weight_decay (0) on the vector.
    gradient = jax.grad(loss)(params)
    np.testing.assert_allclose(gradient["w"], np.full((4, 3), -1e-3 * 0.1), rtol=1e-5)
    np.testing.assert_allclose(gradient["b"], np.zeros(3), atol=1e-12)
    scaled = jax.vmap(lambda s: opt.update(jax.tree.map(lambda g: g * s, grads), state, params)[0])(
        jax.numpy.array([1.0, 2.0])
    )
    single = opt.update(jax.tree.map(lambda g: g * 2.0, grads), state, params)[0]
    # jnp path vs fused: f32 rounding
    np.testing.assert_allclose(scaled["w"][1], single["w"], rtol=1e-4, atol=1e-7)


CONSTRUCTS = pathlib.Path(__file__).parent / "golden" / "lower" / "constructs.spec"


@pytest.mark.parametrize("emit", ["ast", "ir", "ir-opt", "stablehlo", "hlo", "artifact"])
def test_every_construct_goes_through_every_stage_of_the_command_line(emit, tmp_path):
    """One spec with every construct of the matrix language (an input, a read-only state, row, col
    and per-axis statistics, a Gram-shaped state and eye, an output, an if on shapes, repeat, '@',
    transpose, shape constants, global sums) through each --emit; its artifact runs as the
    optimizer's step does."""
    from click.testing import CliRunner

    from optgen.cli import main

    out = tmp_path / "constructs.out"
    result = CliRunner().invoke(
        main, ["compile", str(CONSTRUCTS), "--emit", emit, "--shape", "6,4", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    text = out.read_bytes()
    expected = {
        "ast": b"(repeat steps",
        "ir": b"axis_max",
        "ir-opt": b"gsum",
        "stablehlo": b"dot_general",
        "hlo": b"dot(",
        "artifact": b"",
    }[emit]
    assert expected in text
    if emit == "artifact":
        rng = np.random.default_rng(0)
        p, g, h = (rng.normal(size=(6, 4)).astype(np.float32) for _ in range(3))
        opt = optgen.load(str(CONSTRUCTS))
        state = opt.init({"w": p})
        # before step donates them
        slots = {name: np.array(slot["w"]) for name, slot in state.slots.items()}
        want, after = opt.step(
            {"w": jax.numpy.asarray(p)}, {"w": jax.numpy.asarray(g)}, state, h={"w": h}
        )
        got = optgen.load_artifact(str(out))(p=p, g=g, h=h, t=1, lr=0.1, **slots)
        np.testing.assert_allclose(got["p"], want["w"], rtol=1e-6)
        np.testing.assert_allclose(got["v"], after.slots["v"]["w"], rtol=1e-6)
        assert got["v"].shape == (10,)  # 6 + 4 statistics
