"""The last step of a search: remove each statement of a winner whose removal does not hurt its score."""

from __future__ import annotations

import time
from dataclasses import replace

from optgen.diagnostics import SpecError
from optgen.search.evolve import Evolution
from optgen.search.mutate import parse_text
from optgen.search.program import program_of
from optgen.syntax import format_source

TOLERANCE = 0.01  # a removal may worsen the fitness (a mean log loss ratio) by this much: ~1% loss


def simplify(evolution: Evolution, text: str, fitness: float, deadline: float | None = None) -> tuple[str, float, dict]:
    """Remove update statements one at a time, keeping a removal when the program compiles to the
    same IR (a dead statement) or scores within ``TOLERANCE`` of its starting fitness over the
    tasks; repeat until no statement can go or ``deadline`` (``time.monotonic()``) passes."""
    digest, losses, limit = program_of(text).digest, {}, fitness + TOLERANCE
    removed = True
    while removed:
        removed = False
        spec = parse_text(text)
        for i in range(len(spec.body)):
            if deadline is not None and time.monotonic() > deadline:
                return text, fitness, losses
            shorter = format_source(replace(spec, body=spec.body[:i] + spec.body[i + 1:]))
            try:
                program = program_of(shorter)
            except SpecError:
                continue  # e.g. the statement was the only assignment of p or of a state
            if program.digest == digest:
                text, removed = shorter, True
                break
            _, new_losses, new_fitness = evolution.score_everywhere(shorter)
            if new_fitness <= limit:
                text, fitness, losses, digest, removed = shorter, new_fitness, new_losses, program.digest, True
                break
    return text, fitness, losses
