"""Muon's Gram product x @ x^T on this CPU: XLA's dot (float32, bfloat16; XLA flags) against torch's
and MKL's bfloat16 GEMM (AMX where the CPU has it) and optgen's custom call (oneDNN or MKL).

    flock /tmp/optgen-bench.lock python tools/bench_gemm.py
    flock /tmp/optgen-bench.lock python tools/bench_gemm.py --muon-products

Newton-Schulz is three products per step, and on the transformer workload of tools/bench.py
they are the whole cost of a Muon step. Each XLA row runs in its own process (XLA reads
``XLA_FLAGS`` once, when its CPU backend starts). torch's rows need torch; the MKL row needs
the ``mkl`` wheel (``pip install mkl``: ``libmkl_rt.so.3`` beside the interpreter), called
through ctypes as ``cblas_gemm_bf16bf16f32``. Prints median milliseconds per product and the
ratio to torch's bfloat16 product. The row of optgen's own custom call (``codegen/gemm_kernel.py``)
times the GEMM library it runs on (oneDNN where installed, else MKL) called by XLA, as a Muon step
with ``bf16_newton_schulz`` runs it. ``--muon-products`` times each product of a Newton-Schulz
iteration through the custom call on each installed library against torch's.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# a 512 x 2048 MLP kernel; the 16000 x 512 embedding, transposed
SHAPES = [
    (512, 2048),
    (512, 16000),
]
FLAGS = [
    "",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_experimental_onednn_fusion_type=dot",
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    "--xla_cpu_experimental_ynn_fusion_type=dot",
]


def median_ms(fn, repeats=10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def matrix(shape) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def xla_rows() -> dict:
    """This process's XLA dot: float32, and bfloat16 inputs accumulated in float32 (as torch's)."""
    import jax
    import jax.numpy as jnp

    f32 = jax.jit(lambda x: x @ x.T)
    bf16 = jax.jit(lambda x: jnp.matmul(x, x.T, preferred_element_type=jnp.float32))
    out = {}
    for shape in SHAPES:
        x = jnp.asarray(matrix(shape))
        xb = x.astype(jnp.bfloat16)
        out[str(shape)] = {
            "f32": median_ms(lambda x=x: f32(x).block_until_ready()),
            "bf16": median_ms(lambda xb=xb: bf16(xb).block_until_ready()),
        }
    return out


def ffi_rows() -> dict | None:
    """The bfloat16 GEMM inside XLA: optgen's custom call (codegen/gemm_kernel.py), as a
    Muon step with bf16_newton_schulz runs it."""
    import jax
    import jax.numpy as jnp
    from optgen.codegen import gemm_kernel

    if gemm_kernel.library() is None:
        return None
    out = {"library": gemm_kernel.library()}
    for m, k in SHAPES:
        name = gemm_kernel.target(gemm_kernel.Gemm(m, m, k, False, True))
        gram = jax.jit(jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((m, m), jnp.float32)))
        x = jnp.asarray(matrix((m, k))).astype(jnp.bfloat16)
        out[str((m, k))] = {
            "bf16": median_ms(lambda gram=gram, x=x: gram(x, x).block_until_ready())
        }
    return out


def torch_rows() -> dict:
    import torch

    out = {}
    for shape in SHAPES:
        x = torch.from_numpy(matrix(shape))
        xb = x.bfloat16()
        out[str(shape)] = {
            "f32": median_ms(lambda x=x: x @ x.T),
            "bf16": median_ms(lambda xb=xb: xb @ xb.T),
        }
    return out


def mkl_rows() -> dict | None:
    library = Path(sys.prefix) / "lib" / "libmkl_rt.so.3"
    if not library.exists():
        return None
    import ml_dtypes

    gemm = ctypes.CDLL(str(library)).cblas_gemm_bf16bf16f32
    ints, pointer, single = [ctypes.c_int] * 6, ctypes.c_void_p, ctypes.c_float
    gemm.argtypes = [
        *ints,
        single,
        pointer,
        ctypes.c_int,
        pointer,
        ctypes.c_int,
        single,
        pointer,
        ctypes.c_int,
    ]
    row_major, no_trans, trans = 101, 111, 112
    out = {}
    for shape in SHAPES:
        m, k = shape
        x = np.ascontiguousarray(matrix(shape).astype(ml_dtypes.bfloat16))
        c = np.zeros((m, m), np.float32)
        out[str(shape)] = {
            "bf16": median_ms(
                lambda m=m, k=k, x=x, c=c: gemm(
                    row_major,
                    no_trans,
                    trans,
                    m,
                    m,
                    k,
                    1.0,
                    x.ctypes.data,
                    k,
                    x.ctypes.data,
                    k,
                    0.0,
                    c.ctypes.data,
                    m,
                )
            )
        }
    return out


# The transformer workload's matrices (tools/bench.py) and how many of each shape it has.
MUON_MATRICES = [
    ((16000, 512), 1),
    ((512, 1536), 6),
    ((512, 512), 6),
    ((512, 2048), 6),
    ((2048, 512), 6),
]


def muon_products() -> None:
    """``--muon-products``: each product of one Newton-Schulz iteration as optgen's custom call
    runs it (muon's bf16_newton_schulz, a tall matrix transposed first) against torch's bfloat16
    product in torch.optim.Muon's orientation; and the sums over a step's 5 iterations."""
    import jax
    import jax.numpy as jnp
    import torch
    from optgen.codegen import gemm_kernel, gemm_onednn

    libraries = [
        name
        for name, loaded in (("onednn", gemm_onednn.onednn), ("mkl", gemm_kernel.mkl))
        if loaded() is not None
    ]

    def ours(m, n, k, trans_b, library):
        gemm = gemm_kernel.Gemm(m, n, k, False, trans_b)
        name = gemm_kernel.target(gemm, library)
        product = jax.jit(jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((m, n), jnp.float32)))
        a = jnp.asarray(matrix((m, k))).astype(jnp.bfloat16)
        b = jnp.asarray(matrix((n, k) if trans_b else (k, n))).astype(jnp.bfloat16)
        return median_ms(lambda: product(a, b).block_until_ready())

    def theirs(m, n, k):
        a, b = torch.from_numpy(matrix((m, k))).bfloat16(), torch.from_numpy(matrix((k, n)))
        b = b.bfloat16()
        return median_ms(lambda: a @ b)

    who = " / ".join([*libraries, "torch"])
    print(f"| matrix (count) | Gram, {who} | a @ a | update product |\n|---|---|---|---|")
    totals = [0.0] * (len(libraries) + 1)
    for shape, count in MUON_MATRICES:
        s, n = min(shape), max(shape)  # all run on the wide orientation
        products = [(s, s, n, True), (s, s, s, False), (s, n, s, False)]
        rows = [[*(ours(*p, library) for library in libraries), theirs(*p[:3])] for p in products]
        for i in range(len(totals)):
            totals[i] += 5 * count * sum(row[i] for row in rows)
        cells = " | ".join(" / ".join(f"{ms:.2f}" for ms in row) for row in rows)
        print(f"| {shape[0]} x {shape[1]} ({count}) | {cells} |")
    sums = ", ".join(
        f"{name} {ms:.0f} ms" for name, ms in zip([*libraries, "torch"], totals, strict=True)
    )
    print(f"\nproducts of one step: {sums}")


def main() -> int:
    if sys.argv[1:] == ["--muon-products"]:
        muon_products()
        return 0
    if sys.argv[1:] == ["--xla-child"]:
        print(json.dumps(xla_rows()))
        return 0
    if sys.argv[1:] == ["--ffi-child"]:
        print(json.dumps(ffi_rows()))
        return 0
    rows = {}
    for flags in FLAGS:
        env = dict(os.environ, XLA_FLAGS=flags)
        child = subprocess.run(
            [sys.executable, __file__, "--xla-child"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        rows[f"XLA {flags or '(default flags)'}"] = json.loads(
            child.stdout.strip().splitlines()[-1]
        )
    env = dict(os.environ, OPTGEN_XLA_FLAGS="0")  # XLA's default flags under optgen too
    child = subprocess.run(
        [sys.executable, __file__, "--ffi-child"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    ffi = json.loads(child.stdout.strip().splitlines()[-1])
    if ffi is not None:
        rows[f"optgen's GEMM in XLA (custom call, {ffi.pop('library')})"] = ffi
    try:
        rows["torch"] = torch_rows()
    except ImportError:
        pass
    mkl = mkl_rows()
    if mkl is not None:
        rows["MKL cblas_gemm_bf16bf16f32"] = mkl
    reference = rows.get("torch")
    print("| product | " + " | ".join(f"{m}x{k} @ its transpose, ms" for m, k in SHAPES) + " |")
    print("|---|" + "---:|" * len(SHAPES))
    for name, by_shape in rows.items():
        for dtype in ("f32", "bf16"):
            if dtype not in by_shape[str(SHAPES[0])]:
                continue
            cells = []
            for shape in SHAPES:
                ms = by_shape[str(shape)][dtype]
                ratio = f" ({ms / reference[str(shape)]['bf16']:.1f}x)" if reference else ""
                cells.append(f"{ms:.1f}{ratio}")
            print(f"| {name}, {dtype} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
