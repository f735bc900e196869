"""The last step of a search: remove each statement of a winner whose removal does not hurt its
score.
"""

from __future__ import annotations

import time
from dataclasses import replace

from optgen import syntax as ast
from optgen.diagnostics import SpecError
from optgen.search.evolve import Evolution
from optgen.search.mutate import parse_text
from optgen.search.program import Program, program_of

TOLERANCE = 0.01  # a removal may worsen the fitness (a mean log loss ratio) by this much: ~1% loss


def simplify(
    evolution: Evolution, text: str, fitness: float, deadline: float | None = None
) -> tuple[str, float, dict]:
    """Remove update statements one at a time (with a state's declaration when its last assignment
    goes), keeping a removal when the program compiles to the same IR (dead code, free) or scores
    within ``TOLERANCE`` of its starting fitness over the tasks; repeat until no statement can go
    or ``deadline`` (``time.monotonic()``) passes."""
    digest, losses, limit = program_of(text).digest, {}, fitness + TOLERANCE
    while True:
        shorter = _removals(text)
        free = next((t for t, program in shorter if program.digest == digest), None)
        if free is not None:
            text = free
            continue
        for candidate, program in shorter:
            if deadline is not None and time.monotonic() > deadline:
                return text, fitness, losses
            _, new_losses, new_fitness = evolution.score_everywhere(candidate)
            if new_fitness <= limit:
                text, fitness, losses, digest = candidate, new_fitness, new_losses, program.digest
                break
        else:
            return text, fitness, losses


def _removals(text: str) -> list[tuple[str, Program]]:
    """Every valid program with one update statement fewer (and the state it alone assigned)."""
    spec = parse_text(text)
    valid = []
    for i, stmt in enumerate(spec.body):
        body = spec.body[:i] + spec.body[i + 1 :]
        target = stmt.target.id if isinstance(stmt, ast.Assign) else None
        still_assigned = any(isinstance(s, ast.Assign) and s.target.id == target for s in body)
        states = (
            spec.states if still_assigned else tuple(s for s in spec.states if s.name.id != target)
        )
        shorter = ast.format_source(replace(spec, body=body, states=states))
        try:
            valid.append((shorter, program_of(shorter)))
        except SpecError:
            continue  # e.g. the only assignment of p, or a state read elsewhere
    return valid
