"""Block-wise 8-bit state (``state mu: q8 = 0``, codegen/quantize.py): its layout in the state,
XLA's loops against optgen's own CPU loop, and both against a float64 NumPy reference of the
same quantized rule over many steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from optgen.codegen import ffi_runtime as rt
from optgen.codegen import quantize

import optgen
from optgen.kernel_report import inspect

STEPS = 120
# 67 x 99 = 6633 elements: 26 blocks, the last one short; 4097: just quantized; 10: kept float32
SHAPES = {"w": (67, 99), "v": (4097,), "b": (10,)}


def start(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def gradient(k: int, params: dict) -> dict:
    """Gradients of two decades of magnitude inside a block, some zero."""
    rng = np.random.default_rng(1000 + k)
    out = {}
    for name, p in params.items():
        scale = 10.0 ** rng.uniform(-2, 0, size=p.shape)
        g = (0.5 * p + rng.normal(size=p.shape)) * scale
        g.reshape(-1)[::17] = 0.0
        out[name] = g.astype(np.float32)
    return out


# ---- the reference: the same rule in float64 NumPy -----------------------------------------------


def np_quantize(x: np.ndarray):
    flat = x.reshape(-1)
    count = quantize.blocks(flat.size)
    values = np.pad(flat, (0, count * quantize.BLOCK - flat.size)).reshape(count, quantize.BLOCK)
    scales = np.abs(values).max(axis=1)
    y = np.abs(values) / np.where(scales > 0, scales, 1.0)[:, None]
    codes = np.sign(values) * np.rint(quantize.LEVELS * y**0.25)
    return codes.reshape(-1)[: flat.size].reshape(x.shape), scales


def np_dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    flat = codes.reshape(-1)
    scale = np.repeat(scales, quantize.BLOCK)[: flat.size]
    return (np.sign(flat) * scale * (np.abs(flat) / quantize.LEVELS) ** 4).reshape(codes.shape)


def stored(x: np.ndarray) -> np.ndarray:
    """``x`` as a q8 state keeps it: quantized for a big parameter, exact for a small one."""
    if x.size < quantize.MIN_ELEMENTS:
        return x
    return np_dequantize(*np_quantize(x))


def reference(spec: str, steps: int, **h) -> dict:
    """The parameters after ``steps`` steps of adamw8bit or lion8bit, in float64."""
    params = {k: v.astype(np.float64) for k, v in start().items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    nu = {k: np.zeros_like(v) for k, v in params.items()}
    for t in range(1, steps + 1):
        grads = {k: g.astype(np.float64) for k, g in gradient(t, start()).items()}
        for k, g in grads.items():
            p = params[k]
            # The step uses the new moments as computed; only what is stored is quantized.
            if spec == "adamw8bit":
                m = h["b1"] * mu[k] + (1 - h["b1"]) * g
                v = h["b2"] * nu[k] + (1 - h["b2"]) * g**2
                mu[k], nu[k] = stored(m), stored(v)
                mu_hat, nu_hat = m / (1 - h["b1"] ** t), v / (1 - h["b2"] ** t)
                step = mu_hat / (np.sqrt(nu_hat) + h["eps"]) + h["weight_decay"] * p
            else:
                u = np.sign((1 - h["b1"]) * g + h["b1"] * mu[k])
                mu[k] = stored(h["b2"] * mu[k] + (1 - h["b2"]) * g)
                step = u + h["weight_decay"] * p
            params[k] = p - h["learning_rate"] * step
    return params


HYPERS = {
    "adamw8bit": dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4),
    "lion8bit": dict(learning_rate=1e-3, b1=0.9, b2=0.99, weight_decay=1e-3),
}


def run(spec: str, lowering: str, steps: int):
    opt = optgen.load(spec, lowering=lowering, **HYPERS[spec])
    params = {k: jnp.asarray(v) for k, v in start().items()}
    state = opt.init(params)
    for t in range(1, steps + 1):
        grads = {k: jnp.asarray(g) for k, g in gradient(t, start()).items()}
        params, state = opt.step(params, grads, state)
    return params, state


def assert_nearly_all_close(actual, expected) -> None:
    """Two runs of 120 steps that round differently (float32 and float64, or two float32
    lowerings): a value near a rounding boundary of the code (or, for Lion, near a sign
    change) now and then goes the other way and its parameter then takes another path. So:
    99.9% of the parameters within 1e-4, and none further than a few steps' worth (0.01)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    close = np.isclose(actual, expected, rtol=1e-4, atol=1e-4)
    assert close.mean() >= 0.999, f"{np.mean(~close):.4%} of the parameters differ"
    assert np.abs(actual - expected).max() <= 0.01


@pytest.fixture(scope="module", params=["adamw8bit", "lion8bit"])
def runs(request):
    spec = request.param
    return spec, {lowering: run(spec, lowering, STEPS) for lowering in ("shared", "ffi")}


def test_a_q8_state_is_codes_shaped_like_the_parameter_and_a_scale_per_block(runs):
    _, results = runs
    _, state = results["ffi"]
    for name, shape in SHAPES.items():
        q = state.slots["mu"][name]
        if np.prod(shape) < quantize.MIN_ELEMENTS:
            assert q.dtype == np.float32 and q.shape == shape  # small: kept in float32
            continue
        assert isinstance(q, quantize.Quantized)
        assert q.codes.dtype == np.int8 and q.codes.shape == shape
        assert q.scales.dtype == np.float32
        assert q.scales.shape == (-(-int(np.prod(shape)) // quantize.BLOCK),)
        assert np.abs(np.asarray(q.codes)).max() <= quantize.LEVELS


def test_the_cpu_loop_quantizes_as_xla_does(runs):
    """After 120 steps: the same codes but for a few one apart (the float32 update itself
    differs by an ulp between the lowerings, which moves a value across a rounding boundary)."""
    _, results = runs
    (p_ffi, s_ffi), (p_xla, s_xla) = results["ffi"], results["shared"]
    for name in SHAPES:
        assert_nearly_all_close(p_ffi[name], p_xla[name])
        a, b = s_ffi.slots["mu"][name], s_xla.slots["mu"][name]
        if isinstance(a, quantize.Quantized):
            differ = np.asarray(a.codes, np.int32) - np.asarray(b.codes, np.int32)
            assert np.abs(differ).max() <= 1 and np.mean(differ != 0) < 1e-2
            np.testing.assert_allclose(a.scales, b.scales, rtol=1e-5)


def test_one_step_from_the_same_state_is_bit_for_bit():
    """From one state and one gradient both lowerings make identical codes and scales."""
    outs = []
    for lowering in ("shared", "ffi"):
        opt = optgen.load("adamw8bit", lowering=lowering)
        params = {k: jnp.asarray(v) for k, v in start().items()}
        state = opt.init(params)
        grads = {k: jnp.asarray(g) for k, g in gradient(1, start()).items()}
        outs.append(opt.step(params, grads, state)[1].slots)
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("lowering", ["shared", "ffi"])
def test_both_lowerings_follow_the_float64_reference_for_120_steps(runs, lowering):
    spec, results = runs
    expected = reference(spec, STEPS, **HYPERS[spec])
    params, _ = results[lowering]
    for name in SHAPES:
        assert_nearly_all_close(params[name], expected[name])


def test_the_reference_tells_a_q8_state_from_a_float32_one():
    """The comparison above can fail: unquantized AdamW ends measurably elsewhere."""
    opt = optgen.load("adamw", **HYPERS["adamw8bit"])
    params = {k: jnp.asarray(v) for k, v in start().items()}
    state = opt.init(params)
    for t in range(1, STEPS + 1):
        params, state = opt.step(
            params, {k: jnp.asarray(g) for k, g in gradient(t, start()).items()}, state
        )
    expected = reference("adamw8bit", STEPS, **HYPERS["adamw8bit"])
    close = np.isclose(np.asarray(params["w"]), expected["w"], rtol=1e-4, atol=1e-4)
    assert close.mean() < 0.9


@pytest.mark.parametrize("lowering", ["shared", "ffi"])
def test_zero_and_nonfinite_blocks(lowering):
    opt = optgen.load("adamw8bit", lowering=lowering)
    params = {"w": jnp.ones(5000, jnp.float32)}
    state = opt.init(params)
    assert not np.asarray(state.slots["mu"]["w"].scales).any()  # zeros: scale 0, codes 0
    grads = {"w": jnp.zeros(5000, jnp.float32).at[300].set(jnp.nan)}
    params, state = opt.step(params, grads, state)
    scales = np.asarray(state.slots["mu"]["w"].scales)
    assert np.isnan(scales[1]) and not scales[[0, 2]].any()  # the NaN stays in its block
    assert np.isfinite(np.asarray(params["w"])[:256]).all()


@pytest.mark.parametrize("library", ["bitsandbytes", "torchao"])
def test_the_loss_follows_torch_ecosystem_8bit_adamw(library):
    """Least squares with 8192 weights, 40 steps: optgen's adamw8bit and the library's AdamW8bit
    (another code and rounding, so the trajectories differ a little) end at the same loss."""
    torch = pytest.importorskip("torch")
    module = pytest.importorskip(
        "torchao.optim" if library == "torchao" else "bitsandbytes.optim",
        reason=f"{library} is not installed (pip install -e '.[bench]')",
    )
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 8192)).astype(np.float32) / 90
    b = rng.normal(size=64).astype(np.float32)
    hypers = dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)

    def loss(w):
        return float(np.mean((a @ np.asarray(w, np.float64) - b) ** 2))

    opt = optgen.load("adamw8bit", **hypers)
    w = {"w": jnp.zeros(8192, jnp.float32)}
    state, ours = opt.init(w), []
    grad = jax.jit(jax.grad(lambda w: jnp.mean((jnp.asarray(a) @ w["w"] - b) ** 2)))
    for _ in range(40):
        w, state = opt.step(w, grad(w), state)
        ours.append(loss(w["w"]))

    p = torch.nn.Parameter(torch.zeros(8192))
    theirs = []
    torch_opt = module.AdamW8bit([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for _ in range(40):
        torch_opt.zero_grad()
        torch.mean((torch.from_numpy(a) @ p - torch.from_numpy(b)) ** 2).backward()
        torch_opt.step()
        theirs.append(loss(p.detach().numpy()))
    first = loss(np.zeros(8192))
    assert ours[-1] < 0.01 * first  # it learns
    np.testing.assert_allclose(ours, theirs, rtol=0.1, atol=0.002 * first)


def test_a_q8_state_saves_restores_and_is_checked_like_any_state(tmp_path):
    opt = optgen.load("adamw8bit")
    params = {k: jnp.asarray(v) for k, v in start().items()}
    params, state = opt.step(
        params, {k: jnp.asarray(g) for k, g in gradient(1, start()).items()}, opt.init(params)
    )
    optgen.save_state(tmp_path / "state.optgen", state, opt)
    restored = optgen.load_state(tmp_path / "state.optgen", opt, params)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(optgen.InputError, match="codes") as err:  # a float32 AdamW state
        opt.step(params, jax.tree.map(jnp.ones_like, params), optgen.load("adamw").init(params))
    assert err.value.code == "E307"


@pytest.mark.parametrize("spec", ["adamw8bit", "lion8bit"])
def test_the_own_loop_is_one_call_at_the_q8_minimum(spec):
    """p and g 4 bytes each, each q8 state 1 byte and 4/256 of a scale, read and written."""
    program = optgen.load(spec).compiled.program
    report = inspect(program, np.dtype(np.float32), 1 << 16, lowering="ffi")
    states = len(program.state_dtypes)
    assert report.min_bytes_per_element == pytest.approx(12 + states * 2 * (1 + 4 / 256))
    assert report.kernels == 1
    assert report.bytes_per_element == pytest.approx(report.min_bytes_per_element, rel=1e-3)


def test_a_q8_step_with_sums_runs_on_xla_loops_and_ffi_refuses_it():
    """The reading pass reads stored values, and a q8 state's need its block's scale: such a
    step keeps XLA's loops under auto (the same numbers as lowering='shared'), and
    lowering='ffi' says why it cannot run it."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(300, 70)), jnp.float32)}
    results = []
    for lowering in ("auto", "shared"):
        opt = optgen.load("adamw8bit", global_clipnorm=1.0, lowering=lowering)
        p, state = jax.tree.map(jnp.copy, params), opt.init(params)
        for step in range(3):
            grads = {
                "w": jnp.asarray(np.random.default_rng(step).normal(size=(300, 70)), jnp.float32)
            }
            p, state = opt.step(p, grads, state)
        results.append(p["w"])
    np.testing.assert_array_equal(results[0], results[1])
    # optgen inspect reports the lowering the step takes
    report = inspect(opt.compiled.program, np.dtype(np.float32), 1 << 16)
    assert report.lowering == "shared"
    opt = optgen.load("adamw8bit", global_clipnorm=1.0, lowering="ffi")
    with pytest.raises(optgen.InputError, match="E384.*sums keeps q8 state"):
        opt.step(params, params | {"w": params["w"] + 1}, opt.init(params))


# ---- the encoder on adversarial values ---------------------------------------------------------

COPY_SPEC = """optimizer q8copy "stores the gradient as a q8 state"

state m: q8 = 0

update:
  m = g
  p = p - 0 * m
"""
SUM_SPEC = COPY_SPEC.replace("q8copy", "q8sum").replace("m = g", "m = m + g")


def np_codes32(x: np.ndarray) -> np.ndarray:
    """The encoder in float32 NumPy, operation by operation as codegen/quantize.py's jnp form:
    y = min(|x| * (1 / s), 1), c = copysign(rint(127 * sqrt(sqrt(y))), x). Both lowerings run with
    denormals read as zero (XLA:CPU's setting, which optgen's loop runs under too): a block whose
    absmax is denormal has a zero reciprocal, so codes 0."""
    flat = x.reshape(-1)
    values = np.pad(flat, (0, -flat.size % quantize.BLOCK)).reshape(-1, quantize.BLOCK)
    bits = values.view(np.int32) & 0x7FFFFFFF
    s = bits.max(axis=1).view(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        reciprocal = np.where(s >= np.finfo(np.float32).tiny, np.float32(1) / s, np.float32(0))
        y = np.abs(values) * reciprocal
        y = np.where(y <= 1, y, np.float32(1))
        magnitude = np.rint(np.float32(quantize.LEVELS) * np.sqrt(np.sqrt(y)))
    codes = np.copysign(magnitude, values).astype(np.int8)
    return codes.reshape(-1)[: flat.size].reshape(x.shape)


def np_decoded32(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """codegen/quantize.py's dequantize in float32 NumPy, operation by operation."""
    f = codes.astype(np.float32) * quantize.INVERSE_LEVELS
    square = f * f
    scale = np.repeat(scales, quantize.BLOCK)[: codes.size]
    return np.copysign(square * square * scale, f)


def adversarial_blocks() -> np.ndarray:
    """Blocks of 256 values where an encoder can go wrong: each code's threshold and the float
    just below it (scale 1, so y is the value itself), the same around a scale whose reciprocal
    rounds (3), zeros of both signs, denormals, a block of denormals only, the absmax element of
    either sign, inf and NaN, then ordinary values up to the quantized minimum size."""
    t = quantize.thresholds()
    below = np.nextafter(t, np.float32(0))
    sign = np.where(np.arange(t.size) % 2, np.float32(-1), np.float32(1))
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    rng = np.random.default_rng(7)

    def block(head, fill=0.0):
        return np.concatenate(
            [np.asarray(head, np.float32), np.full(256 - len(head), fill, np.float32)]
        )

    around = (np.float32(3) * t).astype(np.float32)
    blocks = [
        block([1.0, 0.0, *(sign * t), *(-sign * below)]),
        block([3.0, -0.0, *(sign * np.nextafter(around, 0)), *(-sign * np.nextafter(around, 9))]),
        block([-1.0, -0.0, 0.0, tiny, -tiny, 1e-39, -1e-38, 1.2e-38, 2.4e-10, 1e-30], -0.0),
        block([tiny * 3, -tiny, 0.0, -0.0, tiny * 2]),  # a denormal absmax
        block([np.inf, 1.0, -2.0, 0.0, -np.inf]),
        block([np.nan, 1.0, -2.0, 0.0]),
        block([-2.0, 2.0 - 2**-22, 1.0, -1e-10]),
    ]
    ordinary = rng.normal(size=(16 - len(blocks)) * 256) * 10.0 ** rng.uniform(-9, 0, 256 * 9)
    return np.concatenate([*blocks, ordinary.astype(np.float32)])


@pytest.mark.parametrize("lowering", ["shared", "ffi"])
def test_the_encoder_gives_the_reference_codes_on_adversarial_values(tmp_path, lowering):
    """Codes and scales of each lowering equal the float32 definition bit for bit on values at
    every code threshold, signed zeros, denormals, absmax elements, inf and NaN."""
    (tmp_path / "copy.spec").write_text(COPY_SPEC)
    opt = optgen.load(str(tmp_path / "copy.spec"), lowering=lowering)
    x = adversarial_blocks()
    params = {"w": jnp.zeros(x.size, jnp.float32)}
    _, state = opt.step(params, {"w": jnp.asarray(x)}, opt.init(params))
    q = state.slots["m"]["w"]
    scales = (x.view(np.int32).reshape(-1, 256) & 0x7FFFFFFF).max(axis=1)
    np.testing.assert_array_equal(np.asarray(q.scales).view(np.int32), scales)
    np.testing.assert_array_equal(np.asarray(q.codes), np_codes32(x))
    codes = np.asarray(q.codes)
    assert (codes[2:129] == np.arange(1, 128) * np.sign(x[2:129])).all()  # at threshold k: k
    assert (np.abs(codes[129:256]) == np.arange(0, 127)).all()  # just below it: k - 1


@pytest.mark.parametrize("lowering", ["shared", "ffi"])
def test_codes_across_chunks_and_short_blocks(tmp_path, lowering):
    """The own loop encodes each block within the loop over the next one: parameters that span
    several chunks of the thread pool, end in a short block, or give a chunk one short block
    only, decoded and encoded again in a second step, equal the float32 definition bit for bit."""
    chunk = rt.CHUNK_ELEMENTS
    (tmp_path / "sum.spec").write_text(SUM_SPEC)
    opt = optgen.load(str(tmp_path / "sum.spec"), lowering=lowering)
    rng = np.random.default_rng(3)
    sizes = {"a": 2 * chunk + 100, "b": chunk + 263, "c": 4097, "d": 4096}
    params = {k: jnp.zeros(n, jnp.float32) for k, n in sizes.items()}
    state = opt.init(params)
    expected = {k: np.zeros(n, np.float32) for k, n in sizes.items()}
    for _ in range(2):
        grads = {
            k: (rng.normal(size=n) * 10.0 ** rng.uniform(-6, 0, n)).astype(np.float32)
            for k, n in sizes.items()
        }
        params, state = opt.step(params, {k: jnp.asarray(g) for k, g in grads.items()}, state)
        for k, g in grads.items():
            m = expected[k] + g
            expected[k] = np_decoded32(
                np_codes32(m), np.abs(np.pad(m, (0, -m.size % 256))).reshape(-1, 256).max(axis=1)
            )
            q = state.slots["m"][k]
            np.testing.assert_array_equal(np.asarray(q.codes), np_codes32(m))
    for k, q in state.slots["m"].items():
        np.testing.assert_array_equal(
            np_decoded32(np.asarray(q.codes), np.asarray(q.scales)), expected[k]
        )
