"""bf16(x) and the bfloat16 GEMM (codegen/gemm_kernel.py): oneDNN's and MKL's products against a
float64 NumPy product of the same rounded matrices and against XLA's dot, in every orientation;
where it is used (CPU, ``auto``) and where the step stays portable StableHLO. The GEMM tests skip
without a GEMM library (``pip install -e '.[gemm]'``), each library's own without it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from optgen.codegen import gemm_kernel, gemm_onednn, llvm_backend

import optgen
from optgen.ops import round_to_bfloat16

needs_gemm = pytest.mark.skipif(
    gemm_kernel.mkl() is None and gemm_onednn.onednn() is None,
    reason="no GEMM library is installed (pip install -e '.[gemm]')",
)


@pytest.fixture(autouse=True)
def gemm_on_any_cpu(monkeypatch):
    """Where the CPU lacks bfloat16 instructions products stay XLA's dot (MKL emulates its
    bfloat16 GEMM there, slowly); these tests still check MKL's path, whose numbers are the same."""
    if gemm_kernel.library() is None and gemm_kernel.mkl() is not None:
        # steps compiled before or after with XLA's dot share the jit caches' keys: drop them
        jax.clear_caches()
        monkeypatch.setattr(gemm_kernel, "library", lambda: "mkl")
        yield
        jax.clear_caches()
    else:
        yield


def test_without_bfloat16_instructions_products_stay_xla_dots(spec, monkeypatch):
    """On a CPU with AVX2 alone, Muon's step took 1.45x as long on MKL's emulated bfloat16 GEMM as
    on XLA's dot: there no product becomes a GEMM call, whatever is installed."""
    monkeypatch.undo()  # this test's own view of the CPU, without the fixture's
    monkeypatch.setattr(llvm_backend, "native_bfloat16", lambda: False)
    assert gemm_kernel.library() is None
    text = _lowered_text(spec, "auto")
    assert "optgen_gemm" not in text and "dot_general" in text


LIBRARIES = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(loaded() is None, reason=f"{name} is not installed"),
    )
    for name, loaded in (("onednn", gemm_onednn.onednn), ("mkl", gemm_kernel.mkl))
]
# Every way a product meets its operands: as rounded, transposed on the left, on the right, both;
# and the product of a rounded product (a Gram matrix) with a rounded matrix.
PRODUCTS = """optimizer bf16_products "bfloat16 products in each orientation"
hyper lr = 0.25
update:
  x = bf16(g)
  y = bf16(p)
  a = bf16(x @ transpose(y))
  b = bf16(transpose(x) @ y)
  p = p - lr * (a @ y + y @ b + transpose(a) @ x + x @ transpose(b) + transpose(transpose(x)) @ b)
"""
SHAPES = [(5, 3), (3, 5), (1, 4), (40, 24)]
STEPS = 4


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemm") / "bf16_products.spec"
    path.write_text(PRODUCTS)
    return str(path)


def _tree(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {f"w{i}": jnp.asarray(rng.normal(size=s), jnp.float32) for i, s in enumerate(shapes)}


def _reference_step(p, g, lr=0.25):
    """The spec's step in float64 NumPy, each bf16(...) rounded as ml_dtypes rounds."""

    def r(v):
        return round_to_bfloat16(v.astype(np.float32)).astype(np.float64)

    x, y = r(g), r(p)
    a, b = r(x @ y.T), r(x.T @ y)
    return p - lr * (a @ y + y @ b + a.T @ x + x @ b.T + x @ b)


def _run(spec, lowering, shapes=SHAPES):
    opt = optgen.load(spec, lowering=lowering)
    params, grads = _tree(0, shapes), _tree(1, shapes)
    state = opt.init(params)
    for _ in range(STEPS):
        params, state = opt.step(params, grads, state)
    return params


def _lowered_text(spec, lowering, shapes=SHAPES, platforms=None):
    opt = optgen.load(spec, lowering=lowering)
    params = _tree(0, shapes)
    step = jax.jit(lambda p, g, s: opt.update(g, s, p))
    return (
        step.trace(params, params, opt.init(params)).lower(lowering_platforms=platforms).as_text()
    )


@pytest.mark.parametrize("lowering", ["auto", "shared"])
def test_bf16_products_match_float64_numpy(spec, lowering):
    """MKL's GEMM (auto) and XLA's dot (shared) against float64 products of the rounded
    matrices, over several steps: only the order of float32 sums differs."""
    got = _run(spec, lowering)
    params, grads = _tree(0), _tree(1)
    for name in params:
        p, g = np.asarray(params[name], np.float64), np.asarray(grads[name], np.float64)
        for _ in range(STEPS):
            p = _reference_step(p, g).astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(np.asarray(got[name]), p, rtol=2e-5, atol=1e-5, err_msg=name)


@needs_gemm
def test_the_gemm_runs_where_it_can_and_nowhere_else(spec):
    """On CPU under auto, each 2-d product of rounded matrices is a custom call (5 per step and
    parameter, the other 2 of each step's 7 products being a rounded Gram matrix's own, whose
    rounding oneDNN does: the compiled step keeps no float32 Gram product); shared, another
    platform and a batched product keep dot_general."""
    texts = {
        "auto": _lowered_text(spec, "auto"),
        "shared": _lowered_text(spec, "shared"),
        "cuda": _lowered_text(spec, "auto", platforms=("cuda",)),
        "batched": _lowered_text(spec, "auto", shapes=[(2, 3, 4)]),
    }
    assert "dot_general" not in texts["auto"]
    opt = optgen.load(spec)
    params = _tree(0)
    step = jax.jit(lambda p, g, s: opt.update(g, s, p))
    compiled = step.trace(params, params, opt.init(params)).lower().compile().as_text()
    calls = [line for line in compiled.splitlines() if "custom_call_target=" in line]
    assert len(calls) == 7 * len(SHAPES)
    rounded = 2 if gemm_kernel.library() == "onednn" else 0
    assert sum("_round_" in line for line in calls) == rounded * len(SHAPES)
    for name in ("shared", "cuda", "batched"):
        assert "optgen_gemm" not in texts[name] and "dot_general" in texts[name], name


@needs_gemm
def test_an_exported_step_stays_portable(spec):
    """jax.export under auto: the products stay dot_general (the GEMM lives in this process)."""
    opt = optgen.load(spec)
    params = _tree(0, [(5, 3)])
    step = jax.jit(lambda p, g, s: opt.update(g, s, p))
    text = jax.export.export(step)(params, params, opt.init(params)).mlir_module()
    assert "optgen_gemm" not in text and text.count("stablehlo.dot_general") == 7


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize(
    ("trans_a", "trans_b"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_the_gemm_kernel_alone_matches_numpy_on_a_larger_product(library, trans_a, trans_b):
    """One custom call, 96 x 80 from 300 terms: each library's float32 sums against float64."""
    m, n, k = 96, 80, 300
    rng = np.random.default_rng(2)
    a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(ml_dtypes.bfloat16)
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(ml_dtypes.bfloat16)
    name = gemm_kernel.target(gemm_kernel.Gemm(m, n, k, trans_a, trans_b), library)
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((m, n), jnp.float32))
    got = np.asarray(jax.jit(call)(jnp.asarray(a), jnp.asarray(b)))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    want = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("instruction", [True, False], ids=["instruction", "bits"])
def test_bf16_in_the_cpu_loop_rounds_as_ml_dtypes(tmp_path, monkeypatch, instruction):
    """The LLVM loop's bf16 (an elementwise op, no product) on float32 values near ties, with the
    CPU's conversion instruction and with the integer rounding used where there is none (before
    it, a CPU with AVX2 alone crashed here: LLVM called a ``__truncsfbf2`` nothing defined)."""
    if instruction and not llvm_backend.native_bfloat16():
        pytest.skip("this CPU has no float32 -> bfloat16 instruction")
    monkeypatch.setattr(llvm_backend, "native_bfloat16", lambda: instruction)
    path = tmp_path / "round.spec"  # a kernel name of its own for each variant
    path.write_text(f'optimizer round_{instruction} "p = g, rounded"\nupdate:\n  p = bf16(g)\n')
    rng = np.random.default_rng(3)
    g = rng.normal(size=4096).astype(np.float32)
    tiny = np.finfo(np.float32).tiny
    edges = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.0e38, -3.4e38, np.inf, -np.inf, np.nan]
    edges += [tiny * 0.75, -tiny * (1 + 2**-8), tiny * 2**-20, 0.0, -0.0, 3.3895e38]
    g[: len(edges)] = edges  # ties to even, overflow, infinities, NaN, denormals, signed zeros
    g[len(edges) : 64] = rng.integers(-(2**31), 2**31, 64 - len(edges)).astype(np.float32)
    params, grads = {"w": jnp.zeros(4096, jnp.float32)}, {"w": jnp.asarray(g)}
    want = round_to_bfloat16(g)
    denormal = (g != 0) & (np.abs(g) < tiny)
    for lowering in ("ffi", "shared"):
        opt = optgen.load(str(path), lowering=lowering)
        new, _ = opt.step(jax.tree.map(jnp.copy, params), grads, opt.init(params))
        got = np.asarray(new["w"])
        np.testing.assert_array_equal(got[~denormal], want[~denormal], err_msg=lowering)
        if lowering == "ffi" and not instruction:  # the bits keep denormals, as ml_dtypes
            np.testing.assert_array_equal(got[denormal], want[denormal])
        else:  # vcvtneps2bf16 (and XLA's convert where the CPU has it) reads them as zero
            assert np.all((got[denormal] == want[denormal]) | (got[denormal] == 0)), lowering


def test_muon_in_bfloat16_near_float32_and_its_gemm_near_xla():
    """optax's muon with bf16_newton_schulz, 20 steps on matrices of both orientations and a
    vector: MKL's GEMM (auto) against XLA's dot (shared) measured 2.4e-5 at most (one rounding
    flipped by the order of a sum); against float32 Newton-Schulz 2.4e-4 to 1.3e-3."""
    from conftest import rel_err

    shapes = [(5, 3), (3, 5), (24, 40), (7,)]
    runs = {}
    for name, options in {
        "auto": {"bf16_newton_schulz": True},
        "shared": {"bf16_newton_schulz": True, "lowering": "shared"},
        "f32": {},
    }.items():
        opt = optgen.load("muon", learning_rate=0.02, **options)
        params = _tree(0, shapes)
        state = opt.init(params)
        for k in range(20):
            params, state = opt.step(params, _tree(k + 1, shapes), state)
        runs[name] = params
    for name in runs["f32"]:
        assert rel_err(runs["auto"][name], runs["shared"][name]) <= 2e-4, name
        matrix = name != "w3"  # the vector takes AdamW, the same in every run
        assert (2e-5 < rel_err(runs["auto"][name], runs["f32"][name]) < 5e-3) == matrix, name


@pytest.mark.parametrize("library", LIBRARIES)
def test_a_fresh_process_can_call_the_gemm_before_asking_for_its_library(library):
    """target() loads the library itself: LLVM must know where the functions the handler calls
    are before it links it (an unresolved call crashed the process)."""
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp; from optgen.codegen import gemm_kernel as g\n"
        f"name = g.target(g.Gemm(2, 2, 3, False, True), {library!r})\n"
        "x = jnp.ones((2, 3), jnp.bfloat16)\n"
        "print(jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((2, 2), jnp.float32))(x, x).sum())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "12.0", out.stderr[-2000:]


def test_a_failing_handler_raises_its_message():
    """ffi_runtime.error_if, what the oneDNN handler returns when a oneDNN call fails: XLA raises
    the message in the caller instead of handing back an unwritten result."""
    from llvmlite import ir
    from optgen.codegen import ffi_runtime as rt

    def build():
        module = rt.new_module("optgen_test_failing_handler")
        fn, b = rt.handler(module)
        failed = ir.Constant(ir.IntType(1), 1)
        b.ret(rt.error_if(b, fn.args[0], failed, "the library said no"))
        return module

    name = rt.register("optgen_test_failing_handler", build)
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((2,), jnp.float32))
    with pytest.raises(Exception, match="the library said no"):
        jax.block_until_ready(jax.jit(call)(jnp.ones(2)))


def test_a_onednn_that_cannot_load_leaves_the_products_to_the_others(tmp_path, monkeypatch):
    """A libdnnl.so.3 that does not load (here an empty file; the SYCL build of the ``onednn``
    wheel fails the same way, without a CPU engine) is said in a warning, and the GEMM falls
    back to MKL or XLA's dot instead of failing the step."""
    monkeypatch.undo()  # gemm_on_any_cpu's library, which would make the last check trivial
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libdnnl.so.3").write_bytes(b"")
    monkeypatch.setenv("OPTGEN_ONEDNN", "1")
    monkeypatch.setattr("sys.prefix", str(tmp_path))
    monkeypatch.setattr("sys.base_prefix", str(tmp_path))
    gemm_onednn.onednn.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="cannot run on this CPU"):
            assert gemm_onednn.onednn() is None
        assert gemm_kernel.library() in ("mkl", None)
    finally:
        gemm_onednn.onednn.cache_clear()


def _bf16_ulp(x):
    """The spacing of bfloat16 numbers at |x| (8 significant bits; the smallest normal's below)."""
    exponent = np.floor(np.log2(np.maximum(np.abs(x), np.finfo(np.float32).tiny)))
    return 2.0 ** (exponent - 7)


needs_onednn = pytest.mark.skipif(
    gemm_onednn.onednn() is None,
    reason="needs OPTGEN_ONEDNN=1, the gemm extra and oneDNN bf16 matmul (avx512_bf16)",
)


def _folded_call(gemm, a, b, c0, alpha, beta):
    name = gemm_kernel.target(gemm, "onednn")
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((gemm.m, gemm.n), jnp.bfloat16))
    scalars = np.float32(alpha), np.float32(beta)
    return jax.block_until_ready(jax.jit(call)(a, b, c0, *scalars))


@needs_onednn
@pytest.mark.parametrize(
    ("trans_a", "trans_b"), [(False, False), (True, False), (False, True), (True, True)]
)
@pytest.mark.parametrize(("alpha", "beta"), [(2.0315, -4.775), (1.0, 3.4445), (-0.5, 0.0)])
def test_the_folded_call_is_the_float64_value_rounded_once_within_one_ulp(
    trans_a, trans_b, alpha, beta
):
    """bf16(alpha * op(A) op(B) + beta * C0) in one oneDNN call (96 x 80 from 300 terms, C0 of
    the product's size) against the float64 value of the same bfloat16 inputs rounded once to
    bfloat16: at most one bfloat16 ulp apart, element by element (float32's sums and the
    factored beta * (C0 + alpha / beta * P) move the value a few float32 ulps before it rounds),
    or, where the terms cancel to far below their size (one element of 7680 here: 3.1e-6 from
    terms of ~17), float32's error bound for a sum of k + 3 terms; beta = 0 takes the call's
    product-only branch."""
    m, n, k = 96, 80, 300
    rng = np.random.default_rng(3)
    a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(ml_dtypes.bfloat16)
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(ml_dtypes.bfloat16)
    c0 = (17 * rng.normal(size=(m, n))).astype(ml_dtypes.bfloat16)
    gemm = gemm_kernel.Gemm(m, n, k, trans_a, trans_b, folded=True)
    got = np.asarray(_folded_call(gemm, a, b, c0, alpha, beta)).astype(np.float64)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    product = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    exact = np.float32(alpha) * product + np.float32(beta) * c0.astype(np.float64)
    once = exact.astype(ml_dtypes.bfloat16).astype(np.float64)
    magnitude = abs(alpha) * (np.abs(a64.T if trans_a else a64) @ np.abs(b64.T if trans_b else b64))
    float32_bound = (k + 3) * 2.0**-24 * (magnitude + abs(beta) * np.abs(c0.astype(np.float64)))
    ulp = np.maximum(_bf16_ulp(once), _bf16_ulp(got))
    assert np.all(np.abs(got - once) <= np.maximum(ulp, float32_bound))
    assert np.mean(got == once) > 0.99  # mostly the same number


@needs_onednn
def test_a_folded_call_whose_scale_ratio_overflows_raises():
    """|alpha / beta| beyond float32 cannot be factored out: an error, never a wrong number."""
    x = np.ones((4, 4), ml_dtypes.bfloat16)
    gemm = gemm_kernel.Gemm(4, 4, 4, False, False, folded=True)
    with pytest.raises(Exception, match="beyond float32"):
        _folded_call(gemm, x, x, x, 1e30, 1e-30)


FOLDS = """optimizer bf16_folds "products folded with the combinations around them"
hyper s1 = 0.75
hyper s2 = -1.5
update:
  x = bf16(g)
  a = bf16(x @ transpose(x))
  b = bf16(s1 * a + s2 * (a @ a))
  c = bf16(s1 * x + b @ x)
  d = bf16((a @ c) * s2 + c)
  p = p - 0.25 * d
"""
FOLD_SHAPES = [(5, 3), (3, 5), (24, 40)]


def _folds_reference(p, g, s1=0.75, s2=-1.5):
    def r(v):
        return v.astype(ml_dtypes.bfloat16).astype(np.float64)

    x = r(g)
    a = r(x @ x.T)
    b = r(s1 * a + s2 * (a @ a))
    c = r(s1 * x + b @ x)
    d = r(s2 * (a @ c) + c)
    return p - 0.25 * d, d


@needs_onednn
def test_bf16_combinations_of_products_fold_into_the_call(tmp_path):
    """Each bf16(s1 * c0 + s2 * (u @ v)) of the spec (both scales, the product's scale absent,
    the scalars on the right, c0 unscaled) is one folded call in the compiled step, its
    product no call of its own; its values stay within a bfloat16 rounding of the float64
    reference (a rounding may flip: d is within one of its ulps); ``shared`` folds nothing."""
    path = tmp_path / "bf16_folds.spec"
    path.write_text(FOLDS)
    opt = optgen.load(str(path))
    params, grads = _tree(0, FOLD_SHAPES), _tree(1, FOLD_SHAPES)
    step = jax.jit(lambda p, g, s: opt.update(g, s, p))
    compiled = step.trace(grads, params, opt.init(params)).lower().compile().as_text()
    targets = [line for line in compiled.splitlines() if "custom_call_target=" in line]
    assert sum("_fold_onednn" in t for t in targets) == 3 * len(FOLD_SHAPES)
    assert len(targets) == 4 * len(FOLD_SHAPES)  # and the Gram matrix's product
    assert "_fold" not in _lowered_text(str(path), "shared", FOLD_SHAPES)
    before = {name: np.asarray(x, np.float64) for name, x in params.items()}
    got, _ = opt.step(params, grads, opt.init(params))  # donates params
    for name, p in before.items():
        want, d = _folds_reference(p, np.asarray(grads[name], np.float64))
        err = np.abs(np.asarray(got[name], np.float64) - want)
        assert np.all(err <= 0.25 * _bf16_ulp(d) + 1e-6 * np.abs(want)), name


@needs_onednn
def test_muon_bf16_newton_schulz_folds_both_combinations_of_each_iteration():
    """muon's bf16 Newton-Schulz: per iteration and matrix, the Gram product and two folded
    calls (bf16(ns_b * a + ns_c * (a @ a)) and bf16(ns_a * x + b @ x)), in both orientations."""
    opt = optgen.load("muon", bf16_newton_schulz=True)
    shapes = [(24, 40), (40, 24), (7,)]
    params = _tree(0, shapes)
    step = jax.jit(lambda p, g, s: opt.update(g, s, p))
    compiled = step.trace(params, params, opt.init(params)).lower().compile().as_text()
    targets = [line for line in compiled.splitlines() if "custom_call_target=" in line]
    assert sum("_fold_onednn" in t for t in targets) == 2 * 5 * 2
    assert len(targets) == 3 * 5 * 2


@needs_onednn
def test_products_that_overlap_do_not_clobber_each_other():
    """XLA runs independent custom calls at once, and oneDNN's default build shares one scratchpad
    between primitives: before the products took turns, three unsynchronized Muon steps over these
    matrices returned whole matrices of NaN in about half the runs (4 of 6 here)."""
    shapes = [(768, 3072), (3072, 768), (768, 768), (512, 512), (64, 64), (256,)]
    rng = np.random.default_rng(0)
    params = {f"w{i}": jnp.asarray(rng.normal(size=s), jnp.float32) for i, s in enumerate(shapes)}
    grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    opt = optgen.load("muon", bf16_newton_schulz=True)
    results = []
    for synchronized in (True, False, False, False):
        p, s = jax.tree.map(jnp.copy, params), opt.init(params)
        for _ in range(3):
            p, s = opt.step(p, grads, s)
            if synchronized:
                jax.block_until_ready(p)
        results.append({k: np.asarray(v) for k, v in p.items()})
    for result in results:
        assert all(np.isfinite(v).all() for v in result.values())
        for k, v in result.items():
            np.testing.assert_array_equal(v, results[0][k], err_msg=k)


GRAMS = """optimizer bf16_grams "rounded Gram matrices, each orientation, read through p = I"
update:
  x = bf16(g)
  e = bf16(p)
  p = bf16(x @ transpose(x)) @ e + 2 * (e @ bf16(transpose(x) @ x))
"""


def _ties(v):
    """How many integers of ``v`` lie exactly halfway between two bfloat16 numbers."""
    v = np.abs(v[np.abs(v) >= 256]).astype(np.int64)
    spacing = 2 ** (np.floor(np.log2(v)).astype(np.int64) - 7)
    return int(np.sum(v % spacing == spacing // 2))


@needs_onednn
def test_a_rounded_product_is_stored_in_bfloat16_with_the_bits_of_xla_rounding_it(tmp_path):
    """bf16(x @ transpose(x)) under auto is one oneDNN call that stores bfloat16 (no float32
    product, no XLA rounding loop), bit for bit XLA's (shared) dot rounded by its convert: the
    integer inputs make every float32 sum exact whatever its order (and p = I passes the rounded
    Gram matrices through unchanged), and their entries (up to 40 * 15^2 = 9000) need up to 14
    bits, so the rounding to bfloat16's 8 decides the bits, many of them ties (to even)."""
    path = tmp_path / "bf16_grams.spec"
    path.write_text(GRAMS)
    rng = np.random.default_rng(4)
    x = rng.integers(-15, 16, size=(40, 40)).astype(np.float64)
    grams = [np.asarray(a, ml_dtypes.bfloat16).astype(np.float64) for a in (x @ x.T, x.T @ x)]
    assert min(_ties(a) for a in (x @ x.T, x.T @ x)) > 100
    grads = {"w": jnp.asarray(x, jnp.float32)}
    got = {}
    for lowering in ("auto", "shared"):
        opt = optgen.load(str(path), lowering=lowering)
        params = {"w": jnp.eye(40, dtype=jnp.float32)}
        step = jax.jit(lambda p, g, s, opt=opt: opt.update(g, s, p))
        compiled = step.trace(params, grads, opt.init(params)).lower().compile().as_text()
        calls = [line for line in compiled.splitlines() if "custom_call_target=" in line]
        assert sum("_round_onednn" in line for line in calls) == (2 if lowering == "auto" else 0)
        got[lowering] = np.asarray(opt.step(params, grads, opt.init(params))[0]["w"])
    np.testing.assert_array_equal(got["auto"], got["shared"])
    np.testing.assert_array_equal(got["auto"], (grams[0] + 2 * grams[1]).astype(np.float32))
