"""A candidate program: its spec text, checked and compiled, with the hash that deduplicates it.

Two specs that compile to the same optimized IR (the pass pipeline canonicalizes algebra:
constants fold, common subexpressions merge, dead statements vanish) with the same
hyperparameter defaults are one program, whatever their text.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import optgen
from optgen.atomic import write_atomic
from optgen.checker import check
from optgen.ir import print_program
from optgen.parser import parse

_LOCATION = re.compile(r' loc\("[^"]*":\d+:\d+\)')


@dataclass(frozen=True)
class Program:
    text: str
    digest: str


def program_of(text: str) -> Program:
    """Check and compile ``text`` and hash its optimized IR (source locations left out) and its
    hyperparameter defaults other than the learning rate, which the search tunes."""
    checked = check(parse(text, "candidate.spec"))
    defaults = sorted((k, v) for k, v in checked.hypers.items() if k != "learning_rate")
    return Program(text, hashlib.sha256(f"{_ir(checked)}\n{defaults!r}".encode()).hexdigest()[:16])


def program_ir(text: str) -> str:
    """The optimized IR of a spec text, without source locations."""
    return _ir(check(parse(text, "candidate.spec")))


def _ir(checked) -> str:
    return _LOCATION.sub("", print_program(optgen.compile_checked(checked).program))


def load(program: Program, folder: Path):
    """The program as an optimizer, from a file named by its hash (``optgen.load`` reads files)."""
    path = folder / f"{program.digest}.spec"
    if not path.exists():
        write_atomic(path, program.text)
    # mutants may take sqrt of a negative value: their score says so
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optgen.SpecWarning)
        return optgen.load(str(path))
