"""State of each shape (per element, per tensor, per step) and the per-tensor reductions, end to
end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from conftest import as_jax, make_grads, make_params, run_steps

import optgen

SPEC = """optimizer shapes "state of every shape (test)"
hyper lr = 0.1
state m = 0              # one array per parameter
state total: leaf = 0    # one number per parameter tensor
state count: step = 0    # one number per step, shared
update:
  count = count + 1
  total = total + sum(g)
  m = 0.5 * m + rms(g) * g
  p = p - lr * (m + total / count)
"""


def _load(tmp_path, **kwargs):
    path = tmp_path / "shapes.spec"
    path.write_text(SPEC)
    return optgen.load(str(path), **kwargs)


def _reference(params, steps, dtype):
    """The same update in float64 NumPy, one leaf at a time."""
    p = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
    m = [np.zeros_like(x) for x in p]
    total = [0.0] * len(p)
    for step in range(steps):
        g = [np.asarray(x, np.float64) for x in jax.tree.leaves(make_grads(params, step, dtype))]
        for i, gi in enumerate(g):
            total[i] += gi.sum()
            m[i] = 0.5 * m[i] + np.sqrt(np.mean(gi * gi)) * gi
            p[i] = p[i] - 0.1 * (m[i] + total[i] / (step + 1))
    return p, total


def test_init_gives_each_state_its_shape(tmp_path):
    opt = _load(tmp_path)
    params = jax.tree.map(jnp.asarray, make_params(np.float32))
    state = opt.init(params)
    assert state.slots["count"].shape == () and state.slots["count"].dtype == np.float32
    assert jax.tree.structure(state.slots["total"]) == jax.tree.structure(params)
    assert all(x.shape == () for x in jax.tree.leaves(state.slots["total"]))
    assert jax.tree.map(jnp.shape, state.slots["m"]) == jax.tree.map(jnp.shape, params)


def test_every_state_shape_matches_numpy_in_float64(tmp_path, x64):
    opt = _load(tmp_path)
    params, state = run_steps(opt, as_jax(make_params(np.float64)), 12)
    # Through jax.tree.map, as above: make_grads draws in the dict's key order.
    want_p, want_total = _reference(
        jax.tree.map(np.asarray, make_params(np.float64)), 12, np.float64
    )
    assert float(state.slots["count"]) == 12
    np.testing.assert_allclose(jax.tree.leaves(state.slots["total"]), want_total, rtol=1e-12)
    for got, want in zip(jax.tree.leaves(params), want_p, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10)


def test_step_and_update_agree_under_jit(tmp_path):
    opt = _load(tmp_path)
    a, sa = run_steps(opt, as_jax(make_params(np.float32)), 5, jit=True)
    b, sb = run_steps(opt, as_jax(make_params(np.float32)), 5, path="step")
    for x, y in zip(jax.tree.leaves((a, sa.slots)), jax.tree.leaves((b, sb.slots)), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_low_precision_params_keep_per_step_state_in_the_step_dtype(tmp_path):
    opt = _load(tmp_path)
    params = jax.tree.map(lambda x: jnp.asarray(x, ml_dtypes.bfloat16), make_params(np.float32))
    grads = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), make_grads(params, 0, np.float32))
    state = opt.init(params)
    params, state = opt.step(params, grads, state)
    assert state.slots["count"].dtype == np.float32
    assert {x.dtype for x in jax.tree.leaves(state.slots["total"])} == {
        np.dtype(ml_dtypes.bfloat16)
    }


def test_no_parameters_still_gives_the_per_step_state(tmp_path):
    state = _load(tmp_path).init({})
    assert float(state.slots["count"]) == 0 and state.slots["total"] == {}


def test_a_readonly_state_keeps_its_initial_value_and_costs_no_write(tmp_path):
    """Prodigy's initial parameters: an input of the step, never an output (one write less per
    element).
    """
    import jax.numpy as jnp

    from optgen.kernel_report import min_bytes_per_element
    from optgen.library import read_spec

    opt = optgen.load("prodigy")
    program = opt.compiled.program
    assert "params0" not in dict(program.update.outputs) and "params0" in dict(program.init.outputs)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
    initial = {k: np.asarray(v) for k, v in params.items()}
    state = opt.init(params)
    for step in range(3):
        params, state = opt.step(
            params, {k: jnp.full_like(v, 0.1 * (step + 1)) for k, v in params.items()}, state
        )
    assert not np.array_equal(params["w"], initial["w"])
    for k in initial:
        np.testing.assert_array_equal(state.slots["params0"][k], initial[k])
    written = tmp_path / "prodigy_written.spec"
    written.write_text(
        read_spec("prodigy")
        .text.replace("state params0: readonly = p", "state params0 = p")
        .replace("  p = p - weight_decay", "  params0 = params0\n  p = p - weight_decay")
    )
    rewritten = optgen.load(str(written)).compiled.program
    f32 = np.dtype(np.float32)
    # written back, it costs a write and the update pass's read of it (only the reading pass reads
    # it)
    assert min_bytes_per_element(rewritten, f32) - min_bytes_per_element(program, f32) == 8
