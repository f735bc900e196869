"""``optgen opt``: passes over IR text, from a file or standard input, with located errors."""

from __future__ import annotations

import os
import pathlib
import re

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from optgen.passes import DEFAULT_PIPELINE, PASSES

import optgen
from optgen.cli import main
from optgen.compiler import check_spec, compile_checked
from optgen.diagnostics import Source, SpecError
from optgen.ir import print_program
from optgen.opt import optimize_source

SQUARE = """func @f(%p: tensor, %g: tensor, %t: step) {
  %0 = const 2.0 : step
  %1 = pow %g, %0 : tensor
  %2 = sub %p, %1 : tensor
  return p = %2
}
"""
SQUARED = """func @f(%p: tensor, %g: tensor, %t: step) {
  %0 = mul %g, %g : tensor
  %1 = sub %p, %0 : tensor
  return p = %1
}
"""


def opt(*args, input=None):
    return CliRunner().invoke(main, ["opt", *args], input=input)


@pytest.mark.parametrize("spec", optgen.builtin_names())
def test_default_pipeline_over_the_lowered_text_gives_the_optimized_program(spec):
    """--emit ir through optgen opt with the default pipeline is --emit ir-opt, for every spec."""
    compiled = compile_checked(check_spec(spec))
    source = Source(print_program(compiled.lowered), f"{spec}.ir")
    assert optimize_source(source, DEFAULT_PIPELINE) == print_program(compiled.program)
    assert optimize_source(source, ()) == print_program(compiled.lowered)


def test_file_stdin_and_output_file(tmp_path):
    (tmp_path / "f.ir").write_text(SQUARE)
    from_file = opt(str(tmp_path / "f.ir"), "--passes", "canon,dce")
    assert from_file.exit_code == 0 and from_file.output == SQUARED
    from_stdin = opt("-", "--passes", "canon, dce", input=SQUARE)
    assert from_stdin.exit_code == 0 and from_stdin.output == SQUARED
    written = opt("-", "--passes", "canon,dce", "-o", str(tmp_path / "out.ir"), input=SQUARE)
    assert written.exit_code == 0 and written.output == ""
    assert (tmp_path / "out.ir").read_text() == SQUARED
    assert opt("-", input=SQUARE).output == SQUARE  # no passes: the text again


def test_split_input_file_handles_each_piece_alone():
    both = opt(
        "-",
        "--passes",
        "canon,dce",
        "--split-input-file",
        input=f"{SQUARE}// ----- again\n{SQUARE}",
    )
    assert both.exit_code == 0 and both.output == f"{SQUARED}// -----\n{SQUARED}"
    # Without the flag the marker is a comment, and the two functions are one program.
    assert (
        opt("-", "--passes", "canon,dce", input=f"{SQUARE}// -----\n{SQUARE}").output
        == f"{SQUARED}\n{SQUARED}"
    )


@pytest.mark.parametrize(
    "right, wrong, code, where, caret",
    [
        ("sub %p, %1", "sub %p, %9", "E032", "bad.ir:11:16:", "               ^~"),
        ("%0 : tensor", "%0 : leaf", "E033", "bad.ir:10:3:", "  ^~~~~~~~~~~~~~~~~~~~~~"),
        ("const 2.0", "const two", "E032", "bad.ir:9:14:", "             ^~~"),
        ("return p", "retrun p", "E032", "bad.ir:12:3:", "  ^~~~~~~~~~~~~"),
    ],
)
def test_a_mistake_is_located_in_the_whole_split_file(
    tmp_path, monkeypatch, right, wrong, code, where, caret
):
    """The second piece starts on line 8; its error names that line of the file, with a caret."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.ir").write_text(f"{SQUARE}// -----\n{SQUARE.replace(right, wrong)}")
    result = opt("bad.ir", "--split-input-file", "--passes", "fold")
    assert result.exit_code == 1 and f"error[{code}]" in result.output, result.output
    first, line, marker = result.output.splitlines()[:3]
    assert first.startswith(where) and wrong in line and marker == "  " + caret, result.output


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "expected 'func @name(...) {' ... '}'"),
        (SQUARE.removesuffix("}\n"), "the function has no closing '}'"),
        (SQUARE.replace("  return p = %2\n", ""), "missing 'return'"),
        (
            SQUARE.replace("  return p = %2\n", "  return p = %2\n  %3 = neg %2 : tensor\n"),
            "an op after 'return'",
        ),
        ("%0 = const 1.0 : step\n", "expected 'func @name(...) {'"),
        (SQUARE.replace("%t: step", "%t: stpe"), "bad argument '%t: stpe'"),
    ],
)
def test_malformed_text_is_e032(text, message):
    result = opt("-", input=text)
    assert result.exit_code == 1 and "error[E032]" in result.output and message in result.output, (
        result.output
    )


def test_unreadable_input_is_e030_and_an_unknown_pass_e013(tmp_path):
    assert "error[E030]: cannot read" in opt(str(tmp_path / "missing.ir")).output
    assert "error[E030]" in opt(str(tmp_path)).output  # a directory
    unknown = opt("-", "--passes", "fold,hoyst", input=SQUARE)
    assert (
        unknown.exit_code == 1
        and "error[E013]" in unknown.output
        and "did you mean 'hoist'" in unknown.output
    )


IR_TEXTS = [
    path.read_text()
    for path in sorted(pathlib.Path(__file__).parent.joinpath("golden").glob("*.ir"))
]
LOCATED = re.compile(r"^fuzz\.ir:(\d+):(\d+): error\[(E03[23])\]: \S")


@settings(
    max_examples=int(os.environ.get("OPTGEN_FUZZ_EXAMPLES", "40")), deadline=None, database=None
)
@given(data=st.data())
def test_mutated_ir_is_printed_or_a_located_diagnostic(data):
    """Golden files with tokens and lines deleted, duplicated or swapped: optgen opt prints IR that
    parses again, or reports E032/E033 at a line of the file, never a traceback."""
    text = data.draw(st.sampled_from(IR_TEXTS))
    for _ in range(data.draw(st.integers(1, 3))):
        by_token = data.draw(st.booleans())
        unit = re.findall(r"\s+|[%\w.-]+|.", text) if by_token else text.splitlines(keepends=True)
        i, j = data.draw(st.integers(0, len(unit) - 1)), data.draw(st.integers(0, len(unit) - 1))
        kind = data.draw(st.sampled_from(["delete", "duplicate", "swap"]))
        if kind == "delete":
            del unit[i]
        elif kind == "duplicate":
            unit.insert(i, unit[i])
        else:
            unit[i], unit[j] = unit[j], unit[i]
        text = "".join(unit)
    try:
        out = optimize_source(Source(text, "fuzz.ir"), DEFAULT_PIPELINE, split=True)
    except SpecError as err:
        located = LOCATED.match(err.render())
        assert located, err.render()
        assert 1 <= int(located[1]) <= text.count("\n") + 1, err.render()
        return
    assert optimize_source(Source(out, "again.ir"), (), split=True) == out


INIT = "func @f.init(%p: tensor) {\n  return\n}\n"


def test_with_applies_an_option_every_spec_takes_to_the_program():
    """--with global_clipnorm=1.0 on update and init gives what optgen compile --with gives."""
    compiled = compile_checked(check_spec("adamw"), passes=())
    with_clip = compile_checked(
        check_spec("adamw"),
        transform_options=optgen.transforms.split_options({"global_clipnorm": 1.0})[0],
    )
    result = opt(
        "-",
        "--with",
        "global_clipnorm=1.0",
        "--passes",
        ",".join(DEFAULT_PIPELINE),
        input=print_program(compiled.lowered),
    )
    assert result.exit_code == 0 and result.output == print_program(with_clip.program), (
        result.output
    )


def test_with_needs_a_program_and_an_option_every_spec_takes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "update.ir").write_text(f"// one function\n{SQUARE}")
    alone = opt("update.ir", "--with", "clipvalue=0.5")
    assert alone.exit_code == 1 and alone.output.startswith("update.ir:2:1: error[E035]"), (
        alone.output
    )
    spec_option = opt("update.ir", "--with", "nesterov=true")
    assert spec_option.exit_code == 1 and "error[E034]: --with nesterov" in spec_option.output
    both = opt("-", "--with", "clipvalue=0.5", input=SQUARE + INIT)
    assert (
        both.exit_code == 0 and "%clipvalue: step" in both.output and "func @f.init" in both.output
    )


def test_help_lists_every_pass_with_its_summary():
    result = CliRunner().invoke(main, ["opt", "--help"])
    assert result.exit_code == 0
    for name in PASSES:
        assert re.search(rf"^\s+{name}: \S", result.output, re.M), name
