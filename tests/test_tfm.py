"""kernels/tfm/adamweightdecay against TF Model Garden's AdamWeightDecay, over 120 steps.

Two references: a float64 NumPy one written here from TF Model Garden's documented
semantics (always runs), and ``official.modeling.optimization.legacy_adamw`` itself,
run by ``tests/scripts/tfm_reference.py`` in a fresh process (TensorFlow with tf-keras;
the ``tfm`` extra; skipped with the reason where it is not installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import as_jax, assert_trees_close, make_grads, make_params, rel_err, run_steps

import optgen
from optgen.transforms.decay_mask import key_path_name

STEPS = 120
SPEC = "tfm/adamweightdecay"
# TF Model Garden's own defaults (legacy_adamw.AdamWeightDecay.__init__)
TFM_DEFAULTS = {
    "learning_rate": 0.001,
    "beta_1": 0.9,
    "beta_2": 0.999,
    "epsilon": 1e-7,
    "weight_decay_rate": 0.0,
    "gradient_clip_norm": 1.0,
}
HYPERS = {
    "learning_rate": 3e-3,
    "beta_1": 0.8,
    "beta_2": 0.99,
    "epsilon": 1e-6,
    "weight_decay_rate": 0.05,
}
CASES = {
    "defaults": {},
    "clip_off": {"gradient_clip_norm": 0.0},
    "clip_large": {"gradient_clip_norm": 5e5},  # some steps below the norm, some above
    "exclude": {"exclude_from_weight_decay": ["vector", "huge"]},
    "include_overrides_exclude": {
        "exclude_from_weight_decay": ["vector", "huge", "cube"],
        "include_in_weight_decay": ["cu.e"],
    },
    "include_alone": {"include_in_weight_decay": ["matrix"]},
    "amsgrad": {"amsgrad": True},
    "all_clip_off": {
        "amsgrad": True,
        "gradient_clip_norm": 0.0,
        "exclude_from_weight_decay": ["scalar", "zero"],
        "include_in_weight_decay": ["zero_grad"],
    },
}


def _names_and_values(tree):
    with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [key_path_name(path) for path, _ in with_paths], [np.asarray(x) for _, x in with_paths]


def _do_use_weight_decay(name, rate, include, exclude) -> bool:
    """TF Model Garden's rule: no decay at rate 0; an include match decays; an exclude match does
    not.
    """
    if rate == 0:
        return False
    if include and any(re.search(r, name) for r in include):
        return True
    if exclude and any(re.search(r, name) for r in exclude):
        return False
    return True


def numpy_reference(settings: dict, steps: int = STEPS) -> list[np.ndarray]:
    """AdamWeightDecay in float64 from its documentation: clip all gradients by their global norm
    (``g * c * min(1/norm, 1/c)``, off at ``c = 0``), decay ``p -= lr * p * rate`` where the name
    rule says so, then TF's legacy Adam: ``m += (g - m)(1 - b1)``, ``v += (g^2 - v)(1 - b2)``,
    ``p -= m * lr * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + eps)`` (with amsgrad, ``max`` of the
    v's).
    """
    s = TFM_DEFAULTS | settings
    lr, b1, b2, eps, rate, clip = (
        s[k]
        for k in (
            "learning_rate",
            "beta_1",
            "beta_2",
            "epsilon",
            "weight_decay_rate",
            "gradient_clip_norm",
        )
    )
    shapes = make_params(np.float64)
    names, params = _names_and_values(shapes)
    decays = [
        _do_use_weight_decay(
            n, rate, s.get("include_in_weight_decay"), s.get("exclude_from_weight_decay")
        )
        for n in names
    ]
    m, v, vhat = ([np.zeros_like(p) for p in params] for _ in range(3))
    for step in range(steps):
        grads = _names_and_values(make_grads(shapes, step, np.float64))[1]
        if clip > 0:
            norm = np.sqrt(sum(np.sum(g * g) for g in grads))
            grads = [g * (clip * min(1 / norm, 1 / clip)) for g in grads]
        t = step + 1
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        for i, g in enumerate(grads):
            if decays[i]:
                params[i] = params[i] - lr * params[i] * rate
            m[i] = m[i] + (g - m[i]) * (1 - b1)
            v[i] = v[i] + (g * g - v[i]) * (1 - b2)
            vhat[i] = np.maximum(vhat[i], v[i])
            params[i] = params[i] - m[i] * alpha / (
                np.sqrt(vhat[i] if s.get("amsgrad") else v[i]) + eps
            )
    return params


def run_optgen(settings: dict, dtype, steps: int = STEPS) -> list[np.ndarray]:
    opt = optgen.load(SPEC, **settings)
    shapes = make_params(dtype)  # gradients drawn in its key order, as the references draw them
    params, _ = run_steps(
        opt,
        as_jax(shapes),
        steps,
        path="step",
        grads_at=lambda _, step: make_grads(shapes, step, dtype),
    )
    return _names_and_values(params)[1]


def test_defaults_are_tf_model_gardens():
    assert optgen.load(SPEC).hyperparams == TFM_DEFAULTS
    assert optgen.check_spec(SPEC).options == {"amsgrad": False}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_reference_float64(case, x64):
    settings = HYPERS | CASES[case]
    want = numpy_reference(settings)
    assert not any(
        np.array_equal(w, p)
        for w, p in zip(want, _names_and_values(make_params(np.float64))[1], strict=True)
        if w.size > 1
    ), "the reference must move every parameter"
    assert_trees_close(run_optgen(settings, np.float64), want, 1e-9)


def test_include_overrides_exclude_in_the_reference(x64):
    """The reference itself: including "cube" undoes excluding it, and excluding it changes only
    "cube".
    """
    exclude = CASES["exclude"]["exclude_from_weight_decay"]
    names = _names_and_values(make_params(np.float64))[0]
    plain = numpy_reference(HYPERS | CASES["exclude"], steps=5)
    included = numpy_reference(HYPERS | CASES["include_overrides_exclude"], steps=5)
    excluded = numpy_reference(HYPERS | {"exclude_from_weight_decay": [*exclude, "cube"]}, steps=5)
    assert all(np.array_equal(x, y) for x, y in zip(plain, included, strict=True))
    assert {
        n for n, x, y in zip(names, plain, excluded, strict=True) if not np.array_equal(x, y)
    } == {"cube"}


# -- TF Model Garden itself ------------------------------------------------------------------


def _tf_reference(cases: dict, tmp_path) -> tuple[dict[str, list[np.ndarray]], dict]:
    """The parameters after STEPS steps of legacy_adamw.AdamWeightDecay per case, and
    its defaults.
    """
    for module, package in (
        ("tensorflow", "tensorflow-cpu"),
        ("tf_keras", "tf-keras"),
        ("official", "tf-models-official"),
    ):
        if importlib.util.find_spec(module) is None:
            pytest.skip(
                f"{package} is not installed: TF Model Garden conformance needs pip install -e "
                "'.[tfm]' && pip install --no-deps tf-models-official"
            )
    shapes = make_params(np.float32)
    names, params = _names_and_values(shapes)
    inputs = {"names": np.array(names)} | {f"param/{i}": p for i, p in enumerate(params)}
    for step in range(STEPS):
        inputs |= {
            f"grad/{step}/{i}": g
            for i, g in enumerate(_names_and_values(make_grads(shapes, step, np.float32))[1])
        }
    np.savez(tmp_path / "inputs.npz", **inputs)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = Path(__file__).parent / "scripts" / "tfm_reference.py"
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(
        [
            sys.executable,
            str(script),
            *(str(tmp_path / f) for f in ("inputs.npz", "cases.json", "out.npz")),
        ],
        check=True,
        env=env,
        timeout=900,
    )
    out = np.load(tmp_path / "out.npz")
    return {case: [out[f"{case}/{i}"] for i in range(len(names))] for case in cases}, json.loads(
        str(out["defaults"])
    )


def test_matches_tf_model_garden_float32(tmp_path):
    cases = {case: HYPERS | settings for case, settings in CASES.items()}
    want, defaults = _tf_reference(cases, tmp_path)
    assert defaults == TFM_DEFAULTS | {
        "amsgrad": False,
        "include_in_weight_decay": None,
        "exclude_from_weight_decay": None,
    }
    worst = 0.0
    for case, settings in cases.items():
        for i, (g, w) in enumerate(zip(run_optgen(settings, np.float32), want[case], strict=True)):
            worst = max(worst, rel_err(g, w))
            assert rel_err(g, w) <= 1e-5, (case, i, rel_err(g, w))
    print(f"worst relative error against TF Model Garden over {STEPS} steps: {worst:.2e}")
