"""``--budget``: how long a search runs, as time (``90s``, ``30m``, ``2h``) or a count of programs
(``400c``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from optgen.diagnostics import SpecError

_UNITS = {"s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class Budget:
    seconds: float | None = None  # wall time, evolution plus simplification and validation
    candidates: int | None = None  # distinct programs evaluated, the seed spec not counted

    def __str__(self) -> str:
        return f"{self.candidates}c" if self.candidates is not None else f"{self.seconds:g}s"


def parse_budget(text: str) -> Budget:
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhc])\s*", text)
    if not match or float(match.group(1)) <= 0 or (match.group(2) == "c" and "." in match.group(1)):
        raise SpecError(
            f"--budget takes a time or a count of programs, got '{text}'",
            hint="for example --budget 30m, --budget 90s, --budget 2h, or --budget 400c (400 "
            "distinct programs)",
            code="E020",
        )
    amount, unit = match.groups()
    return (
        Budget(candidates=int(amount))
        if unit == "c"
        else Budget(seconds=float(amount) * _UNITS[unit])
    )
