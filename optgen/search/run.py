"""``optgen search`` end to end: evolve, simplify the winners, validate them, write the results."""

from __future__ import annotations

import time
from pathlib import Path

import jax

from optgen.atomic import write_atomic
from optgen.compiler import check_spec
from optgen.diagnostics import SpecError
from optgen.library import read_spec
from optgen.search import report
from optgen.search.budget import Budget
from optgen.search.evaluate import LEARNING_RATES, SEEDS, prepare
from optgen.search.evolve import Evolution
from optgen.search.program import program_of
from optgen.search.progress import Progress
from optgen.search.simplify import simplify
from optgen.search.tasks import load_task
from optgen.search.validate import held_out_tasks, validate

SIMPLIFY_SHARE = 0.93  # of a time budget: simplification ends here, validation takes the rest


def settings_for(
    seed_spec: str, tasks: list[str], population: int, tournament: int, seed: int
) -> dict:
    """What a search's result depends on (the log's first line; a resumed search must match it)."""
    text = read_spec(seed_spec).text
    program_of(text)  # the seed spec must check and compile before any task is built
    if "learning_rate" not in check_spec(seed_spec).hypers:
        raise SpecError(
            f"the seed spec '{seed_spec}' has no hyperparameter learning_rate",
            hint="the search tunes learning_rate over a grid; start from a spec that declares it",
            code="E022",
        )
    return {
        "seed_spec": seed_spec,
        "seed_text": text,
        "tasks": tasks,
        "population": population,
        "tournament": tournament,
        "seed": seed,
        "devices": len(jax.local_devices()),
        "learning_rates": list(LEARNING_RATES),
        "seeds": list(SEEDS),
    }


def search(
    seed_spec: str,
    tasks: list[str],
    budget: Budget,
    out: Path,
    population: int = 32,
    tournament: int = 8,
    seed: int = 0,
    progress: bool = True,
    winners: int = 3,
) -> dict:
    """Run (or resume) a search into ``out``; returns the summary written to ``out/summary.json``.

    The best ``winners`` programs are simplified and validated on held-out tasks against the
    seed spec.
    """
    settings = settings_for(seed_spec, tasks, population, tournament, seed)
    prepared = [prepare(load_task(name)) for name in tasks]
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    evolution = Evolution(settings, prepared, out)
    offset = evolution.elapsed
    resumed = evolution.evaluated
    bar = Progress(budget, evolution, progress)
    while not evolution.done(budget):
        evolution.round(offset, started)
        bar.update(evolution)
        if evolution.candidates[-1].batch % 20 == 0:
            report.write_candidates(out, evolution.candidates, tasks)
    bar.close()
    report.write_candidates(out, evolution.candidates, tasks)

    deadline = (
        None if budget.seconds is None else started + budget.seconds * SIMPLIFY_SHARE - offset
    )
    simplified = []
    (out / "winners").mkdir(exist_ok=True)
    for rank, c in enumerate(
        [c for c in report.ranked(evolution.candidates) if c.index][:winners], 1
    ):
        text, fitness, _ = simplify(evolution, c.text, c.fitness, deadline)
        simplified.append((c, text, fitness))
        write_atomic(
            out / "winners" / f"winner{rank}.spec",
            f"# candidate {c.index} (fitness {c.fitness:.4f}), simplified: fitness {fitness:.4f}\n"
            + report.renamed(text, f"{seed_spec.replace('/', '_')}_winner{rank}"),
        )
    labels = [f"winner{rank}" for rank in range(1, len(simplified) + 1)]
    table = validate(
        {
            seed_spec: settings["seed_text"],
            **{k: text for k, (_, text, _) in zip(labels, simplified, strict=True)},
        },
        held_out_tasks(tasks),
        settings["learning_rates"],
        evolution.programs,
    )
    summary, markdown = report.summarize(
        evolution,
        str(budget),
        resumed,
        dict(zip(labels, simplified, strict=True)),
        table,
        report.write_plot(out, evolution.candidates),
    )
    report.write_summary(out, summary, markdown)
    return summary
