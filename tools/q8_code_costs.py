"""Where the time of optgen's 8-bit AdamW goes (hold the bench lock):

    flock /tmp/optgen-bench.lock python tools/q8_code_costs.py            # the whole step
    flock /tmp/optgen-bench.lock python tools/q8_code_costs.py --alone    # encoders alone
    flock /tmp/optgen-bench.lock python tools/q8_code_costs.py --against 1bcac0a

The whole step: ``adamw8bit`` on one 16M-element float32 parameter in optgen's own CPU loop,
with parts of the loop swapped out, interleaved in one process with float32 ``adamw`` and
torch's fused float32 AdamW (paired medians). The swaps: the loop's lanes (16, what ships, or
8); the encoder (power-4, what ``q8`` is: two square roots; power-2: one; linear: none; none:
the code is the value's low byte); the decoder (three products, or one). Only speed is
measured: a swapped encoder or decoder stores other codes. ``--against REV`` adds the step
with ``codegen/cpu_loop.py`` as it was at git revision REV (its loop before a change).

``--alone``: each encoder over one L1-resident block, 16 lanes, nanoseconds per element:
power-4 as shipped; an exact one without square roots (an estimate of the fourth root by an
exponent-bit guess and two Newton steps, then one comparison with the code's threshold,
``quantize.thresholds``, loaded by the code's index: a gather); the estimate alone, rounded
(not exact); linear. Each is checked for the shipped codes on every threshold and its
neighbours.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from llvmlite import ir
from optgen.codegen import cpu_loop, quantize
from optgen.codegen import ffi_runtime as rt
from optgen.codegen import llvm_backend as lb

import optgen

ROOT = Path(__file__).resolve().parents[1]
ELEMENTS = 16 * 1024 * 1024
F32, I8, I32, I64 = lb.F32, ir.IntType(8), ir.IntType(32), ir.IntType(64)


def _c(value, ty=F32):
    return ir.Constant(ty, value)


def _call(b, name, args):
    return lb._intrinsic(b, name, args)


def _clamped(b, x, reciprocal):
    y = b.fmul(_call(b, "llvm.fabs", [x]), reciprocal)
    return b.select(b.fcmp_ordered("<=", y, _c(1.0)), y, _c(1.0))


def _signed(b, magnitude, x):
    return b.fptosi(_call(b, "llvm.copysign", [magnitude, x]), I8)


def root_encoder(root):
    """An encoder like ``quantize_element`` whose root of |x| / scale is ``root``."""

    def encode(b, x, reciprocal):
        scaled = b.fmul(_c(127.0), root(b, _clamped(b, x, reciprocal)))
        return _signed(b, _call(b, "llvm.roundeven", [scaled]), x)

    return encode


def no_encoder(b, x, reciprocal):
    return b.trunc(b.bitcast(x, I32), I8)


def one_product_decoder(b, code, scale):
    return b.fmul(b.sitofp(code, F32), scale)


def estimate(b, y):
    """127 * y^(1/4) within 0.007 (y in [0, 1]): y^(-1/4) guessed from y's bits, two Newton
    steps z <- z (5 - y z^4) / 4, then 127 y z^3."""
    y = _call(b, "llvm.maxnum", [y, _c(2.0**-40)])  # below every threshold; keeps y z^4 finite
    z = b.bitcast(b.sub(_c(0x4F580000, I32), b.lshr(b.bitcast(y, I32), _c(2, I32))), F32)
    for _ in range(2):
        square = b.fmul(z, z)
        z = b.fmul(
            z, _call(b, "llvm.fma", [b.fmul(y, b.fmul(square, square)), _c(-0.25), _c(1.25)])
        )
    return b.fmul(b.fmul(y, z), b.fmul(b.fmul(z, z), _c(127.0)))


def exact_without_roots(b, x, reciprocal):
    """The power-4 code from the estimate: k = floor(estimate + 0.48) is the code or one less;
    one more where y reaches the threshold of k + 1."""
    y = _clamped(b, x, reciprocal)
    below = b.fptosi(_call(b, "llvm.floor", [b.fadd(estimate(b, y), _c(0.48))]), I32)
    below = _call(b, "llvm.smin", [below, _c(quantize.LEVELS, I32)])
    kind = ir.ArrayType(F32, quantize.LEVELS + 1)
    table = b.module.globals.get("thresholds")
    if table is None:
        table = ir.GlobalVariable(b.module, kind, "thresholds")
        table.global_constant, table.linkage = True, "internal"
        table.initializer = ir.Constant(kind, [*map(float, quantize.thresholds()), float("inf")])
    threshold = b.load(b.gep(table, [_c(0, I32), below], source_etype=kind), typ=F32)
    code = b.add(below, b.zext(b.fcmp_ordered(">=", y, threshold), I32))
    return _signed(b, b.sitofp(code, F32), x)


def rounded_estimate(b, x, reciprocal):
    return _signed(b, _call(b, "llvm.roundeven", [estimate(b, _clamped(b, x, reciprocal))]), x)


POWER_4 = lb.quantize_element
LINEAR = root_encoder(lambda b, y: y)

# name -> (encoder, decoder, lanes)
STEP_VARIANTS = {
    "adamw8bit (power-4, 16 lanes)": (POWER_4, lb.dequantize_element, 16),
    "power-4, 8 lanes": (POWER_4, lb.dequantize_element, 8),
    "power-2 encoder": (root_encoder(lambda b, y: _call(b, "llvm.sqrt", [y])), None, 16),
    "linear encoder": (LINEAR, None, 16),
    "no encoder": (no_encoder, None, 16),
    "no encoder, one-product decoder": (no_encoder, one_product_decoder, 16),
}

ALONE = {
    "power-4 (shipped)": POWER_4,
    "exact, no roots (estimate + threshold gather)": exact_without_roots,
    "estimate only, rounded (not exact)": rounded_estimate,
    "linear (not this code)": LINEAR,
}


def loop_function_at(revision: str):
    """``loop_function`` of codegen/cpu_loop.py as it was at git ``revision``."""
    text = subprocess.run(
        ["git", "show", f"{revision}:codegen/cpu_loop.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "cpu_loop_then.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("cpu_loop_then", path)
    module = sys.modules["cpu_loop_then"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.loop_function


def whole_step(repeats: int, against: str | None) -> None:
    import torch
    from optgen.codegen import cpu_kernel

    rng = np.random.default_rng(0)
    grads = {"w": jnp.asarray(rng.standard_normal(ELEMENTS, dtype=np.float32))}
    runs = {}

    def add(name, spec):
        opt = optgen.load(spec, lowering="ffi")
        params = {"w": jnp.asarray(rng.standard_normal(ELEMENTS, dtype=np.float32))}
        runs[name] = [opt, *opt.step(params, grads, opt.init(params))]

    add("adamw (f32 state)", "adamw")
    text = (ROOT / "kernels" / "adamw8bit.spec").read_text()
    folder = Path(tempfile.mkdtemp())
    shipped = (cpu_loop.quantize_element, cpu_loop.dequantize_element, cpu_loop.Q8_LANES)
    for k, (name, (encode, decode, lanes)) in enumerate(STEP_VARIANTS.items()):
        cpu_loop.quantize_element, cpu_loop.Q8_LANES = encode, lanes
        cpu_loop.dequantize_element = decode or shipped[1]
        path = folder / f"code{k}.spec"  # a distinct spec text: a kernel of its own
        path.write_text(text.replace("hyper eps = 1e-8", f"hyper eps = 1e-8\nhyper unused{k} = 0"))
        add(name, str(path))
    cpu_loop.quantize_element, cpu_loop.dequantize_element, cpu_loop.Q8_LANES = shipped
    if against:
        now, cpu_kernel.loop_function = cpu_kernel.loop_function, loop_function_at(against)
        path = folder / "then.spec"
        path.write_text(text.replace("hyper eps = 1e-8", "hyper eps = 1e-8\nhyper then = 0"))
        add(f"adamw8bit, the loop at {against}", str(path))
        cpu_kernel.loop_function = now

    weights = torch.from_numpy(rng.standard_normal(ELEMENTS, dtype=np.float32)).requires_grad_()
    weights.grad = torch.from_numpy(np.asarray(grads["w"]).copy())
    fused = torch.optim.AdamW([weights], lr=1e-3, fused=True)
    times = {name: [] for name in [*runs, "torch fused AdamW (f32)"]}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(3):
                run[1], run[2] = run[0].step(run[1], grads, run[2])
            jax.block_until_ready(run[1])
            times[name].append((time.perf_counter() - start) / 3)
        start = time.perf_counter()
        for _ in range(3):
            fused.step()
        times["torch fused AdamW (f32)"].append((time.perf_counter() - start) / 3)
    against = {
        k: np.asarray(times[k])
        for k in ("torch fused AdamW (f32)", "adamw (f32 state)", "adamw8bit (power-4, 16 lanes)")
    }
    print("| variant | ms | vs torch fused f32 | vs optgen adamw f32 | vs adamw8bit |")
    print("|---|---:|---:|---:|---:|")
    for name, ts in times.items():
        ratios = " | ".join(f"{np.median(np.asarray(ts) / b):.3f}" for b in against.values())
        print(f"| {name} | {np.median(ts) * 1e3:.2f} | {ratios} |")


def _encode_function(name: str, encode):
    """``encode(x, codes, n, reciprocal, repeats)``: x's codes, ``repeats`` times over."""
    module = rt.new_module(name)
    kind = ir.FunctionType(ir.VoidType(), [rt.PTR, rt.PTR, I64, F32, I64])
    fn = ir.Function(module, kind, "encode")
    x, codes, n, reciprocal, repeats = fn.args
    entry, outer, body_block, after, done = map(
        fn.append_basic_block, ("entry", "outer", "body", "after", "done")
    )
    ir.IRBuilder(entry).branch(outer)
    b = ir.IRBuilder(outer)
    round_ = b.phi(I64)
    b.branch(body_block)
    body = ir.IRBuilder(body_block)
    i = body.phi(I64)
    value = body.load(body.gep(x, [i], source_etype=F32), typ=F32)
    body.store(encode(body, value, reciprocal), body.gep(codes, [i], source_etype=I8))
    following = body.add(i, _c(1, I64))
    rt.vectorize(module, body.cbranch(body.icmp_signed("<", following, n), body_block, after), 16)
    i.add_incoming(_c(0, I64), outer)
    i.add_incoming(following, body_block)
    b = ir.IRBuilder(after)
    next_round = b.add(round_, _c(1, I64))
    b.cbranch(b.icmp_signed("<", next_round, repeats), outer, done)
    round_.add_incoming(_c(0, I64), entry)
    round_.add_incoming(next_round, after)
    ir.IRBuilder(done).ret_void()
    engine = rt._compile(module)
    kind = ctypes.CFUNCTYPE(
        None, *[ctypes.c_void_p] * 2, ctypes.c_int64, ctypes.c_float, ctypes.c_int64
    )
    return kind(engine.get_function_address("encode"))  # (ffi_runtime keeps the engine alive)


def alone(repeats: int) -> None:
    t = quantize.thresholds()
    # every threshold and its neighbours (scale 1: y is the value), then ordinary values
    checked = np.concatenate([t, np.nextafter(t, 0), np.nextafter(t, 2), [0.0, 1.0]])
    rng = np.random.default_rng(0)
    block = (rng.standard_normal(256) ** 3).astype(np.float32)
    reciprocal = np.float32(1) / np.abs(block).max()
    checked = np.ascontiguousarray(checked, np.float32)
    expected = None
    for name, encode in ALONE.items():
        run = _encode_function(name, encode)
        codes = np.zeros(checked.size, np.int8)
        run(checked.ctypes.data, codes.ctypes.data, checked.size, 1.0, 1)
        expected = codes if expected is None else expected
        out = np.zeros(256, np.int8)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run(block.ctypes.data, out.ctypes.data, 256, reciprocal, 20000)
            times.append((time.perf_counter() - start) / (256 * 20000))
        same = np.array_equal(codes, expected)
        print(f"{name}: {np.median(times) * 1e9:.3f} ns per element, shipped codes: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alone", action="store_true", help="encoders alone, on one block")
    parser.add_argument("--against", help="a git revision whose q8 loop runs beside")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if args.alone:
        alone(args.repeats)
    else:
        whole_step(args.repeats, args.against)


if __name__ == "__main__":
    main()
