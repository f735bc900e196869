"""Property tests: whatever bytes a user feeds optgen, the answer is a diagnostic, never a crash.

Random token soups, random mutations of every built-in spec (tokens and lines deleted,
duplicated, swapped; truncation; a byte order mark), indentation partly rewritten with tabs,
number literals past float64 and constants that overflow it, odd Unicode digits (also in
``--shape``), random text and bytes, and fixed nasty inputs (NUL bytes, non-UTF-8,
20,000-deep nesting, a 10 MB spec, tabs mixed with spaces) go through
``optgen compile FILE -o OUT``. Each run either compiles (exit 0, OUT written) or ends in
``FILE:line:col: error[Ennn]: ...`` (or a file-level ``error[Ennn]``), exit status 1, no
traceback, and OUT not written.

The example count is small on CI; run more by hand with
``OPTGEN_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import resources

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optgen.cli import main
from optgen.library import builtin_names

EXAMPLES = int(os.environ.get("OPTGEN_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
LOCATED = re.compile(r"^fuzz\.spec:(\d+):(\d+): error\[E\d{3}\]: \S")
FILE_LEVEL = re.compile(r"^(fuzz\.spec: )?error\[E\d{3}\]: \S")
BUILTIN_TEXTS = [
    resources.files("optgen.kernels").joinpath(f"{n}.spec").read_text() for n in builtin_names()
]
VOCAB = [
    "optimizer",
    "hyper",
    "option",
    "state",
    "update",
    ":",
    "if",
    "else",
    "=",
    "in",
    "[",
    "]",
    "(",
    ")",
    ",",
    "+",
    "-",
    "*",
    "/",
    "^",
    "<",
    "==",
    "and",
    "or",
    "not",
    "true",
    "false",
    "p",
    "g",
    "t",
    "mu",
    "nu",
    "b1",
    "x",
    "sqrt",
    "max",
    "clip",
    "where",
    "norm",
    "global_norm",
    "0",
    "1",
    "0.9",
    "1e-8",
    "inf",
    '"desc"',
    "#c",
    ": bf16",
    "\n",
    "\n  ",
    "\n    ",
    "\t",
    "\\\n",
]


def outcome(data: bytes, tmp_path) -> str:
    """Compile ``data`` as a spec file through the CLI; assert the robustness contract; say which
    way it went.
    """
    spec, out = tmp_path / "fuzz.spec", tmp_path / "out.mlir"
    spec.write_bytes(data)
    out.unlink(missing_ok=True)
    os.chdir(tmp_path)
    # through StableHLO
    result = CliRunner().invoke(main, ["compile", "fuzz.spec", "-o", "out.mlir"])
    assert not isinstance(
        result.exception, (RecursionError, AssertionError)
    ) or result.exit_code in (0, 1)
    if result.exit_code == 0:
        assert out.exists(), result.output
        return "compiled"
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (
        result.output,
        result.exception,
    )
    assert "Traceback" not in result.output and not out.exists(), result.output
    first = result.output.splitlines()[0]
    located = LOCATED.match(first)
    assert located or FILE_LEVEL.match(first), result.output
    # the position is inside the file (or just past its last line), and the line shown is it
    if located:
        # a BOM is not part of the text
        lines = data.decode("utf-8").removeprefix("\ufeff").split("\n")
        line, col = int(located[1]), int(located[2])
        assert 1 <= line <= len(lines) + 1 and col >= 1, result.output
        shown = "".join(
            c if c.isprintable() or c == "\t" else "?"
            for c in (lines + [""])[line - 1].rstrip("\r")
        )
        assert result.output.splitlines()[1] == f"  {shown}", result.output
    return first.split("]")[0].rsplit("[", 1)[1]


def tokens(text: str) -> list[str]:
    return re.findall(r"\s+|\w+|.", text)


@st.composite
def mutated_builtin(draw):
    text = draw(st.sampled_from(BUILTIN_TEXTS))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(
                ["del_tok", "dup_tok", "swap_tok", "del_line", "dup_line", "swap_line", "truncate"]
            )
        )
        unit = tokens(text) if kind.endswith("tok") else text.splitlines(keepends=True)
        if kind == "truncate" or not unit:
            text = text[: draw(st.integers(0, len(text)))]
            continue
        i, j = draw(st.integers(0, len(unit) - 1)), draw(st.integers(0, len(unit) - 1))
        if kind.startswith("del"):
            del unit[i]
        elif kind.startswith("dup"):
            unit.insert(i, unit[i])
        else:
            unit[i], unit[j] = unit[j], unit[i]
        text = "".join(unit)
    return text


@FUZZ
@given(text=mutated_builtin())
def test_mutated_builtin_specs(text, tmp_path):
    outcome(text.encode(), tmp_path)


@FUZZ
@given(soup=st.lists(st.sampled_from(VOCAB), max_size=60), header=st.booleans())
def test_token_soup(soup, header, tmp_path):
    text = ("optimizer soup\n" if header else "") + " ".join(soup)
    outcome(text.encode(), tmp_path)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes(data, tmp_path):
    outcome(data, tmp_path)


@FUZZ
@given(text=st.text(max_size=200))
def test_random_text(text, tmp_path):
    outcome(text.encode("utf-8", "surrogatepass"), tmp_path)


@st.composite
def mixed_indentation(draw):
    """A built-in spec whose indentation runs are partly rewritten with tabs."""
    lines = draw(st.sampled_from(BUILTIN_TEXTS)).split("\n")
    for i in draw(st.lists(st.integers(0, len(lines) - 1), max_size=6)):
        indent = len(lines[i]) - len(lines[i].lstrip(" "))
        if indent:
            tabs = draw(st.integers(1, max(1, indent // 2)))
            lines[i] = "\t" * tabs + " " * draw(st.integers(0, indent)) + lines[i].lstrip(" ")
    return "\n".join(lines)


@FUZZ
@given(text=mixed_indentation())
def test_mixed_indentation_means_one_thing_or_is_refused(text, tmp_path):
    """Accepted indentation reads the same whatever a tab's width; anything else is E108 (or another
    error).
    """
    from optgen.parser import parse
    from optgen.syntax import format_spec

    if outcome(text.encode(), tmp_path) == "compiled":
        meaning = {format_spec(parse(text.replace("\t", " " * width))) for width in (1, 4, 8)}
        assert meaning == {format_spec(parse(text))}


DIGITS = st.sampled_from(["0", "1", "9", "²", "１", "٣", "½", "⁹", "𝟗", "e", "E", "-", "+", "."])


@FUZZ
@given(
    mantissa=st.text(DIGITS, min_size=1, max_size=6),
    exponent=st.integers(-700, 700),
    power=st.integers(-500, 500),
    where=st.sampled_from(["hyper", "expr", "pow", "exp"]),
)
def test_big_literals_and_odd_digits(mantissa, exponent, power, where, tmp_path):
    """Numbers past float64, constants that overflow it, Unicode digits: a diagnostic, or finite
    constants.
    """
    number = f"{mantissa}e{exponent}"
    body = {
        "hyper": f"hyper lr = {number}\nupdate:\n  p = p - lr * g\n",
        "expr": f"update:\n  p = p - {number} * g\n",
        "pow": f"update:\n  p = p - 10^{power} * g\n",
        "exp": f"update:\n  p = p - exp({power}) * g\n",
    }[where]
    got = outcome(f"optimizer big\n{body}".encode(), tmp_path)
    if where in ("pow", "exp"):  # the kernel is float32: past its range E225, past float64's E223
        # 10^-400, exp(-1000) are 0: fine
        f32_max, f64_max = (38, 308) if where == "pow" else (88, 709)
        assert got == (
            "compiled" if power <= f32_max else "E225" if power <= f64_max else "E223"
        ), (where, power, got)
    elif got == "compiled":
        # ASCII digits only; one literal ('0-0e0' is an expression): finite, 0 only as 0
        assert number.isascii(), number
        if re.fullmatch(r"([0-9]+\.?[0-9]*|\.[0-9]+)e-?[0-9]+", number):
            assert abs(float(number)) < float("inf") and (
                float(number) != 0 or not re.search(r"[1-9]", mantissa)
            )


@FUZZ
@given(text=mutated_builtin())
def test_a_byte_order_mark_changes_nothing(text, tmp_path):
    assert outcome(b"\xef\xbb\xbf" + text.encode(), tmp_path) == outcome(text.encode(), tmp_path)


@FUZZ
@given(
    shape=st.lists(
        st.sampled_from(["n", "m", "1", "256", ",", " ", "²", "１", "٣", "_", "-", "x"]), max_size=8
    ).map("".join)
)
def test_any_shape_text_compiles_or_is_refused(shape, tmp_path):
    os.chdir(tmp_path)
    result = CliRunner().invoke(main, ["compile", "adafactor", "--shape", shape, "-o", "out.mlir"])
    assert result.exit_code == 0 or (
        result.exit_code == 1 and re.match(r"error\[E01[46]\]", result.output)
    ), (shape, result.output, result.exception)


def _deep(depth: int, open_: str, close: str) -> bytes:
    return f"optimizer deep\nupdate:\n  p = p - {open_ * depth}g{close * depth}\n".encode()


def _nested_ifs(depth: int) -> bytes:
    lines = ["optimizer deep", "option o = true", "update:"]
    lines += [" " * (i + 1) + "if o:" for i in range(depth)] + [" " * (depth + 1) + "p = g"]
    return "\n".join(lines).encode()


NASTY = {
    "nul bytes": (b"optimizer a\x00b\nupdate:\n  p = \x00g\n", "E101"),
    "non-utf8": (b"optimizer caf\xe9\nupdate:\n  p = g\n", "E005"),
    "20000 parentheses": (_deep(20000, "(", ")"), "compiled"),
    "20000 unary minus": (_deep(20000, "-(", ")"), "E106"),
    "20000 nested calls": (_deep(20000, "sqrt(", ")"), "E106"),
    "500 nested ifs": (_nested_ifs(500), "E106"),
    "10 MB spec": (b"optimizer big\nupdate:\n" + b"  p = p - 0.001 * g\n" * 500_000, "E008"),
    "tabs and spaces": (
        b"optimizer tabs\nstate m = 0\nupdate:\n\tm = g\n        p = p - m\n",
        "E108",
    ),
    "tab vs spaces": (b"optimizer tabs\nstate m = 0\nupdate:\n\tm = g\n  p = p - m\n", "E108"),
    "tabs only": (b"optimizer tabs\nstate m = 0\nupdate:\n\tm = g\n\tp = p - m\n", "compiled"),
    "tab reads as inside an if": (
        b"optimizer t\noption f = false\nupdate:\n  if f:\n        q = g\n\tp = p - g\n"
        b"  p = p - 0.1 * g\n",
        "E108",
    ),
    "byte order mark": (b"\xef\xbb\xbfoptimizer bom\nupdate:\n  p = p - 0.1 * g\n", "compiled"),
    "literal past float64": (
        b"optimizer big\nhyper lr = 1e400\nupdate:\n  p = p - lr * g\n",
        "E109",
    ),
    "constant overflow": (b"optimizer big\nupdate:\n  p = p - 10^400 * g\n", "E223"),
    "form feed": (b"optimizer ff\n\x0cupdate:\n  p = p -- g\n", "compiled"),
    "line separators": (
        "optimizer ls\nhyper a = 1 \x0c # \u2028 \x1c \x85\nupdate:\n  p = p - zz\n".encode(),
        "E209",
    ),
    "unclosed range": (b"optimizer r\nhyper b = 0.5 in [0, 1\nupdate:\n  p = b * g\n", "E102"),
}


@pytest.mark.parametrize("case", sorted(NASTY))
def test_nasty_inputs(case, tmp_path):
    data, expected = NASTY[case]
    assert outcome(data, tmp_path) == expected


_REPORTING_CLI = """import re, runpy, sys
sys.argv = ["optgen", *sys.argv[1:]]
try:
    runpy.run_module("optgen.cli", run_name="__main__")
except SystemExit as exit:
    code = exit.code
else:
    code = 0
# VmHWM starts anew at exec; ru_maxrss keeps the forking parent's
with open("/proc/self/status") as status:
    print("peak_kb", re.search(r"VmHWM:\\s+(\\d+)", status.read()).group(1), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("case", ["20000 unary minus", "10 MB spec", "nul bytes"])
def test_nasty_inputs_in_a_fresh_process_are_bounded(case, tmp_path):
    """The real command: exit 1, no traceback, within 60 s and 2 GB, nothing written."""
    spec, out = tmp_path / "fuzz.spec", tmp_path / "out.mlir"
    spec.write_bytes(NASTY[case][0])
    # The child reports its own peak memory: RUSAGE_CHILDREN is the largest of every child so
    # far (another test's 8-device subprocess made this one fail), and a child's own ru_maxrss
    # starts from the pytest process it was forked from.
    proc = subprocess.run(
        [sys.executable, "-c", _REPORTING_CLI, "compile", str(spec), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    *lines, peak = proc.stderr.splitlines()
    stderr = "\n".join(lines)
    assert proc.returncode == 1 and "Traceback" not in stderr and not out.exists(), stderr
    assert f"error[{NASTY[case][1]}]" in lines[0]
    assert int(peak.removeprefix("peak_kb ")) < 2 << 20
