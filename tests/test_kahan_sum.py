"""optgen.load(..., kahan_sum=True): bf16 and f16 parameters keep what each store drops in a state
``kahan_comp`` (optgen/transforms/kahan_sum.py), alike on XLA's loops and optgen's own CPU loop,
leave float32 parameters as they were, and follow float32 training where plain bf16 stalls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from optgen.codegen import export, ffi_runtime, primitive

import optgen
from optgen.diagnostics import SpecError

BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)
LR = 1e-3
STEPS = 240

# optax's AdamW with its moments kept in float32 whatever the parameters' dtype (so that what
# differs is the parameters' rounding alone)
ADAMW_F32_MOMENTS = """optimizer adamw_f32_moments "AdamW, moments in float32"

hyper learning_rate = 1e-4
hyper b1 = 0.9 in [0, 1)
hyper b2 = 0.999 in [0, 1)
hyper eps = 1e-8

state mu: f32 = 0
state nu: f32 = 0

update:
  mu = b1 * mu + (1 - b1) * g
  nu = b2 * nu + (1 - b2) * g^2
  p = p - learning_rate * (mu / (1 - b1^t)) / (sqrt(nu / (1 - b2^t)) + eps)
"""


@pytest.fixture(scope="module")
def adamw_f32_moments(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec") / "adamw_f32_moments.spec"
    path.write_text(ADAMW_F32_MOMENTS)
    return str(path)


def mixed_params(low):
    """Parameters stored in ``low`` (more than one call of the loop takes, one over several
    chunks, a matrix) and one float32 parameter, the largest far from 1 (other ulps)."""
    rng = np.random.default_rng(0)
    params = {f"s{i:03d}": rng.normal(size=int(rng.integers(1, 40))) for i in range(70)}
    params |= {"big": 40 * rng.normal(size=3 * ffi_runtime.CHUNK_ELEMENTS + 5)}
    params |= {"m": 1 + rng.random(size=(33, 7))}
    params = {k: v.astype(low) for k, v in params.items()}
    assert len(params) > primitive.FFI_MAX_LEAVES  # the loop runs as several calls
    return params | {"full": rng.normal(size=50).astype(F32)}


def gradients(params, steps):
    """One gradient per step, in each parameter's dtype, of mixed scales."""
    rng = np.random.default_rng(1)
    for _ in range(steps):
        yield {
            k: (rng.normal(size=v.shape) * 10.0 ** rng.integers(-2, 2)).astype(v.dtype)
            for k, v in params.items()
        }


def f32(x):
    """A float64 value rounded to float32 and held as float64: float32 arithmetic done in float64
    (a sum, difference or product of two float32 values, rounded once more, is the float32 one)."""
    return np.float32(x).astype(np.float64)


def reference(params, steps, fused):
    """SGD with kahan_sum in float64, from the rule in optgen/transforms/kahan_sum.py: each
    parameter and its compensation after ``steps`` steps. With ``fused``, ``p - lr * g`` rounds
    once, as a fused multiply-add: XLA:CPU's loops contract it (LLVM's fp-contract), optgen's own
    loop does not."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    c = {k: np.zeros_like(v) for k, v in p.items()}
    lr = f32(LR)
    for grads in gradients(params, steps):
        for k, g in grads.items():
            step = lr * g.astype(np.float64)  # exact: 24 by at most 24 significant bits
            target = f32(f32(p[k] - (step if fused else f32(step))) + c[k])  # s = p' + c
            p[k] = target.astype(np.float32).astype(params[k].dtype).astype(np.float64)
            c[k] = f32(target - p[k]).astype(params[k].dtype).astype(np.float64)
    return p, c


def run(spec, params, lowering, steps, **options):
    opt = optgen.load(spec, lowering=lowering, **options)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    state = opt.init(params)
    for grads in gradients(params, steps):
        params, state = opt.step(params, {k: jnp.asarray(v) for k, v in grads.items()}, state)
    return params, state


def assert_same_p_and_compensation(got, want):
    """Each ``(params, state)``'s parameters and ``kahan_comp``, bit for bit, leaf by leaf."""
    for k in want[0]:
        np.testing.assert_array_equal(np.asarray(got[0][k]), np.asarray(want[0][k]), err_msg=k)
        np.testing.assert_array_equal(
            np.asarray(got[1].slots["kahan_comp"][k]),
            np.asarray(want[1].slots["kahan_comp"][k]),
            err_msg=k,
        )


@pytest.mark.parametrize("low", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("lowering", ["ffi", "shared"])
def test_sgd_is_the_float64_reference_bit_for_bit(lowering, low):
    params = mixed_params(low)
    got, state = run("sgd", params, lowering, STEPS, learning_rate=LR, kahan_sum=True)
    want_p, want_c = reference(params, STEPS, fused=lowering == "shared")
    for k in params:
        assert got[k].dtype == state.slots["kahan_comp"][k].dtype == params[k].dtype
        np.testing.assert_array_equal(np.asarray(got[k], np.float64), want_p[k], err_msg=k)
        comp = np.asarray(state.slots["kahan_comp"][k], np.float64)
        np.testing.assert_array_equal(comp, want_c[k], err_msg=k)
    assert np.any(want_c["big"] != 0)
    np.testing.assert_array_equal(want_c["full"], 0)  # float32: nothing dropped, p as plain SGD


@pytest.mark.parametrize("lowering", ["ffi", "shared"])
def test_float32_parameters_step_as_without_it(lowering):
    params = {"w": np.random.default_rng(2).normal(size=(64, 33)).astype(F32)}
    plain, _ = run("adamw", params, lowering, 30)
    kahan, state = run("adamw", params, lowering, 30, kahan_sum=True)
    np.testing.assert_array_equal(np.asarray(kahan["w"]), np.asarray(plain["w"]))
    np.testing.assert_array_equal(np.asarray(state.slots["kahan_comp"]["w"]), 0)


def adamw_through_update(params, lowering, steps):
    """AdamW with kahan_sum the optax way: ``update``, then ``optax.apply_updates``."""
    opt = optgen.load("adamw", kahan_sum=True, lowering=lowering)
    tree = {k: jnp.asarray(v) for k, v in params.items()}
    state = opt.init(tree)
    for grads in gradients(params, steps):
        updates, state = opt.update({k: jnp.asarray(v) for k, v in grads.items()}, state, tree)
        tree = optax.apply_updates(tree, updates)
    return tree, state


@pytest.mark.parametrize("lowering", ["ffi", "shared"])
def test_adamw_update_then_apply_updates_is_step(lowering):
    """Bit for bit where each step's change of p fits the parameter's dtype: away from 0 (a
    parameter crossing from 0.5 to 1e-3 changes by more significant bits than bf16 has, and
    ``update`` returns the change in the parameter's dtype, as optax)."""
    params = {k: np.sign(v) * (1 + np.abs(v)) for k, v in mixed_params(BF16).items()}
    got, got_state = adamw_through_update(params, lowering, 20)
    want, want_state = run("adamw", params, lowering, 20, kahan_sum=True)
    assert_same_p_and_compensation((got, got_state), (want, want_state))


def test_adamw_alike_on_both_lowerings(adamw_f32_moments):
    """XLA's loops fuse multiply-adds (one rounding) that optgen's own loop rounds twice, so
    their float32 values differ in the last bit, and ``kahan_comp`` holds the low bits where
    that shows: the parameters agree but for a rare ulp, and what ``p + kahan_comp`` carries
    to 2^-16 of ``p``."""
    params = mixed_params(BF16)
    steps = 30
    ffi, ffi_state = run(adamw_f32_moments, params, "ffi", steps, kahan_sum=True)
    xla, xla_state = run(adamw_f32_moments, params, "shared", steps, kahan_sum=True)
    differ = 0
    for k in params:
        p = [np.asarray(x[k], np.float64) for x in (ffi, xla)]
        c = [np.asarray(s.slots["kahan_comp"][k], np.float64) for s in (ffi_state, xla_state)]
        ulp = np.spacing(np.abs(p[0]).astype(params[k].dtype)).astype(np.float64)
        assert np.all(np.abs(p[0] - p[1]) <= ulp), k
        differ += np.count_nonzero(p[0] != p[1])
        carried = np.abs((p[0] + c[0]) - (p[1] + c[1]))
        assert np.all(carried <= 2.0**-16 * np.abs(p[0])), k  # twice bf16's significant bits
    assert differ <= 1e-4 * sum(v.size for v in params.values())


@pytest.mark.parametrize(
    "option", [{"skip_nonfinite": True}, {"gradient_accumulation_steps": 2}], ids=lambda o: [*o][0]
)
def test_a_call_that_does_not_update_keeps_p_and_kahan_comp(option):
    """skip_nonfinite and accumulation wrap the compensated update: a skipped step or an
    accumulating call leaves both bit for bit (outside, p + c would round again)."""
    opt = optgen.load("adamw", learning_rate=1e-2, kahan_sum=True, **option)
    params = {k: jnp.asarray(v) for k, v in mixed_params(BF16).items()}
    grads = [{k: jnp.asarray(v) for k, v in g.items()} for g in gradients(params, 3)]
    state = opt.init(params)
    for g in grads[:2]:  # a step, then the accumulation's first call of the next
        params, state = opt.step(params, g, state)
    if "skip_nonfinite" in option:
        grads[2]["s000"] = grads[2]["s000"].at[0].set(jnp.nan)
    else:
        grads[2] = grads[1]  # (compensations are nonzero only after an update)
    before = jax.tree.map(np.array, (params, state.slots["kahan_comp"]))  # copies: step donates
    assert any(np.any(c != 0) for c in before[1].values())
    params, state = opt.step(params, grads[2], state)
    for old, new in zip(before, (params, state.slots["kahan_comp"]), strict=True):
        for k in old:
            np.testing.assert_array_equal(np.asarray(new[k]), old[k], err_msg=k)


def test_vmap_and_pack_step_as_the_kernel():
    """Under jax.vmap the step is the IR in jnp ops (codegen/jnp_backend.py), and with
    pack=True small parameters' states live in flat buffers: both give the kernel's bits."""
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.normal(size=(2, 300)), jnp.bfloat16)}
    grads = {"w": jnp.asarray(rng.normal(size=(2, 300)), jnp.bfloat16)}
    opt = optgen.load("adamw", learning_rate=1e-3, kahan_sum=True)
    state = opt.init({"w": params["w"][0]})
    alone = [opt.update({"w": grads["w"][i]}, state, {"w": params["w"][i]}) for i in range(2)]
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    batched = jax.vmap(opt.update)(grads, stacked, params)
    for i in range(2):
        for got, want in (
            (batched[0]["w"][i], alone[i][0]["w"]),
            (batched[1].slots["kahan_comp"]["w"][i], alone[i][1].slots["kahan_comp"]["w"]),
        ):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    small = {k: v for k, v in mixed_params(BF16).items() if v.size <= 40}
    unpacked, unpacked_state = run("adamw", small, "auto", 5, kahan_sum=True)
    packed, packed_state = run("adamw", small, "auto", 5, kahan_sum=True, pack=True)
    assert_same_p_and_compensation((packed, packed_state), (unpacked, unpacked_state))


def test_xla_rounds_bf16_with_one_reduce_precision():
    """XLA's GPU pipelines drop an f32 -> bf16 -> f32 convert pair (simplify-fp-conversions),
    which would leave nothing to compensate: XLA's loops round with reduce_precision instead."""
    program = optgen.load("adamw", kahan_sum=True).compiled.program
    text = export.stablehlo_text(program, BF16, "n")
    assert text.count("stablehlo.reduce_precision") == 1
    assert "stablehlo.reduce_precision" not in export.stablehlo_text(program, F32, "n")


def test_refused_with_stochastic_rounding():
    with pytest.raises(SpecError) as err:
        optgen.load("adamw", kahan_sum=True, stochastic_rounding=True)
    assert err.value.code == "E421"


# ---- convergence: bf16 AdamW with Kahan summation follows float32 AdamW


def quadratic():
    """``0.5 * |p - target|^2`` from ``p`` near 1: the start (bf16 values, alike in every dtype)
    and the target, as float64."""
    rng = np.random.default_rng(3)
    start = (1 + 0.1 * rng.random(4096)).astype(BF16).astype(np.float64)
    return start, 0.5 + rng.random(4096)


def adamw_on_a_quadratic(spec, dtype, steps, **options):
    """AdamW on :func:`quadratic`: the parameters after ``steps`` steps, in float64, and where they
    started."""
    start, target = quadratic()
    target = jnp.asarray(target, jnp.float32)
    opt = optgen.load(spec, **options)
    p = {"w": jnp.asarray(start, dtype)}
    state = opt.init(p)
    for _ in range(steps):
        p, state = opt.step(p, {"w": (p["w"].astype(jnp.float32) - target).astype(dtype)}, state)
    return np.asarray(p["w"], np.float64), start


@pytest.mark.parametrize("lowering", ["ffi", "shared"])
def test_bf16_with_kahan_sum_follows_float32_adamw(lowering, adamw_f32_moments):
    spec, steps = adamw_f32_moments, 1000
    full, start = adamw_on_a_quadratic(spec, F32, steps, lowering=lowering)
    plain, _ = adamw_on_a_quadratic(spec, BF16, steps, lowering=lowering)
    kahan, _ = adamw_on_a_quadratic(spec, BF16, steps, lowering=lowering, kahan_sum=True)
    moved = np.linalg.norm(full - start)

    def off(p):  # distance to the float32 trajectory, as a fraction of how far that moved
        return np.linalg.norm(p - full) / moved

    # steps of 1e-4 are below half a bf16 ulp at 1 (2^-9): to nearest, nothing moves
    np.testing.assert_array_equal(plain, start)
    # to nearest bf16 the float32 trajectory itself is off by 0.020 (its rounding alone)
    assert off(kahan) < 0.03, off(kahan)


def test_like_torch_optimi_adamw_kahan_sum():
    """torch-optimi's AdamW(kahan_sum=True) on the same problem, moments in bf16 on both sides:
    the two bf16 trajectories stay within the distance each keeps from float32 AdamW. (optimi
    rounds p' + c to bf16 before adding it to p, and updates its moments with lerp.)"""
    optimi = pytest.importorskip("optimi", reason="torch-optimi is not installed")
    torch = pytest.importorskip("torch")
    steps = 300
    hypers = dict(learning_rate=1e-4, b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.0)
    full, start = adamw_on_a_quadratic("adamw", F32, steps, **hypers)
    ours, _ = adamw_on_a_quadratic("adamw", BF16, steps, kahan_sum=True, **hypers)

    start, target = quadratic()
    p = torch.nn.Parameter(torch.tensor(start, dtype=torch.bfloat16))
    target = torch.tensor(target, dtype=torch.float32)
    opt = optimi.AdamW([p], lr=1e-4, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0, kahan_sum=True)
    for _ in range(steps):
        p.grad = (p.detach().float() - target).to(torch.bfloat16)
        opt.step()
    theirs = p.detach().float().numpy().astype(np.float64)

    moved = np.linalg.norm(full - start)
    ours_off, theirs_off = (np.linalg.norm(x - full) / moved for x in (ours, theirs))
    assert max(ours_off, theirs_off) < 0.1, (ours_off, theirs_off)  # bf16 rounding: about 0.07
    assert np.linalg.norm(ours - theirs) / moved < 0.07
    assert np.mean(ours == theirs) > 0.9
