"""Reductions in optgen's own CPU loop (codegen/reading_pass.py, cpu_reduce.py,
reduction_lowering.py): one reading pass, then the update, against the float64 interpreter and
XLA's lowering, over several steps, shapes and dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import many_leaf_tree, rel_err
from optgen.codegen import ffi_runtime
from optgen.codegen.interpret import interpret

import optgen

# (spec, hyperparameters and options): per-parameter sums (lamb, lars, novograd's norm, the
# cautious mask's sum and size), global sums (prodigy), the options' global norm and count.
CASES = [
    ("lamb", {"weight_decay": 1e-2}),
    ("lars", {"weight_decay": 1e-3}),
    ("novograd", {}),
    ("cautious_adamw", {}),
    ("prodigy", {}),
    ("adamw", {"global_clipnorm": 0.5, "skip_nonfinite": True}),
    ("adan", {}),  # elementwise: the issue lists it with them (XLA made 68 B of its 44)
]
BIG = 2 * ffi_runtime.CHUNK_ELEMENTS + 7  # several chunks: partial sums from the pool's threads
SHAPES = {"big": (BIG,), "matrix": (33, 7), "vector": (5,), "scalar": ()}
STEPS = 8


def params_of(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=s).astype(dtype)) for k, s in SHAPES.items()}


def grads_at(params, step):
    """A quadratic's gradient (p) with noise: steps keep a direction, so Prodigy's distance
    estimate grows, as it does in training (with gradients of pure noise it stays put)."""
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(
        lambda p: jnp.asarray((np.asarray(p) + 0.3 * rng.normal(size=p.shape)).astype(p.dtype)),
        params,
    )


def stepped(opt, params, steps=STEPS):
    state = opt.init(params)
    for step in range(steps):
        params, state = opt.step(params, grads_at(params, step), state)
    return params, state


def interpreted(opt, params, steps=STEPS):
    """The same steps by the NumPy interpreter, every value in float64."""
    program = opt.compiled.program
    extents = program.extents()
    state = opt.init(params)
    leaves, treedef = jax.tree.flatten(params)
    p = [np.asarray(x, np.float64) for x in leaves]
    slots = {
        name: float(v) if extents[name] == "step" else treedef.flatten_up_to(v)
        for name, v in state.slots.items()
    }
    hypers = {name: float(v) for name, v in state.hyperparams.items()}
    for step in range(steps):
        grads = treedef.flatten_up_to(grads_at(treedef.unflatten(leaves), step))
        tensors = {"p": p, "g": grads} | {n: v for n, v in slots.items() if extents[n] != "step"}
        scalars = (
            {"t": step + 1} | hypers | {n: v for n, v in slots.items() if extents[n] == "step"}
        )
        out = interpret(program.update, tensors, scalars, out_extents=extents)
        p = out["p"]
        slots |= {n: out[n][0] if extents[n] == "step" else out[n] for n in out if n != "p"}
        leaves = [jnp.asarray(x, y.dtype) for x, y in zip(p, leaves, strict=True)]  # next grads
    return p, slots


@pytest.mark.parametrize("spec, hypers", CASES)
def test_reductions_in_the_loop_match_the_float64_interpreter(spec, hypers, x64):
    opt = optgen.load(spec, lowering="ffi", **hypers)
    params, state = stepped(opt, params_of(np.float64))
    want_p, want_slots = interpreted(opt, params_of(np.float64))
    for got, want in zip(jax.tree.leaves(params), want_p, strict=True):
        assert rel_err(got, want) < 1e-12
    for name, want in want_slots.items():
        got = jax.tree.leaves(state.slots[name])
        for g, w in zip(got, want if isinstance(want, list) else [want], strict=True):
            assert rel_err(g, w) < 1e-12, name


def errors(opt, dtype) -> dict[str, float]:
    """Each parameter's and state's relative error after the steps, against float64's."""
    params, state = stepped(opt, params_of(dtype))
    want_p, want_slots = interpreted(opt, params_of(dtype))
    leaves = jax.tree.leaves(params)
    out = {f"p{k}": rel_err(g, w) for k, (g, w) in enumerate(zip(leaves, want_p, strict=True))}
    for name, want in want_slots.items():
        got = jax.tree.leaves(state.slots[name])
        want = want if isinstance(want, list) else [want]
        for k, (g, w) in enumerate(zip(got, want, strict=True)):
            out[f"{name}{k}"] = rel_err(g, w)
    return out


@pytest.mark.parametrize("spec, hypers", CASES)
def test_reductions_in_the_loop_in_float32(spec, hypers):
    mine = errors(optgen.load(spec, lowering="ffi", **hypers), np.float32)
    if spec != "prodigy":  # within 1e-6 of float64, as XLA's loops are
        assert max(mine.values()) < 1e-6, mine
        return
    # Prodigy's distance estimate sums g * (p0 - p), a difference of nearly equal float32
    # numbers, and every state is scaled by it: XLA's loops are ~1e-1 from float64 here. The
    # own loop must be no further from it than they are.
    xla = errors(optgen.load(spec, lowering="per-output", **hypers), np.float32)
    for name, error in mine.items():
        assert error <= 1.5 * xla[name] + 1e-6, (name, error, xla[name])


def many_leaves(seed):
    """bf16, f16 and f32 parameters, more than one call of the loop takes (so global sums cross
    calls)."""
    return many_leaf_tree(seed, BIG, matrix=False)


def test_per_parameter_sums_on_mixed_dtypes_and_many_leaves():
    # a learning rate large enough that three steps move bf16 parameters by many ulps
    opt = optgen.load("lamb", lowering="ffi", learning_rate=0.05)
    params, _ = stepped(opt, many_leaves(0), steps=3)
    want_p, _ = interpreted(opt, many_leaves(0), steps=3)
    for got, want in zip(jax.tree.leaves(params), want_p, strict=True):
        # bf16 and f16 parameters and states are rounded on every store (2^-8, 2^-11)
        low = np.dtype(got.dtype).itemsize == 2
        assert rel_err(got, want) < (1e-2 if low else 1e-6)


def test_global_sums_across_calls_match_xla_on_mixed_dtypes():
    # Against XLA's loops rather than float64: AdamW's second moment in f16 (the f16 parameter's
    # state) underflows where float64's does not, on both lowerings alike.
    def run(lowering):
        opt = optgen.load("adamw", lowering=lowering, learning_rate=0.05, **CASES[5][1])
        return stepped(opt, many_leaves(0), steps=3)

    for a, b in zip(jax.tree.leaves(run("ffi")), jax.tree.leaves(run("shared")), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        low = np.dtype(a.dtype).itemsize == 2  # a rounding on store may differ by one ulp
        np.testing.assert_allclose(
            np.asarray(a, np.float64),
            np.asarray(b, np.float64),
            rtol=2e-2 if low else 2e-6,
            atol=1e-7,
        )


def test_a_reading_pass_gives_the_same_sums_every_run():
    opt = optgen.load("lamb", lowering="ffi")
    params = params_of(np.float32)
    grads, state = grads_at(params, 0), opt.init(params)
    update = jax.jit(opt.update)
    first = update(grads, state, params)
    for _ in range(3):  # the pool's threads take the chunks in another order each time
        again = update(grads, state, params)
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_step_with_reductions_is_one_reading_and_one_update_call():
    opt = optgen.load("lamb", lowering="ffi")
    params = params_of(np.float32)
    hlo = opt.step.lower(params, params, opt.init(params)).compile().as_text()
    calls = [line for line in hlo.splitlines() if "custom-call(" in line and "optgen_cpu_" in line]
    assert len(calls) == 2
    assert sum("optgen_cpu_read_" in line for line in calls) == 1


def test_a_non_finite_gradient_anywhere_skips_the_whole_step_in_the_loop():
    opt = optgen.load("adamw", lowering="ffi", global_clipnorm=1.0, skip_nonfinite=True)
    params = params_of(np.float32)
    state = opt.init(params)
    grads = grads_at(params, 0)
    grads["big"] = grads["big"].at[BIG - 1].set(jnp.nan)  # in the last chunk of one parameter
    before = jax.tree.map(np.asarray, params)
    params, state = opt.step(params, grads, state)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert float(state.slots["total_notfinite"]) == 1
    params, state = opt.step(params, grads_at(params, 1), state)  # a finite one is taken
    assert not np.array_equal(np.asarray(params["big"]), before["big"])


TWO_PASSES = """optimizer twice "a sum of a value scaled by another sum"

hyper learning_rate = 0.1

update:
  c = g / (norm(g) + 1)
  p = p - learning_rate * c / (norm(c) + 1)
"""


def test_a_sum_of_a_reduced_value_is_refused_and_auto_falls_back(tmp_path):
    path = tmp_path / "twice.spec"
    path.write_text(TWO_PASSES)
    params, grads = params_of(np.float32), grads_at(params_of(np.float32), 0)
    with pytest.raises(optgen.InputError, match="E384.*two reading passes"):
        opt = optgen.load(str(path), lowering="ffi")
        opt.update(grads, opt.init(params), params)
    opt = optgen.load(str(path))
    assert "optgen_cpu_" not in opt.step.lower(params, grads, opt.init(params)).as_text()
