"""The optgen command, run as a subprocess from a folder other than the repository."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import optgen

KERNELS = __import__("pathlib").Path(__file__).resolve().parent.parent / "kernels"


def run(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "optgen.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_compile_spec_file_prints_stablehlo_with_spec_locations(tmp_path):
    result = run("compile", str(KERNELS / "adamw.spec"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "stablehlo.multiply" in result.stdout and "func.func public @main" in result.stdout
    assert 'adamw.spec":18:' in result.stdout  # the update of p is on line 18


def test_compile_builtin_to_file_and_every_emit(tmp_path):
    assert run("compile", "adamw", "-o", "adamw.mlir", cwd=tmp_path).returncode == 0
    assert "stablehlo" in (tmp_path / "adamw.mlir").read_text()
    for emit, marker in [
        ("ast", "(update"),
        ("ir", "func @adamw("),
        ("ir-opt", "func @adamw.init("),
    ]:
        result = run("compile", "adamw", "--emit", emit, cwd=tmp_path)
        assert result.returncode == 0 and marker in result.stdout, (emit, result.stderr)
    hlo = run("compile", "adamw", "--emit", "hlo", "--shape", "4096", cwd=tmp_path)
    assert hlo.returncode == 0 and "ENTRY" in hlo.stdout and "fusion" in hlo.stdout


def test_passes_and_print_ir_after_all(tmp_path):
    result = run(
        "compile",
        "adamw",
        "--emit",
        "ir-opt",
        "--passes",
        "fold,cse",
        "--print-ir-after-all",
        cwd=tmp_path,
    )
    assert result.returncode == 0
    assert "IR after fold" in result.stderr and "IR after cse" in result.stderr
    assert "IR after hoist" not in result.stderr


def test_check_list_show_version(tmp_path):
    assert run("check", "nadamw", cwd=tmp_path).stdout.strip() == "nadamw: ok"
    listed = run("list", cwd=tmp_path).stdout
    for name in optgen.builtin_names():
        assert name in listed
    assert run("show", "adamax", cwd=tmp_path).stdout == (KERNELS / "adamax.spec").read_text()
    assert optgen.__version__ in run("--version", cwd=tmp_path).stdout
    for command in ("compile", "check", "list", "show"):
        assert run(command, "--help", cwd=tmp_path).returncode == 0


def test_option_changes_the_program(tmp_path):
    default = run("compile", "amsgrad", "--emit", "ir-opt", cwd=tmp_path).stdout
    paper = run(
        "compile", "amsgrad", "--emit", "ir-opt", "--with", "bias_correction_mu=false", cwd=tmp_path
    ).stdout
    assert default.count("pow") == 2 and paper.count("pow") == 1


def test_with_turns_on_transforms_in_the_ir_and_the_kernel(tmp_path):
    args = [
        "compile",
        "adamw",
        "--with",
        "global_clipnorm=1.0",
        "--with",
        "use_ema=true",
        "--with",
        "skip_nonfinite=true",
        "--with",
        "exclude_from_weight_decay=bias,norm",
    ]
    ir = run(*args, "--emit", "ir", cwd=tmp_path)
    assert ir.returncode == 0, ir.stderr
    for marker in (
        'loc("<global_clipnorm>"',
        "%ema: tensor",
        "%total_notfinite: step",
        "%weight_decay_mask: leaf",
        "isfinite %",
    ):
        assert marker in ir.stdout, marker
    assert run(*args, cwd=tmp_path).stdout.count('loc("<use_ema>"') > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["compile", "adamw", "--with", "clipnorm=big"],
            "clipnorm takes a finite positive number, got 'big'",
        ),
        (["compile", "adamw", "--with", "clipnorm"], "--with takes NAME=VALUE"),
        (
            ["check", "adam", "--with", "exclude_from_weight_decay=bias"],
            "no hyperparameter 'weight_decay' to mask",
        ),
        (["check", "bad.spec"], "bad.spec:3:"),
        (["compile", "bad.spec", "-o", "out.mlir"], "bad.spec:3:"),
        (["compile", "adamww"], "did you mean 'adamw'"),
        (["compile", "missing.spec"], "no such file"),
        (["compile", "adamw", "-o", "nofolder/out.mlir"], "does not exist"),
        (["compile", "adamw", "--passes", "fold,csee"], "did you mean 'cse'"),
        (["compile", "adamw", "--with", "nesterov=true"], "has no option 'nesterov'"),
        (["check", "adafactor", "--with", "factored=3"], "option 'factored' takes true or false"),
        (
            ["check", "adafactor", "--with", "min_dim_size_to_factor=yes"],
            "takes a number, got 'yes'",
        ),
        (["compile", "adamw", "--emit", "hlo"], "needs a concrete shape"),
        (["compile", "adamw", "--emit", "artifact"], "give -o FILE"),
        (["compile", "."], "is a directory"),
        (
            ["compile", "bad.spec/inner.spec"],
            "error[E004]: cannot read 'bad.spec/inner.spec': Not a directory",
        ),
        (["compile", "adamw", "-o", "."], "error[E007]: cannot write '.': it is a directory"),
        (["compile", "adamw", "-o", "bad.spec/out.mlir"], "error[E006]"),
    ],
)
def test_errors_exit_1_without_traceback_and_write_nothing(tmp_path, args, message):
    (tmp_path / "bad.spec").write_text("optimizer bad\nupdate:\n  p = p - lr * g\n")
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 1, result
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.mlir").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.spec"]


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads unreadable files"
)
def test_unreadable_file(tmp_path):
    (tmp_path / "locked.spec").write_text("optimizer x\n")
    (tmp_path / "locked.spec").chmod(0)
    result = run("check", "locked.spec", cwd=tmp_path)
    assert (
        result.returncode == 1
        and "error[E004]: cannot read 'locked.spec': Permission denied" in result.stderr
    )


def test_inspect_reports_one_loop_and_measures_with_run(tmp_path):
    result = run("inspect", "adamw", "--elements", "65536", "--run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lowering            per-output" in result.stdout
    assert "fused kernels       1 per-element" in result.stdout
    assert "bytes per element   28.00 (spec minimum 28, +0.0%)" in result.stdout
    assert "GB/s" in result.stdout and "step at" in result.stdout
    shared = run("inspect", "amsgrad", "--elements", "4096", "--lowering", "shared", cwd=tmp_path)
    assert (
        shared.returncode == 0
        and "spec minimum 36" in shared.stdout
        and "step time" not in shared.stdout
    )


def test_inspect_takes_a_dtype_mix(tmp_path):
    # f16 parameters, a bf16 first moment, an f32 second: read p g mu nu, write p mu nu
    args = ["--dtype", "f16", "--state-dtype", "*=f32", "--state-dtype", "mu=bf16"]
    result = run("inspect", "adamw", "--elements", "65536", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lowering            ffi" in result.stdout  # outputs of three dtypes: the own loop
    assert "bytes per element   18.00 (spec minimum 18, +0.0%)" in result.stdout


def test_a_device_without_a_size_is_read_only_up_to_the_limit():
    from click.testing import CliRunner

    from optgen.cli import main

    # its size is 0: reading to the end never ends
    result = CliRunner().invoke(main, ["check", "/dev/zero"])
    assert result.exit_code == 1 and "error[E008]" in result.output, result.output


def _invoke(*args):
    from click.testing import CliRunner

    from optgen.cli import main

    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("shape", ["²", "１２", "n²", "1,٣", "_", "max", "n,min"])
def test_shape_takes_ascii_digits_and_names_only(shape):
    result = _invoke("compile", "adamw", "--shape", shape)
    assert (
        result.exit_code == 1
        and "error[E014]" in result.output
        and "Traceback" not in result.output
    )


def test_a_factored_spec_compiles_for_a_matrix_shape():
    # row and col states drop the axis they reduce, as the step stores them (256 and 256 here).
    result = _invoke("compile", "adafactor", "--shape", "256,256")
    assert result.exit_code == 0, result.output
    assert "tensor<256xf32> loc(\"inputs['v_row']\")" in result.output
    assert "tensor<256xf32> loc(\"inputs['v_col']\")" in result.output
    result = _invoke("compile", "adafactor", "--shape", "n,m")
    assert result.exit_code == 1 and "error[E016]" in result.output, result.output
    assert _invoke("compile", "adafactor", "--shape", "n").exit_code == 0


@pytest.mark.parametrize(
    "item, hint",
    [
        ("clipnrom=1", "did you mean 'clipnorm'?"),
        ("learning_rate=0.1", "optgen.load('adamw', learning_rate=...)"),
        ("zzz=1", "every spec takes clipnorm"),
    ],
)
def test_with_names_what_is_wrong(item, hint):
    result = _invoke("compile", "adamw", "--with", item)
    assert result.exit_code == 1 and "error[E303]" in result.output and hint in result.output, (
        result.output
    )


@pytest.mark.parametrize("item", ["clipnorm=inf", "global_clipnorm=1e400", "loss_scale_factor=inf"])
def test_an_infinite_option_is_refused(item):
    result = _invoke("check", "adamw", "--with", item)
    assert result.exit_code == 1 and "error[E342]" in result.output and "finite" in result.output, (
        result.output
    )


@pytest.mark.parametrize("args", [("compile", "adamw"), ("list",), ("show", "adamw")])
def test_a_full_or_closed_stdout_is_a_diagnostic(tmp_path, args):
    for redirect in (">/dev/full", ">&-"):  # a full disk; standard output closed
        proc = subprocess.run(
            ["sh", "-c", f'exec "$0" -m optgen.cli "$@" {redirect}', sys.executable, *args],
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert (
            proc.returncode == 1 and "error[E017]" in proc.stderr and "Traceback" not in proc.stderr
        ), proc.stderr


def test_ctrl_c_during_a_command_is_a_message_and_status_130(monkeypatch, tmp_path):
    from optgen import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "compile_checked", interrupted)
    monkeypatch.chdir(tmp_path)
    result = _invoke("compile", "adamw", "-o", "out.mlir")
    assert (
        result.exit_code == 130
        and "interrupted" in result.output
        and not (tmp_path / "out.mlir").exists()
    )


def test_a_constant_beyond_float32_is_refused_for_f32_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "big.spec").write_text("optimizer big\nupdate:\n  p = p - 1e30 * 1e30 * g\n")
    result = _invoke("compile", "big.spec", "--dtype", "f32")  # folded to 1e60: inf in float32
    assert (
        result.exit_code == 1 and "error[E225]" in result.output and "big.spec:3:" in result.output
    ), result.output
    assert _invoke("compile", "big.spec", "--dtype", "f64").exit_code == 0


def test_ctrl_c_while_starting_is_a_message_and_status_130():
    # SIGINT while `import optgen` (and JAX) runs: the launcher catches it before any import
    import signal
    import subprocess
    import sys
    import time

    root = __import__("pathlib").Path(__file__).parent.parent
    process = subprocess.Popen(
        [sys.executable, "-c", "import optgen_launch; optgen_launch.main()", "list"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)  # past the interpreter's own start, inside the imports
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, (
        stderr
    )
