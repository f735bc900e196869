"""The search's progress bar: programs scored, candidates per minute, the best fitness and its
edits.

tqdm draws it when installed (the ``search`` extra); without tqdm the search runs silently.
"""

from __future__ import annotations

import sys

from optgen.search.budget import Budget
from optgen.search.evolve import EVOLVE_SHARE, Evolution


class Progress:
    def __init__(self, budget: Budget, evolution: Evolution, enabled: bool = True):
        self.budget, self.bar = budget, None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        total = (
            budget.candidates
            if budget.candidates is not None
            else round(budget.seconds * EVOLVE_SHARE)
        )
        self.bar = tqdm(
            total=total,
            unit="prog" if budget.candidates else "s",
            file=sys.stderr,
            dynamic_ncols=True,
            initial=min(total, self._done(evolution)),
        )

    def _done(self, evolution: Evolution) -> int:
        return (
            evolution.evaluated if self.budget.candidates is not None else round(evolution.elapsed)
        )

    def update(self, evolution: Evolution) -> None:
        if self.bar is None:
            return
        self.bar.n = min(self.bar.total, self._done(evolution))
        best = evolution.best()
        minutes = max(evolution.elapsed, 1e-9) / 60
        self.bar.set_postfix_str(
            f"{evolution.evaluated} programs, {evolution.evaluated / minutes:.1f}/min, best "
            f"{best.fitness:+.3f} (#{best.index}: {'; '.join(best.edits)[:60]})"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
