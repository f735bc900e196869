"""The op table (optgen/ops.py): every op is covered by every backend, and the backends agree."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from optgen.codegen.evaluate import STRUCTURAL
from optgen.codegen.interpret import interpret
from optgen.codegen.llvm_backend import EMIT as LLVM_EMIT
from optgen.codegen.primitive import run_ir
from optgen.codegen.stablehlo import EMIT

import optgen
from optgen.ir import Builder, Function, Value, verify
from optgen.ops import FUNCTIONS, OPS
from optgen.types import EXTENTS, Type

ELEMENTWISE = sorted(name for name, op in OPS.items() if op.numpy is not None)


def test_every_op_has_an_emission_or_an_evaluator_rule():
    assert set(ELEMENTWISE) == set(EMIT)  # StableHLO
    assert set(ELEMENTWISE) == set(LLVM_EMIT)  # optgen's own CPU loop
    assert {name for name, op in OPS.items() if op.numpy is None} == STRUCTURAL


def test_every_function_is_documented_and_typed():
    for fn in FUNCTIONS.values():
        assert fn.doc and all(kind in ("float", "bool") for kind in fn.operands), fn.name
        assert fn.reduces is None or set(fn.reduces) <= set(EXTENTS), fn.name


def _one_op(name: str) -> Function:
    """p' = op applied to operands built from p and g (a condition: g > p), as a float."""
    p, g = Value(Type("tensor"), "p"), Value(Type("tensor"), "g")
    b = Builder()
    cond = b.op("gt", g, p)
    args = [
        cond if kind == "bool" else (p, g, b.op("mul", p, g))[i]
        for i, kind in enumerate(OPS[name].operands)
    ]
    out = b.op(name, *args)
    if out.type.kind == "bool":
        out = b.op("select", out, p, g)
    func = Function(name, (p, g), tuple(b.ops), (("p", out),))
    verify(func)
    return func


@pytest.mark.parametrize("lowering", ["shared", "ffi"])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_backends_match_the_interpreter_on_every_elementwise_op(name, lowering, x64):
    """Differential: each op through XLA's loops (StableHLO) and optgen's own CPU loop (LLVM)
    against NumPy, float64, including nan and inf results."""
    func = _one_op(name)
    rng = np.random.default_rng(0)
    tensors = {k: [rng.normal(size=s) * 3 for s in [(), (7,), (3, 4)]] for k in ("p", "g")}
    tensors["p"][1][:2] = [0.0, -0.0]
    expected = interpret(func, tensors, {})["p"]
    got = run_ir(
        func,
        {k: [jax.numpy.asarray(x) for x in v] for k, v in tensors.items()},
        {},
        {"p": [np.float64] * 3},
        lowering=lowering,
    )["p"]
    for e, x in zip(expected, got, strict=True):
        np.testing.assert_allclose(np.asarray(x), e, rtol=1e-14, atol=0, equal_nan=True)


def test_a_builtin_from_the_table_works_in_a_spec(tmp_path):
    """tanh is one entry in the op table and one in the StableHLO emitter, and nothing else."""
    path = tmp_path / "tanh_sgd.spec"
    path.write_text(
        'optimizer tanh_sgd "sgd on tanh(g)"\nhyper learning_rate = 0.1\n'
        "update:\n  p = p - learning_rate * tanh(g)\n"
    )
    opt = optgen.load(str(path))
    p, g = np.linspace(-1.0, 1.0, 5, dtype=np.float32), np.linspace(-3.0, 3.0, 5, dtype=np.float32)
    params = {"w": jax.numpy.asarray(p)}
    new, _ = opt.step(params, {"w": jax.numpy.asarray(g)}, opt.init(params))  # donates params
    np.testing.assert_allclose(new["w"], p - 0.1 * np.tanh(g), rtol=1e-6)
