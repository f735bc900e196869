"""Diagnostics that point at the spec: ``file:line:col: error: ...``, the line, a caret, a hint.

Every user mistake, at any stage, becomes a :class:`Diagnostic` with a stable code
from :mod:`optgen.errors`: a :class:`SpecError` for a mistake in a spec
(``bad.spec:3:5: error[E209]: unknown name 'x'``), an :class:`InputError` (also a
``ValueError``) for a wrong value given at run time (parameter trees, hyperparameters,
saved state). The CLI prints ``render()`` and exits with status 1; the Python API raises
it. No stage lets a Python traceback reach a user for something the user wrote.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A region of a spec file; lines and columns count from 1, ``end_col`` is exclusive."""

    line: int
    col: int
    end_line: int
    end_col: int

    def to(self, other: Span) -> Span:
        """The span from the start of ``self`` to the end of ``other``."""
        return Span(self.line, self.col, other.end_line, other.end_col)


@dataclass(frozen=True)
class Source:
    """The text of a spec and the name it is reported under."""

    text: str
    filename: str

    def line_text(self, line: int) -> str:
        # Lines end at "\n" only, as the lexer counts them (str.splitlines also splits at \f, \x1c,
        # ...).
        lines = self.text.split("\n")
        return lines[line - 1].rstrip("\r") if 0 < line <= len(lines) else ""


class Diagnostic(Exception):
    """A user mistake, explained: a catalog code, a message, the place (a spec's text, when
    there is one) and a hint. :class:`SpecError` and :class:`InputError` are its two kinds.
    """

    def __init__(
        self,
        message: str,
        source: Source | None = None,
        span: Span | None = None,
        hint: str | None = None,
        *,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.source = source
        self.span = span
        self.hint = hint
        self.code = code  # a key of optgen.errors.CATALOG; "W..." codes are warnings

    def render(self) -> str:
        """``file:line:col: error[CODE]: message``, the source line, a caret, and the hint."""
        severity = "warning" if self.code and self.code.startswith("W") else "error"
        label = f"{severity}[{self.code}]" if self.code else severity
        if self.source is None or self.span is None:
            where = f"{self.source.filename}: " if self.source else ""
            out = [f"{where}{label}: {self.message}"]
        else:
            # Control characters (NUL, escapes) print as '?', one for one, so the caret stays
            # aligned.
            line = "".join(
                ch if ch.isprintable() or ch == "\t" else "?"
                for ch in self.source.line_text(self.span.line)
            )
            col = self.span.col
            width = (
                self.span.end_col - col
                if self.span.end_line == self.span.line
                else len(line) - col + 1
            )
            # Tabs keep their width in the caret line so the caret lines up in a terminal.
            pad = "".join(ch if ch == "\t" else " " for ch in line[: col - 1])
            out = [
                f"{self.source.filename}:{self.span.line}:{col}: {label}: {self.message}",
                f"  {line}",
                f"  {pad}^{'~' * max(width - 1, 0)}",
            ]
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


class SpecError(Diagnostic):
    """A mistake in a spec (or in how it is compiled), located in the spec's text."""


class InputError(Diagnostic, ValueError):
    """A wrong value given to an optimizer at run time: a parameter tree, a hyperparameter,
    saved state. Raised before anything is computed or donated; names the leaf and what
    was expected."""


class SpecWarning(UserWarning):
    """A hazard the checker sees in an accepted spec (``W`` codes), e.g. sqrt of a value that
    can be negative. ``check_spec`` issues it through :mod:`warnings`; the CLI prints it."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """A 'did you mean' hint naming the closest candidate, or None when nothing is close."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def decode_source(data: bytes, name: str, *, hint: str, code: str) -> Source:
    """``data`` as UTF-8 text named ``name``; other bytes are a SpecError that gives the line of
    the first bad byte, with ``hint`` and ``code``."""
    try:
        return Source(data.decode("utf-8"), name)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SpecError(
            f"'{name}' is not UTF-8 text (bad byte at line {line})", hint=hint, code=code
        ) from None
