"""The single-pass lowering: one fused loop per step, minimal bytes, same numbers, sharding kept."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_device_script
from optgen.codegen import export, fusion

import optgen
from optgen.kernel_report import (
    count_kernels,
    inspect,
    min_bytes_per_element,
    with_state_dtypes,
)
from optgen.types import DTYPES

ELEMENTWISE = [
    "adabelief",
    "adadelta",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "ademamix",
    "adopt",
    "amsgrad",
    "lion",
    "nadam",
    "nadamw",
    "radam",
    "rmsprop",
    "sgd",
    "torch/nadamw",
    "yogi",
]
# Not at their minimum in XLA's loops, so not asserted there: adan's six-output step (XLA:CPU
# splits it into two loops, 68 bytes per element against 44), lamb (48 against 44) and lars
# (44 against 28). optgen's own loop runs them at their minimum (below).


def program(spec):
    return optgen.load(spec).compiled.program


def test_this_process_has_cpu_multi_output_fusion():
    # conftest imports optgen before JAX starts, so the option must have taken effect.
    assert fusion.cpu_multi_output_fusion()
    assert "xla_cpu_use_multi_output_fusion" in os.environ["XLA_FLAGS"]


@pytest.mark.parametrize("spec", ELEMENTWISE)
def test_step_is_one_loop_at_the_spec_minimum(spec):
    report = inspect(program(spec), np.dtype(np.float32), 1 << 16)
    assert report.lowering == "per-output"
    assert report.kernels == 1
    assert report.bytes_per_element <= 1.05 * report.min_bytes_per_element


def test_a_per_tensor_reduction_costs_one_more_read_in_one_loop():
    report = inspect(program("novograd"), np.dtype(np.float32), 1 << 16)
    assert report.min_bytes_per_element == 24  # read p g mu, g again for norm(g); write p mu
    assert report.kernels == 1
    assert report.bytes_per_element <= 1.05 * report.min_bytes_per_element


@pytest.mark.parametrize("spec", ["adamw", "amsgrad"])
def test_shared_lowering_is_what_per_output_improves_on(spec):
    # Guards the measurement itself: without per-output, XLA:CPU splits the step.
    report = inspect(program(spec), np.dtype(np.float32), 1 << 16, lowering="shared")
    assert report.kernels >= 2
    assert report.bytes_per_element > 1.2 * report.min_bytes_per_element


def test_min_bytes_counts_reads_and_writes_at_storage_dtypes():
    adamw = program("adamw")
    assert min_bytes_per_element(adamw, np.dtype(np.float32)) == 28  # read p g mu nu, write p mu nu
    assert min_bytes_per_element(adamw, np.dtype(jnp.bfloat16)) == 14
    assert min_bytes_per_element(program("amsgrad"), np.dtype(np.float32)) == 36


def xla_hlo(spec, lowering="per-output"):
    return (
        export.lowered_kernel(program(spec), np.dtype(np.float32), "4096", lowering)
        .compile()
        .as_text()
    )


def test_count_kernels_counts_a_root_fusion():
    assert count_kernels(xla_hlo("sgd")) == (1, 0)


def test_count_kernels_reads_entry_fusions():
    assert count_kernels(xla_hlo("adamw")) == (1, 1)


def test_count_kernels_counts_calls_of_the_cpu_loop():
    # the per-step scalars are computed inside the loop's call, before its loop
    assert count_kernels(xla_hlo("adamw", "ffi")) == (1, 0)


@pytest.mark.parametrize("spec", ELEMENTWISE)
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_per_output_and_shared_lowerings_agree(spec, dtype):
    # Not bitwise: where a fusion boundary falls changes which multiply-adds LLVM contracts.
    prog = program(spec)
    dtypes = export.state_dtypes(prog, np.dtype(dtype))
    specs = export.arg_specs(prog, np.dtype(dtype), "257", dtypes)
    rng = np.random.default_rng(0)
    start = {
        name: jnp.asarray(rng.uniform(0.1, 2.0, s.shape), s.dtype) for name, s in specs.items()
    }
    grads = [jnp.asarray(rng.normal(size=257), dtype) for _ in range(20)]
    # The spec's own hyperparameters: random ones (a b2 above 1) can make the step chaotic.
    hypers = {name: jnp.float32(value) for name, value in optgen.load(spec).hyperparams.items()}
    outs = {}
    for lowering in ("shared", "per-output", "ffi"):
        step, state = (
            jax.jit(export.kernel(prog, dtypes, lowering)),
            start | hypers | {"learning_rate": jnp.float32(1e-2)},
        )
        for t, g in enumerate(grads, 1):
            state |= step(state | {"t": jnp.float32(t), "g": g})
        outs[lowering] = state
    # bfloat16: a few ulps (2^-8 each), as one ulp of rounding on store carries through mu over 20
    # steps; mu near zero crossings needs the atol too.
    tolerance = 1e-5 if dtype == np.float32 else 3e-2
    for name, _ in prog.update.outputs:
        for lowering in ("per-output", "ffi"):
            np.testing.assert_allclose(
                np.asarray(outs[lowering][name], np.float32),
                np.asarray(outs["shared"][name], np.float32),
                rtol=tolerance,
                atol=tolerance / 10,
                err_msg=f"{name} ({lowering})",
            )


def test_per_output_step_is_deterministic():
    prog = program("adamw")
    dtypes = export.state_dtypes(prog, np.dtype(np.float32))
    specs = export.arg_specs(prog, np.dtype(np.float32), "4099", dtypes)
    rng = np.random.default_rng(1)
    inputs = {
        name: jnp.asarray(rng.uniform(0.1, 2.0, s.shape), s.dtype) for name, s in specs.items()
    }
    first, second = (jax.jit(export.kernel(prog, dtypes, "per-output"))(inputs) for _ in range(2))
    for name in first:
        np.testing.assert_array_equal(np.asarray(first[name]), np.asarray(second[name]))


CPU = fusion.Where(("cpu",))
REFUSED = "it computes 'sum'"  # a step the CPU loop cannot run falls back to XLA's loops


@pytest.mark.parametrize("spec", ELEMENTWISE)
def test_own_loop_step_is_one_call_at_the_spec_minimum(spec):
    report = inspect(program(spec), np.dtype(np.float32), 1 << 16, lowering="ffi")
    assert report.kernels == 1
    # + a few scalars
    assert report.bytes_per_element == pytest.approx(report.min_bytes_per_element, rel=1e-3)
    # XLA cannot count the loop's flops (it printed "-0.00"): the report says so
    assert report.flops_per_element is None
    assert "flops per element   - (optgen's own loop" in "\n".join(report.lines())


REDUCING = ["lamb", "lars", "novograd", "cautious_adamw", "prodigy"]


@pytest.mark.parametrize("spec", REDUCING + ["adamw+options"])
def test_own_loop_runs_sums_as_a_reading_pass_at_the_pass_structure_minimum(spec):
    if spec == "adamw+options":
        prog = optgen.load("adamw", global_clipnorm=1.0, skip_nonfinite=True).compiled.program
    else:
        prog = program(spec)
    report = inspect(prog, np.dtype(np.float32), 1 << 16, lowering="ffi")
    assert report.kernels == 2  # the reading pass, the update
    assert report.bytes_per_element == pytest.approx(report.min_bytes_per_element, rel=1e-3)


def test_own_loop_runs_adan_in_one_pass_at_its_minimum():
    report = inspect(program("adan"), np.dtype(np.float32), 1 << 16, lowering="ffi")
    assert report.kernels == 1
    assert report.min_bytes_per_element == 44  # read p g m v n prev_g, write all but g
    assert report.bytes_per_element == pytest.approx(44, rel=1e-3)


def test_min_bytes_counts_one_reading_pass_and_the_branch_a_parameter_takes():
    f32 = np.dtype(np.float32)
    # update: read p g mu nu, write p mu nu; reading pass: p, and g mu nu p for the Adam direction
    assert min_bytes_per_element(program("lamb"), f32) == 28 + 16
    # prodigy's update does not read params0; its reading pass reads g, params0, p and grad_sum
    assert min_bytes_per_element(program("prodigy"), f32) == 36 + 16
    # muon: a vector takes the AdamW branch (28 B); a matrix the orthogonalized one, which
    # also passes nu through (28 B) and reads g and mu first for norm(m) (8 B)
    assert min_bytes_per_element(program("muon"), f32, (64,)) == 28
    assert min_bytes_per_element(program("muon"), f32, (64, 32)) == 36


MIXES = [("bf16", "f32"), ("bf16", "bf16"), ("f32", "bf16"), ("f16", "f32"), ("f16", "bf16")]
# (params, states): with f32 and f32 (test_step_is_one_loop_at_the_spec_minimum), every pair


@pytest.mark.parametrize("params, states", MIXES)
@pytest.mark.parametrize("spec", ELEMENTWISE)
def test_every_dtype_mix_is_one_pass_at_the_minimum(spec, params, states):
    prog = with_state_dtypes(program(spec), {"*": states})
    report = inspect(prog, DTYPES[params], 1 << 16)
    assert report.kernels == 1
    assert report.bytes_per_element <= 1.05 * report.min_bytes_per_element


def test_a_state_dtype_is_counted_at_its_size():
    prog = with_state_dtypes(program("adamw"), {"*": "f32", "mu": "bf16"})
    # read p g (f16), mu (bf16), nu (f32); write p, mu, nu
    assert min_bytes_per_element(prog, DTYPES["f16"]) == 2 + 2 + 2 + 4 + 2 + 2 + 4


def test_auto_takes_the_cpu_loop_where_xla_has_no_one_loop_lowering():
    f32, bf16 = np.dtype(np.float32), np.dtype("bfloat16")
    assert fusion.resolve("auto", CPU, [[bf16], [f32]]) == "ffi"  # mixed dtypes
    many = fusion.XLA_PREFERRED_MAX_LEAVES + 1
    assert fusion.resolve("auto", CPU, [[f32] * many, [f32] * many]) == "ffi"
    assert fusion.resolve("auto", CPU, [[f32] * (many - 1), [f32] * (many - 1)]) == "per-output"
    assert fusion.resolve("auto", fusion.Where(("cuda",)), [[f32]]) == "shared"
    assert (
        fusion.resolve("auto", fusion.Where(("cpu",), one_device=False), [[bf16], [f32]])
        == "shared"
    )
    assert (
        fusion.resolve("auto", fusion.Where(("cpu",), for_export=True), [[bf16], [f32]]) == "shared"
    )
    assert fusion.resolve("shared", CPU, [[f32]]) == "shared"


def test_auto_takes_the_cpu_loop_for_steps_with_sums_where_it_measured_faster():
    f32 = np.dtype(np.float32)
    assert fusion.resolve("auto", CPU, [[f32], [f32]], None, prefer_own_loop=True) == "ffi"
    assert fusion.resolve("auto", CPU, [[f32]], REFUSED, prefer_own_loop=True) == "per-output"
    bf16 = np.dtype("bfloat16")
    preferred = {s: fusion.own_loop_preferred(program(s).update, [[f32]]) for s in REDUCING}
    # novograd's one sum of one input: XLA's loops are at the same pass structure already in f32
    assert preferred == dict.fromkeys(REDUCING, True) | {"novograd": False}
    assert fusion.own_loop_preferred(program("novograd").update, [[bf16], [bf16]])
    assert fusion.own_loop_preferred(program("adan").update, [[f32]])  # prev_g = g
    assert not fusion.own_loop_preferred(program("adamw").update, [[f32]])
    # kahan_sum: XLA's loop computes the update for p and again for kahan_comp
    kahan = optgen.load("adamw", kahan_sum=True).compiled.program.update
    assert fusion.own_loop_preferred(kahan, [[bf16]] * 4)
    # a bf16 output: XLA's loop rounds to bf16 slowly (AdamW 41% of copy bandwidth, own loop 83%)
    assert fusion.own_loop_preferred(program("adamw").update, [[bf16]] * 3)
    assert not fusion.own_loop_preferred(program("adamw").update, [[np.dtype(np.float16)]] * 3)
    params = {"w": jnp.ones(8, jnp.bfloat16)}
    uniform = optgen.load("adamw")
    assert "optgen_cpu_" in uniform.step.lower(params, params, uniform.init(params)).as_text()


def test_ffi_where_it_cannot_run_is_an_error():
    with pytest.raises(optgen.InputError, match="E384.*exported step must be portable"):
        fusion.resolve("ffi", fusion.Where(("cpu",), for_export=True), [[np.dtype(np.float32)]])
    with pytest.raises(optgen.InputError, match="E384.*it computes 'sum'"):
        fusion.resolve("ffi", CPU, [[np.dtype(np.float32)]], REFUSED)


def test_mixed_dtype_outputs_stay_shared():
    assert (
        fusion.resolve("auto", CPU, [[np.dtype("bfloat16")], [np.dtype(np.float32)]], REFUSED)
        == "shared"
    )
    assert (
        fusion.resolve("auto", CPU, [[np.dtype(np.float32)], [np.dtype(np.float32)]], REFUSED)
        == "per-output"
    )
    assert (
        fusion.resolve(
            "auto", fusion.Where(("cuda",)), [[np.dtype(np.float32)], [np.dtype(np.float32)]]
        )
        == "shared"
    )


def test_thousands_of_leaves_lower_shared():
    # per-output's extra HLO made 10,000 leaves run out of memory while compiling (docs/fusion.md)
    f32 = np.dtype(np.float32)
    n = fusion.PER_OUTPUT_MAX_LEAVES
    assert fusion.resolve("auto", CPU, [[f32] * n, [f32] * n], REFUSED) == "per-output"
    assert fusion.resolve("auto", CPU, [[f32] * (n + 1), [f32] * (n + 1)], REFUSED) == "shared"


def test_without_the_option_auto_is_shared(monkeypatch):
    monkeypatch.setattr(fusion, "cpu_multi_output_fusion", lambda: False)
    assert fusion.resolve("auto", CPU, [[np.dtype(np.float32)]], REFUSED) == "shared"


def test_request_respects_the_users_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_extra_options=mine")
    fusion.request_cpu_multi_output_fusion()
    assert os.environ["XLA_FLAGS"] == "--xla_backend_extra_options=mine"
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("OPTGEN_XLA_FLAGS", "0")
    fusion.request_cpu_multi_output_fusion()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


def test_sharded_step_keeps_layouts_and_needs_no_collectives():
    report = run_device_script("sharded_step.py", timeout=300)
    assert report["devices"] == 8
    assert report["params"] == report["expected"]
    assert report["state_init"] == report["expected"]
    assert report["state_after"] == report["expected"]
    assert report["packed_groups"] == ["P()"]  # b and c, still replicated
    assert report["collectives"] == []
    # compiled by .lower() above
    assert report["step_compiles"] == report["step_compiles_after_restore"] == 0
    assert report["state_restored"] == report["expected"]
    assert report["max_diff"] < 1e-6
