"""``optgen opt``: run passes over IR text, as ``mlir-opt`` and ``xdsl-opt`` do.

IR text in (a file or standard input), IR text out: every function in the input goes
through the pipeline and is printed again. With
:class:`~optgen.transforms.TransformOptions` (``--with clipnorm=1.0``), the functions are a
program as ``optgen compile --emit ir`` prints it (update, init, and the outputs' function if
any), and the options every spec takes rewrite it first. With
``split=True`` the input is cut at lines starting with ``// -----`` and each piece is handled on
its own (the golden files in ``tests/golden`` hold many cases that way). Every mistake in the
input is a SpecError located at its line: E030-E031 reading it, E032 text the parser cannot read,
E033 IR that does not verify, E035 a piece that is not a program where options need one.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable

from optgen.diagnostics import Source, Span, SpecError, decode_source
from optgen.ir import IRError, Program, parse_functions, print_function
from optgen.passes import run_pipeline
from optgen.transforms import TransformOptions

SPLIT_MARKER = "// -----"
_SPLIT = re.compile(r"^// -----.*$", re.M)


def read_ir(path: str) -> Source:
    """The text of an IR file, or of standard input when ``path`` is ``-``."""
    name = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as file:
                data = file.read()
    except OSError as err:
        raise SpecError(
            f"cannot read '{name}': {err.strerror or err}",
            hint="give the path of an IR file (optgen compile SPEC --emit ir writes one), or - "
            "for standard input",
            code="E030",
        ) from None
    return decode_source(
        data, name, hint="IR text is what optgen compile --emit ir prints", code="E031"
    )


def optimize_source(
    source: Source,
    passes: Iterable[str],
    split: bool = False,
    transform_options: TransformOptions = TransformOptions(),
) -> str:
    """The text of every function in ``source`` after ``transform_options``'s transforms and
    ``passes``; with ``split``, each piece between ``// -----`` lines separately, the results
    joined by ``// -----``.
    """
    passes = tuple(passes)
    pieces = _pieces(source.text) if split else [(1, source.text)]
    results = [
        _optimize_piece(source, text, first_line, passes, transform_options)
        for first_line, text in pieces
    ]
    return f"{SPLIT_MARKER}\n".join(results)


def _pieces(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each piece between split markers."""
    starts = [0] + [marker.end() + 1 for marker in _SPLIT.finditer(text)]
    ends = [marker.start() for marker in _SPLIT.finditer(text)] + [len(text)]
    return [
        (text.count("\n", 0, start) + 1, text[start:end])
        for start, end in zip(starts, ends, strict=True)
    ]


def _optimize_piece(
    source: Source,
    text: str,
    first_line: int,
    passes: tuple[str, ...],
    transform_options: TransformOptions,
) -> str:
    funcs = _parse(source, text, first_line)
    if transform_options.settings:
        if len(funcs) not in (2, 3):
            header = first_line + next(
                i for i, line in enumerate(text.splitlines()) if line.lstrip().startswith("func")
            )
            raise SpecError(
                f"--with rewrites a program, but this piece holds {len(funcs)} "
                f"function{'s' if len(funcs) != 1 else ''}",
                source,
                Span(header, 1, header, len(source.line_text(header)) + 1),
                code="E035",
                hint="give the update function, then the init function (and the outputs' "
                "function, if any), as optgen compile --emit ir prints them",
            )
        program = transform_options.apply(
            Program(funcs[0], funcs[1], derived=funcs[2] if len(funcs) == 3 else None)
        )
        funcs = [f for f in (program.update, program.init, program.derived) if f is not None]
    return "\n".join(print_function(run_pipeline(func, passes)) for func in funcs)


def _parse(source: Source, text: str, first_line: int):
    """The piece's functions; an IRError becomes a located SpecError."""
    try:
        return parse_functions(text, first_line)
    except IRError as err:
        span = (
            Span(err.line, err.col, err.line, err.col + err.width) if err.line is not None else None
        )
        if err.op is not None:  # parsed, but an op's type or operands do not verify
            raise SpecError(
                err.message,
                source,
                span,
                code="E033",
                hint="every op's operands, kinds and extents follow the op table (optgen/ops.py)",
            ) from None
        raise SpecError(
            err.message,
            source,
            span,
            code="E032",
            hint="each line is 'func @name(%x: extent, ...) {', '%N = opcode operands : extent', "
            "'return name = %N, ...' or '}', as optgen compile --emit ir prints",
        ) from None
