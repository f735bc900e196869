"""What the q8 code costs in optgen's own CPU loop: adamw8bit with three encoders, beside
float32 ``adamw``, 16M elements, interleaved in one process (hold the bench lock).

    flock /tmp/optgen-bench.lock python tools/q8_code_costs.py

The encoders: the power-4 code (``llvm_backend.quantize_element``: two square roots), a
power-2 code (one square root) and a linear code (none). Only the encoder is swapped, so
the decoded values are wrong for the other two: this measures speed, nothing else.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from llvmlite import ir
from optgen.codegen import cpu_kernel
from optgen.codegen import llvm_backend as lb

import optgen

ROOT = Path(__file__).resolve().parents[1]
ELEMENTS = 16 * 1024 * 1024


def encoder(root):
    """An encoder like ``quantize_element`` whose root of |x| / scale is ``root``."""

    def encode(b, x, reciprocal):
        one = ir.Constant(lb.F32, 1.0)
        y = b.fmul(lb._intrinsic(b, "llvm.fabs", [x]), reciprocal)
        y = b.select(b.fcmp_ordered("<=", y, one), y, one)
        scaled = b.fmul(ir.Constant(lb.F32, 127.0), root(b, y))
        magnitude = lb._intrinsic(b, "llvm.roundeven", [scaled])
        return b.fptosi(lb._intrinsic(b, "llvm.copysign", [magnitude, x]), ir.IntType(8))

    return encode


ENCODERS = {
    "power-4": lb.quantize_element,
    "power-2": encoder(lambda b, y: lb._intrinsic(b, "llvm.sqrt", [y])),
    "linear": encoder(lambda b, y: y),
}


def main() -> None:
    rng = np.random.default_rng(0)
    grads = {"w": jnp.asarray(rng.standard_normal(ELEMENTS, dtype=np.float32))}
    runs = {}

    def add(name, spec):
        opt = optgen.load(spec, lowering="ffi")
        params = {"w": jnp.asarray(rng.standard_normal(ELEMENTS, dtype=np.float32))}
        state = opt.init(params)
        runs[name] = [opt, *opt.step(params, grads, state)]

    add("adamw (f32 state)", "adamw")
    text = (ROOT / "kernels" / "adamw8bit.spec").read_text()
    folder = Path(tempfile.mkdtemp())
    for k, (name, encode) in enumerate(ENCODERS.items()):
        cpu_kernel.quantize_element = encode  # a distinct spec text: a kernel of its own
        path = folder / f"code{k}.spec"
        path.write_text(text.replace("hyper eps = 1e-8", f"hyper eps = 1e-8\nhyper unused{k} = 0"))
        add(f"adamw8bit, {name} encoder", str(path))
    times = {name: [] for name in runs}
    for _ in range(9):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(3):
                run[1], run[2] = run[0].step(run[1], grads, run[2])
            jax.block_until_ready(run[1])
            times[name].append((time.perf_counter() - start) / 3)
    base = np.asarray(times["adamw (f32 state)"])
    for name, ts in times.items():
        ratio = np.median(np.asarray(ts) / base)
        print(f"{name}: {np.median(ts) * 1e3:.2f} ms, {ratio:.2f}x adamw (paired median)")


if __name__ == "__main__":
    main()
