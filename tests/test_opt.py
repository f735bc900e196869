"""``optgen opt``: passes over IR text, from a file or standard input, with located errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import optgen
from optgen.cli import main
from optgen.compiler import check_spec, compile_checked
from optgen.diagnostics import Source
from optgen.ir import print_program
from optgen.opt import optimize_source
from optgen.passes import DEFAULT_PIPELINE

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
    both = opt("-", "--passes", "canon,dce", "--split-input-file", input=f"{SQUARE}// ----- again\n{SQUARE}")
    assert both.exit_code == 0 and both.output == f"{SQUARED}// -----\n{SQUARED}"
    # Without the flag the marker is a comment, and the two functions are one program.
    assert opt("-", "--passes", "canon,dce", input=f"{SQUARE}// -----\n{SQUARE}").output == f"{SQUARED}\n{SQUARED}"


@pytest.mark.parametrize("right, wrong, code, where, caret", [
    ("sub %p, %1", "sub %p, %9", "E032", "bad.ir:11:16:", "               ^~"),
    ("%0 : tensor", "%0 : leaf", "E033", "bad.ir:10:3:", "  ^~~~~~~~~~~~~~~~~~~~~~"),
    ("const 2.0", "const two", "E032", "bad.ir:9:14:", "             ^~~"),
    ("return p", "retrun p", "E032", "bad.ir:12:3:", "  ^~~~~~~~~~~~~"),
])
def test_a_mistake_is_located_in_the_whole_split_file(tmp_path, monkeypatch, right, wrong, code, where, caret):
    """The second piece starts on line 8; its error names that line of the file, with a caret."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.ir").write_text(f"{SQUARE}// -----\n{SQUARE.replace(right, wrong)}")
    result = opt("bad.ir", "--split-input-file", "--passes", "fold")
    assert result.exit_code == 1 and f"error[{code}]" in result.output, result.output
    first, line, marker = result.output.splitlines()[:3]
    assert first.startswith(where) and wrong in line and marker == "  " + caret, result.output


@pytest.mark.parametrize("text, message", [
    ("", "expected 'func @name(...) {' ... '}'"),
    (SQUARE.removesuffix("}\n"), "the function has no closing '}'"),
    (SQUARE.replace("  return p = %2\n", ""), "missing 'return'"),
    (SQUARE.replace("  return p = %2\n", "  return p = %2\n  %3 = neg %2 : tensor\n"), "an op after 'return'"),
    ("%0 = const 1.0 : step\n", "expected 'func @name(...) {'"),
    (SQUARE.replace("%t: step", "%t: stpe"), "bad argument '%t: stpe'"),
])
def test_malformed_text_is_e032(text, message):
    result = opt("-", input=text)
    assert result.exit_code == 1 and "error[E032]" in result.output and message in result.output, result.output


def test_unreadable_input_is_e030_and_an_unknown_pass_e013(tmp_path):
    assert "error[E030]: cannot read" in opt(str(tmp_path / "missing.ir")).output
    assert "error[E030]" in opt(str(tmp_path)).output  # a directory
    unknown = opt("-", "--passes", "fold,hoyst", input=SQUARE)
    assert unknown.exit_code == 1 and "error[E013]" in unknown.output and "did you mean 'hoist'" in unknown.output
