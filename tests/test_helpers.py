"""The shared test helpers in conftest.py can fail: a comparison that always passes would make
every test built on it one that cannot fail."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_trees_close, make_grads, make_params


def test_assert_trees_close_names_the_leaf_that_differs():
    want = {"a": np.ones(3), "b": {"c": np.arange(4.0)}}
    assert_trees_close({"a": np.ones(3), "b": {"c": np.arange(4.0) + 1e-12}}, want, 1e-9)
    with pytest.raises(AssertionError, match=r"\['b'\]\['c'\]"):
        assert_trees_close({"a": np.ones(3), "b": {"c": np.arange(4.0) + 1e-3}}, want, 1e-9)
    with pytest.raises(AssertionError, match=r"\['a'\]"):  # a shape that broadcasts is still wrong
        assert_trees_close({"a": np.ones(1), "b": {"c": np.arange(4.0)}}, want, 1e-9)
    with pytest.raises(ValueError):  # a leaf missing
        assert_trees_close({"a": np.ones(3)}, want, 1e-9)


def test_assert_trees_close_checks_dtypes_when_asked():
    want = [np.ones(2, np.float32)]
    assert_trees_close([np.ones(2, np.float64)], want, 0.0)
    with pytest.raises(AssertionError):
        assert_trees_close([np.ones(2, np.float64)], want, 0.0, same_dtype=True)
    with pytest.raises(AssertionError):
        assert_trees_close([np.ones(2, np.float32)], want, 0.0, dtype=np.float64)


def test_make_grads_depends_on_the_step_and_the_shapes_only():
    params = make_params(np.float32)
    first, again = make_grads(params, 3), make_grads(make_params(np.float32, seed=9), 3)
    for key in params:
        np.testing.assert_array_equal(
            np.asarray(first[key] if key != "huge_grad" else first[key]["w"]),
            np.asarray(again[key] if key != "huge_grad" else again[key]["w"]),
        )
    assert not np.array_equal(make_grads(params, 4)["vector"], first["vector"])
    assert not np.any(first["zero_grad"]) and np.abs(first["huge_grad"]["w"]).max() > 1e5
    assert all(g.dtype == np.float32 for g in (first["vector"], first["huge_grad"]["w"]))
    nested = make_grads(
        {"ln": {"scale": np.ones((2, 2), np.float64)}, "b": [np.ones(3, np.float32)]}, 0
    )
    assert nested["ln"]["scale"].dtype == np.float64 and nested["b"][0].shape == (3,)
