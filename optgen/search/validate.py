"""Winners against the seed spec (AdamW) on held-out tasks, each tuned on the same learning-rate
grid.

A held-out task is a built-in task drawn anew (``variant=1``: new data, new teacher, new
conditioning) and trained from new seeds; a user task is its own held-out split. For each
program and task the learning rate with the lowest mean held-out loss over the seeds is
kept, and its mean and standard deviation over the seeds are reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optgen.search.evaluate import launch, prepare
from optgen.search.program import load, program_of
from optgen.search.tasks import BUILTIN, load_task

SEEDS = (100, 101, 102, 103)


@dataclass(frozen=True)
class Result:
    mean: float
    std: float
    learning_rate: float


def held_out_tasks(names: list[str]):
    return [prepare(load_task(name, variant=1 if name in BUILTIN else 0)) for name in names]


def validate(
    texts: dict[str, str], tasks, learning_rates, programs_folder
) -> dict[str, dict[str, Result]]:
    """``{program label: {task: Result}}`` for every spec text in ``texts``."""
    table = {}
    for label, text in texts.items():
        opt = load(program_of(text), programs_folder)
        row = {}
        for prepared in tasks:
            losses = np.asarray(launch(opt, prepared, learning_rates, SEEDS), np.float64)
            means = np.where(np.isfinite(losses).all(axis=1), losses.mean(axis=1), np.inf)
            best = int(np.argmin(means))
            row[prepared.task.name] = Result(
                float(means[best]), float(losses[best].std()), learning_rates[best]
            )
        table[label] = row
    return table


def beats(winner: Result, baseline: Result) -> bool:
    """Lower mean held-out loss by more than the two spreads over seeds together."""
    return winner.mean + winner.std < baseline.mean - baseline.std
