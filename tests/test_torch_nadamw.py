"""torch/nadamw against torch.optim.NAdam(decoupled_weight_decay=True), step by step.

NAdam's momentum product has no closed form, so this also tests per-step state
(``state mu_product: step = 1``) through ``init``, ``update`` and ``step``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import as_jax, assert_trees_close, make_grads, make_params, trajectory

import optgen

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch)")

STEPS = 45
# Non-default values, so a hyperparameter wired to the wrong place shows.
HYPERS = {
    "lr": 3e-3,
    "beta1": 0.85,
    "beta2": 0.99,
    "eps": 1e-6,
    "weight_decay": 1e-2,
    "momentum_decay": 6e-3,
}
TOLERANCE = {np.float64: 1e-9, np.float32: 1e-4}


def _torch_trajectory(dtype):
    """Parameters after each step of torch's NAdam (mu_product is kept in torch's default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)
    try:
        params = jax.tree.map(torch.tensor, make_params(dtype))
        leaves = jax.tree.leaves(params)
        opt = torch.optim.NAdam(
            leaves,
            lr=HYPERS["lr"],
            betas=(HYPERS["beta1"], HYPERS["beta2"]),
            eps=HYPERS["eps"],
            weight_decay=HYPERS["weight_decay"],
            momentum_decay=HYPERS["momentum_decay"],
            decoupled_weight_decay=True,
            foreach=False,
        )
        trajectory = []
        for step in range(STEPS):
            grads = jax.tree.leaves(make_grads(params, step, dtype))
            for leaf, grad in zip(leaves, grads, strict=True):
                leaf.grad = torch.tensor(grad)
            opt.step()
            trajectory.append([leaf.detach().numpy().copy() for leaf in leaves])
        return trajectory
    finally:
        torch.set_default_dtype(previous)


def _compare(dtype, path):
    expected = _torch_trajectory(dtype)
    got = trajectory(
        optgen.load("torch/nadamw", **HYPERS), as_jax(make_params(dtype)), STEPS, path=path
    )
    for step, (params, _) in enumerate(got):
        assert_trees_close(jax.tree.leaves(params), expected[step], TOLERANCE[dtype], dtype=dtype)


@pytest.mark.parametrize("path", ["update", "step"])
def test_matches_torch_float64(path, x64):
    _compare(np.float64, path)


@pytest.mark.parametrize("path", ["update", "step"])
def test_matches_torch_float32(path):
    _compare(np.float32, path)
