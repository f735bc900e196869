"""Each built-in spec against its optax counterpart: 150 steps, mixed shapes, f64 and f32."""

from __future__ import annotations

import inspect

import jax
import numpy as np
import optax
import pytest

import optgen
from conftest import make_grads, make_params, rel_err

REFERENCES = {"adam": optax.adam, "adamw": optax.adamw, "adamax": optax.adamax,
              "amsgrad": optax.amsgrad, "nadamw": optax.nadamw}
# Non-default values, so a hyperparameter wired to the wrong place shows.
CUSTOM = {"learning_rate": 3e-3, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "eps_root": 1e-10, "weight_decay": 1e-2}
STEPS = 150
TOLERANCE = {np.float64: 1e-9, np.float32: 2e-4}


def _hypers(name):
    spec = optgen.load(name)
    return {k: v for k, v in CUSTOM.items() if k in spec.hyperparams}


def _run_optax(name, dtype):
    tx = REFERENCES[name](**_hypers(name))
    params = jax.tree.map(jax.numpy.asarray, make_params(dtype))
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(STEPS):
        updates, state = update(make_grads(params, step, dtype), state, params)
        params = optax.apply_updates(params, updates)
    return params


def _run_optgen(name, dtype, path):
    opt = optgen.load(name, **_hypers(name))
    params = jax.tree.map(jax.numpy.asarray, make_params(dtype))
    state = opt.init(params)
    for step in range(STEPS):
        grads = make_grads(params, step, dtype)
        if path == "step":
            params, state = opt.step(params, grads, state)
        else:
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
    return params


def _compare(name, dtype, path):
    expected, got = _run_optax(name, dtype), _run_optgen(name, dtype, path)
    for (key, e), g in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got), strict=True):
        assert g.dtype == e.dtype == dtype, key
        assert rel_err(g, e) <= TOLERANCE[dtype], (key, rel_err(g, e))


@pytest.mark.parametrize("path", ["update", "step"])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_matches_optax_float64(name, path, x64):
    _compare(name, np.float64, path)


@pytest.mark.parametrize("path", ["update", "step"])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_matches_optax_float32(name, path):
    _compare(name, np.float32, path)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_defaults_match_optax(name):
    signature = inspect.signature(REFERENCES[name])
    for hyper, default in optgen.load(name).hyperparams.items():
        reference = signature.parameters[hyper].default
        if reference is not inspect.Parameter.empty:  # optax has no default learning rate
            assert default == reference, hyper


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_bfloat16_params_keep_dtype_and_track_float32(name):
    import ml_dtypes

    opt = optgen.load(name, **_hypers(name))
    p32 = jax.tree.map(jax.numpy.asarray, make_params(np.float32))
    p16 = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), p32)
    s32, s16 = opt.init(p32), opt.init(p16)
    for step in range(20):
        grads = make_grads(p32, step, np.float32)
        p32, s32 = opt.step(p32, grads, s32)
        p16, s16 = opt.step(p16, jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), grads), s16)
    for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(p32), strict=True):
        assert a.dtype == ml_dtypes.bfloat16
        assert rel_err(a, b) < 2e-2
    assert all(x.dtype == ml_dtypes.bfloat16 for x in jax.tree.leaves(s16.slots))
