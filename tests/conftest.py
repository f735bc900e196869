"""Shared test helpers: a mixed pytree of parameters and reproducible gradients; golden files."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import optgen  # noqa: F401  (first: it sets XLA:CPU's fusion option before JAX starts a backend)

# the Keras tests (where Keras is installed) run on its JAX backend
os.environ.setdefault("KERAS_BACKEND", "jax")

SHAPES = {"scalar": (), "vector": (7,), "matrix": (5, 3), "cube": (2, 3, 4)}


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite the CHECK lines of golden files with what their RUN line prints now",
    )


@pytest.fixture
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


CHECK = "// CHECK:"
_CASE_MARKER = re.compile(r"^(// -----.*\n)", re.M)


def check_golden(path, update=False):
    """Run a golden file's ``// RUN: optgen ... %s`` line and compare what it prints for each
    case (the pieces between ``// -----`` lines) with the case's ``// CHECK:`` lines, which must
    match the whole output exactly. With ``update``, rewrite the CHECK lines instead."""
    from click.testing import CliRunner

    from optgen.cli import main

    text = path.read_text()
    command = re.search(r"^// RUN: optgen (.*)$", text, re.M)
    assert command, f"{path.name}: no '// RUN: optgen ...' line"
    result = CliRunner().invoke(
        main, [str(path) if a == "%s" else a for a in shlex.split(command.group(1))]
    )
    assert result.exit_code == 0, result.output
    outputs = result.stdout.split("// -----\n")
    parts = _CASE_MARKER.split(text)  # case, marker, case, marker, case, ...
    cases = parts[::2]
    assert len(outputs) == len(cases), f"{path.name}: {len(cases)} cases, {len(outputs)} outputs"
    if update:
        parts[::2] = [_with_checks(case, out) for case, out in zip(cases, outputs, strict=True)]
        path.write_text("".join(parts))
        return
    for number, (case, out) in enumerate(zip(cases, outputs, strict=True), start=1):
        expected = "".join(
            line[len(CHECK) :].removeprefix(" ") + "\n"
            for line in case.splitlines()
            if line.startswith(CHECK)
        )
        assert out == expected, f"{path.name}, case {number}:\n{case}"


def _with_checks(case: str, output: str) -> str:
    kept = "".join(line + "\n" for line in case.splitlines() if not line.startswith(CHECK)).rstrip(
        "\n"
    )
    return kept + "\n" + "".join(f"{CHECK} {line}".rstrip() + "\n" for line in output.splitlines())


def make_params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = {name: rng.normal(size=shape).astype(dtype) for name, shape in SHAPES.items()}
    params["zero_grad"] = rng.normal(size=(4,)).astype(dtype)
    params["huge_grad"] = {"w": rng.normal(size=(3, 2)).astype(dtype)}
    return params


def make_grads(params, step, dtype=None):
    """Gradients for one step, drawn from the step number and the leaves' shapes alone: random,
    except an all-zero leaf ``zero_grad`` and one of magnitude ~1e6 ``huge_grad`` where ``params``
    (a dict) has them. Each leaf in ``dtype``, or in its parameter's dtype when it is None."""
    import jax

    rng = np.random.default_rng(1000 + step)

    def draw(p, scale=1.0):  # p's dtype without copying p to the host (a sync for a JAX array)
        leaf_dtype = getattr(p, "dtype", None)
        leaf_dtype = np.asarray(p).dtype if leaf_dtype is None else leaf_dtype
        return (scale * rng.normal(size=np.shape(p))).astype(leaf_dtype if dtype is None else dtype)

    grads = {k: jax.tree.map(draw, v) for k, v in params.items() if k != "huge_grad"}
    if "zero_grad" in params:
        grads["zero_grad"] = np.zeros_like(grads["zero_grad"])
    if "huge_grad" in params:
        grads["huge_grad"] = jax.tree.map(lambda p: draw(p, 1e6), params["huge_grad"])
    return grads


def as_jax(tree):
    """``tree`` with every leaf a JAX array."""
    import jax

    return jax.tree.map(jax.numpy.asarray, tree)


def trajectory(opt, params, steps, path="update", grads_at=make_grads, jit=False, inputs_at=None):
    """Yield ``(params, state)`` after each of ``steps`` steps of ``opt`` from ``params``.

    ``path="update"`` runs the optax protocol (``opt.update``, then ``optax.apply_updates``), so
    ``opt`` may be an optgen optimizer or the optax reference beside it; ``path="step"`` runs
    optgen's fused ``opt.step``. ``grads_at(params, step)`` gives each step's gradients (from the
    parameters of that step); ``jit`` jits ``opt.update``; ``inputs_at(step)``, if given, the
    keyword inputs each step takes beside them (a spec's ``input hessian``: ``hessian=...``)."""
    import jax
    import optax

    state = opt.init(params)
    update = jax.jit(opt.update) if jit else opt.update
    for step in range(steps):
        grads, inputs = grads_at(params, step), inputs_at(step) if inputs_at else {}
        if path == "step":
            params, state = opt.step(params, grads, state, **inputs)
        else:
            updates, state = update(grads, state, params, **inputs)
            params = optax.apply_updates(params, updates)
        yield params, state


def run_steps(opt, params, steps, **kwargs):
    """``(params, state)`` after the last of ``steps`` steps of :func:`trajectory`."""
    *_, last = trajectory(opt, params, steps, **kwargs)
    return last


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_trees_close(got, want, tolerance, same_dtype=False, dtype=None):
    """Each leaf of ``got`` has the shape of ``want``'s and a relative error (:func:`rel_err`, over
    the whole leaf) of at most ``tolerance``; with ``same_dtype`` the same dtype, with ``dtype``
    that dtype on both sides. The trees have as many leaves; a failure names the leaf."""
    import jax

    for (key, w), g in zip(
        jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), strict=True
    ):
        name = jax.tree_util.keystr(key)
        assert np.shape(g) == np.shape(w), (name, np.shape(g), np.shape(w))
        assert not same_dtype or np.asarray(g).dtype == np.asarray(w).dtype, (
            name,
            g.dtype,
            w.dtype,
        )
        assert dtype is None or np.asarray(g).dtype == np.asarray(w).dtype == dtype, (
            name,
            g.dtype,
            w.dtype,
        )
        assert rel_err(g, w) <= tolerance, (name, rel_err(g, w))


@pytest.fixture
def x64():
    import jax

    with jax.enable_x64(True):
        yield


class CompileCounter:
    """Counts XLA compilations while active (``with count_compiles() as compiles: ...;
    compiles.n``).
    """

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.n = 0
        self.active = False

    def __call__(self, event, duration, **kwargs):
        if self.active and event == self.EVENT:
            self.n += 1


_COUNTER = None


class count_compiles:
    """A context manager: its ``n`` is the number of XLA compilations run inside it."""

    def __enter__(self) -> CompileCounter:
        global _COUNTER
        import jax

        if _COUNTER is None:  # jax.monitoring listeners cannot be removed one by one: register once
            _COUNTER = CompileCounter()
            jax.monitoring.register_event_duration_secs_listener(_COUNTER)
        _COUNTER.n, _COUNTER.active = 0, True
        return _COUNTER

    def __exit__(self, *exc) -> None:
        _COUNTER.active = False


def run_device_script(name: str, timeout: int) -> dict:
    """Run ``tests/scripts/NAME`` in a fresh process that sees 8 CPU devices; its last line of
    output, as JSON (the device count must be set before JAX starts, hence the process)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env.pop("OPTGEN_XLA_FLAGS", None)
    script = Path(__file__).parent / "scripts" / name
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def many_leaf_tree(seed: int, big: int, matrix: bool = True) -> dict:
    """f32, bf16 and f16 parameters: one of ``big`` elements, optionally a (33, 7) matrix, and more
    small ones than one call of optgen's own CPU loop takes (so a step is several calls)."""
    import jax.numpy as jnp
    import ml_dtypes
    from optgen.codegen.primitive import FFI_MAX_LEAVES

    rng = np.random.default_rng(seed)
    tree = {"big": rng.normal(size=big).astype(np.float32)}
    if matrix:
        tree["m"] = rng.normal(size=(33, 7)).astype(np.float32)
    tree["bf16"] = rng.normal(size=(5, 300)).astype(ml_dtypes.bfloat16)
    tree["f16"] = rng.normal(size=129).astype(np.float16)
    tree |= {
        f"s{i:03d}": rng.normal(size=int(rng.integers(1, 40))).astype(np.float32)
        for i in range(FFI_MAX_LEAVES + 2)
    }
    return {k: jnp.asarray(v) for k, v in tree.items()}
