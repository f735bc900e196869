"""Regularized evolution over specs (Real et al. 2019), with a funnel of tasks and deduplication.

Each round draws one child per local device: a tournament of ``tournament`` members of the
population picks the fittest as parent, the parent is mutated (``mutate.py``) until the child
is a program not seen before (``program.py``), and the children are scored task by task
(``evaluate.py``), each on its own device. A child reaches the next task only while its score
so far is in the best ``PROMOTE`` fraction of those that reached it (or beats the seed spec):
cheap tasks filter, expensive ones confirm. Children join the population and the oldest
members leave. A candidate's fitness is the mean over its tasks of log(its loss / the seed
spec's loss), each loss the best over the learning-rate grid: lower is better, 0 is the seed.

Every random choice of child ``i`` comes from a generator seeded by (seed, i), and every
decision reads only the log, so a search resumed from its log ends as an uninterrupted one.
"""

from __future__ import annotations

import collections
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from optgen.diagnostics import SpecError
from optgen.search import log
from optgen.search.budget import Budget
from optgen.search.evaluate import Prepared, best_loss, launch, log_ratio
from optgen.search.mutate import mutate, parse_text
from optgen.search.program import Program, load, program_of

PROMOTE = 0.3  # the fraction of candidates at a task that go on to the next
EVOLVE_SHARE = 0.85  # of a time budget; the rest simplifies and validates the winners
_EDIT_COUNTS = (1, 1, 1, 2, 3)
_MAX_REDRAWS = 100


@dataclass
class Candidate:
    index: int
    parent: int | None
    text: str
    digest: str
    edits: list[str]
    losses: dict[str, list] = field(default_factory=dict)  # task -> [best loss, learning rate]
    stage_scores: list[float] = field(default_factory=list)  # the fitness after each task
    batch: int = 0
    elapsed: float = 0.0
    duplicates: int = 0
    device: int = 0  # the id of the device it was scored on

    @property
    def fitness(self) -> float:
        return self.stage_scores[-1]

    def record(self) -> dict:
        return dict(self.__dict__)


class Evolution:
    """The search state: population, seen programs and funnel history, rebuilt from a log."""

    def __init__(self, settings: dict, tasks: list[Prepared], out: Path, devices=None):
        self.settings, self.tasks, self.out = settings, tasks, out
        self.devices = devices or jax.local_devices()
        self.programs = out / "programs"
        self.programs.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "log.jsonl"
        self.candidates: list[Candidate] = []
        self.population: collections.deque[int] = collections.deque()
        self.seen: set[str] = set()
        self.history: list[list[float]] = [[] for _ in tasks]
        self.baseline: dict[str, float] = {}
        self._resume()

    # ---- the log ----------------------------------------------------------------------------

    def _resume(self) -> None:
        logged, records = log.read(self.log_path)
        if logged is None:
            log.start(self.log_path, self.settings)
        else:
            if logged != self.settings:
                changed = sorted(k for k in self.settings if logged.get(k) != self.settings[k])
                raise SpecError(
                    f"'{self.out}' holds a search with other settings ({', '.join(changed)})",
                    hint="resume with the same settings, or give --out a new folder",
                    code="E021",
                )
            # a batch is logged whole or not used
            sizes = collections.Counter(r["batch"] for r in records)
            complete = [
                r for r in records if r["batch"] == 0 or sizes[r["batch"]] == len(self.devices)
            ]
            log.start(self.log_path, self.settings, kept=len(complete))
            for record in complete:
                self._admit(Candidate(**record))
        if not self.candidates:
            self._admit(self._evaluate_seed(), write=True)

    def _admit(self, child: Candidate, write: bool = False) -> None:
        if write:
            log.append(self.log_path, child.record())
        if child.index == 0:
            self.baseline = {task: losses[0] for task, losses in child.losses.items()}
        self.candidates.append(child)
        self.seen.add(child.digest)
        self.population.append(child.index)
        if len(self.population) > self.settings["population"]:
            self.population.popleft()
        for stage, score in enumerate(child.stage_scores[: len(self.tasks) - 1]):
            # its score on reaching the next task, promoted or not
            self.history[stage + 1].append(score)

    def _evaluate_seed(self) -> Candidate:
        program = program_of(self.settings["seed_text"])
        seed = Candidate(0, None, program.text, program.digest, [])
        opt = load(program, self.programs)
        for prepared in self.tasks:
            loss, lr = best_loss(
                launch(opt, prepared, self.settings["learning_rates"], self.settings["seeds"])
            )
            if not np.isfinite(loss):
                raise SpecError(
                    f"the seed spec diverges on '{prepared.task.name}' at every learning rate of "
                    "the grid",
                    hint="a task the seed spec cannot train gives the search no baseline",
                    code="E399",
                )
            seed.losses[prepared.task.name] = [loss, self.settings["learning_rates"][lr]]
            seed.stage_scores.append(0.0)
        return seed

    # ---- one round -------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        return self.candidates[-1].elapsed

    @property
    def evaluated(self) -> int:
        return len(self.candidates) - 1

    def best(self) -> Candidate:
        return min(self.candidates, key=lambda c: (-len(c.stage_scores), c.fitness, c.index))

    def done(self, budget: Budget) -> bool:
        if budget.candidates is not None:
            return self.evaluated >= budget.candidates
        return self.elapsed >= budget.seconds * EVOLVE_SHARE

    def round(self, clock_offset: float, started: float) -> list[Candidate]:
        """Draw, score and log one child per device."""
        batch = self.candidates[-1].batch + 1
        children = [self._draw(self.evaluated + 1 + j, batch) for j in range(len(self.devices))]
        for j, child in enumerate(children):
            child.device = j  # child j of a round runs on device j, every task of it
        self._score(children)
        elapsed = clock_offset + time.monotonic() - started
        for child in children:
            child.elapsed = elapsed
            self._admit(child, write=True)
        return children

    def _draw(self, index: int, batch: int) -> Candidate:
        rng = random.Random(self.settings["seed"] * 1_000_003 + index)
        duplicates = 0
        while True:
            members = rng.sample(
                list(self.population), min(self.settings["tournament"], len(self.population))
            )
            parent = min((self.candidates[m] for m in members), key=lambda c: (c.fitness, c.index))
            mutant = mutate(parse_text(parent.text), rng, rng.choice(_EDIT_COUNTS))
            program = program_of(mutant.text)
            if program.digest not in self.seen:
                self.seen.add(program.digest)
                return Candidate(
                    index,
                    parent.index,
                    program.text,
                    program.digest,
                    list(mutant.edits),
                    batch=batch,
                    duplicates=duplicates,
                )
            duplicates += 1
            if duplicates > _MAX_REDRAWS:
                raise SpecError(
                    f"{_MAX_REDRAWS} mutants in a row were programs already seen",
                    hint="the search space around this seed spec is exhausted; try another "
                    "--seed-spec",
                    code="E019",
                )

    def _score(self, children: list[Candidate]) -> None:
        alive = list(children)
        optimizers = {c.index: load(Program(c.text, c.digest), self.programs) for c in children}
        for stage, prepared in enumerate(self.tasks):
            if stage:
                alive = [c for c in alive if self._promoted(stage, c.fitness)]
            pending = [
                (
                    c,
                    launch(
                        optimizers[c.index],
                        prepared,
                        self.settings["learning_rates"],
                        self.settings["seeds"],
                        self.devices[c.device],
                    ),
                )
                for c in alive
            ]
            name = prepared.task.name
            for child, losses in pending:
                loss, lr = best_loss(losses)
                child.losses[name] = [loss, self.settings["learning_rates"][lr]]
                ratios = [log_ratio(child.losses[t][0], self.baseline[t]) for t in child.losses]
                child.stage_scores.append(float(np.mean(ratios)))

    def _promoted(self, stage: int, score: float) -> bool:
        earlier = self.history[stage]
        if score < 0:
            return True
        return score <= (np.quantile(earlier, PROMOTE) if len(earlier) >= 10 else 0.05)

    # ---- scoring outside the funnel ---------------------------------------------------------

    def score_everywhere(self, text: str) -> tuple[Program, dict, float]:
        """A program's losses and fitness on every task (for simplification)."""
        program = program_of(text)
        opt = load(program, self.programs)
        losses = {}
        for prepared in self.tasks:
            loss, lr = best_loss(
                launch(opt, prepared, self.settings["learning_rates"], self.settings["seeds"])
            )
            losses[prepared.task.name] = [loss, self.settings["learning_rates"][lr]]
        return (
            program,
            losses,
            float(np.mean([log_ratio(losses[t][0], self.baseline[t]) for t in losses])),
        )
