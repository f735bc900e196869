"""``optgen search`` end to end: evolve, simplify the winners, validate them, write the results."""

from __future__ import annotations

import sys
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
from optgen.search.simplify import simplify
from optgen.search.tasks import load_task
from optgen.search.validate import SEEDS as VALIDATION_SEEDS, held_out_tasks, validate

SIMPLIFY_SHARE = 0.93  # of a time budget: simplification ends here, validation takes the rest


def settings_for(seed_spec: str, tasks: list[str], population: int, tournament: int, seed: int) -> dict:
    """What a search's result depends on (the log's first line; a resumed search must match it)."""
    text = read_spec(seed_spec).text
    program_of(text)  # the seed spec must check and compile before any task is built
    if "learning_rate" not in check_spec(seed_spec).hypers:
        raise SpecError(f"the seed spec '{seed_spec}' has no hyperparameter learning_rate",
                        hint="the search tunes learning_rate over a grid; start from a spec that declares it",
                        code="E022")
    return {"seed_spec": seed_spec, "seed_text": text, "tasks": tasks, "population": population,
            "tournament": tournament, "seed": seed, "devices": len(jax.local_devices()),
            "learning_rates": list(LEARNING_RATES), "seeds": list(SEEDS)}


def search(seed_spec: str, tasks: list[str], budget: Budget, out: Path, population: int = 32,
           tournament: int = 8, seed: int = 0, progress: bool = True, winners: int = 3) -> dict:
    """Run (or resume) a search into ``out``; returns the summary written to ``out/summary.json``.

    The best ``winners`` programs are simplified and validated on held-out tasks against the seed spec.
    """
    settings = settings_for(seed_spec, tasks, population, tournament, seed)
    prepared = [prepare(load_task(name)) for name in tasks]
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    evolution = Evolution(settings, prepared, out)
    offset = evolution.elapsed
    resumed = evolution.evaluated
    bar = _progress(budget, evolution, progress)
    while not evolution.done(budget):
        evolution.round(offset, started)
        _advance(bar, budget, evolution)
        if evolution.candidates[-1].batch % 20 == 0:
            report.write_candidates(out, evolution.candidates, tasks)
    if bar is not None:
        bar.close()
    report.write_candidates(out, evolution.candidates, tasks)
    evolved_minutes = max(evolution.elapsed - evolution.candidates[0].elapsed, 1e-9) / 60

    deadline = None if budget.seconds is None else started + budget.seconds * SIMPLIFY_SHARE - offset
    best = {}
    for rank, c in enumerate([c for c in report.ranked(evolution.candidates) if c.index][:winners], 1):
        text, fitness, _ = simplify(evolution, c.text, c.fitness, deadline)
        best[f"winner{rank}"] = (c, text, fitness)
        (out / "winners").mkdir(exist_ok=True)
        write_atomic(out / "winners" / f"winner{rank}.spec",
                            f"# candidate {c.index} (fitness {c.fitness:.4f}), simplified: fitness {fitness:.4f}\n" + text)
    table = validate({seed_spec: settings["seed_text"], **{k: v[1] for k, v in best.items()}},
                     held_out_tasks(tasks), settings["learning_rates"], evolution.programs)
    markdown_table, better = report.validation_table(table, seed_spec)
    plotted = report.write_plot(out, evolution.candidates)
    summary = {
        "settings": {k: v for k, v in settings.items() if k != "seed_text"},
        "budget": str(budget), "candidates": evolution.evaluated, "resumed_after": resumed,
        "duplicates_redrawn": sum(c.duplicates for c in evolution.candidates),
        "candidates_per_minute": round(evolution.evaluated / evolved_minutes, 2),
        "scored_on_every_task": sum(len(c.stage_scores) == len(tasks) for c in evolution.candidates[1:]),
        "using_sign": sum(report.uses_sign(c.text) for c in evolution.candidates[1:]),
        "best_using_sign": next(({"candidate": c.index, "fitness": c.fitness, "tasks_scored": len(c.stage_scores),
                                  "edits": c.edits} for c in report.ranked(evolution.candidates)
                                 if report.uses_sign(c.text)), None),
        "winners": {k: {"candidate": c.index, "fitness": c.fitness, "simplified_fitness": f, "edits": c.edits}
                    for k, (c, _, f) in best.items()},
        "held_out": {label: {t: r.__dict__ for t, r in row.items()} for label, row in table.items()},
        "beat_baseline": better, "plot": plotted,
    }
    verdict = (f"Beat tuned {seed_spec} on held-out tasks (better on at least one, worse on none, "
               f"beyond the spread over seeds): {', '.join(better)}." if better else
               f"Nothing beat tuned {seed_spec} on the held-out tasks (no winner was better on one task "
               f"without being worse on another, beyond the spread over seeds).")
    markdown = (f"# optgen search from {seed_spec}\n\n{summary['candidates']} distinct programs "
                f"({summary['candidates_per_minute']} a minute, {summary['duplicates_redrawn']} duplicates redrawn), "
                f"{summary['scored_on_every_task']} scored on every task, {summary['using_sign']} using sign()"
                f"{_sign_note(summary['best_using_sign'])}.\n\n"
                f"Held-out loss, mean ± std over {len(VALIDATION_SEEDS)} seeds @ tuned learning rate:\n\n"
                f"{markdown_table}\n{verdict}\n")
    report.write_summary(out, summary, markdown)
    return summary


def _sign_note(best: dict | None) -> str:
    if best is None:
        return ""
    return (f" (the best of them: candidate {best['candidate']}, fitness {best['fitness']:+.3f} "
            f"on {best['tasks_scored']} task(s))")


def _progress(budget: Budget, evolution: Evolution, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    total = budget.candidates if budget.candidates is not None else round(budget.seconds * 0.85)
    return tqdm(total=total, unit="cand" if budget.candidates else "s", file=sys.stderr, dynamic_ncols=True,
                initial=min(total, evolution.evaluated if budget.candidates else round(evolution.elapsed)))


def _advance(bar, budget: Budget, evolution: Evolution) -> None:
    if bar is None:
        return
    bar.n = min(bar.total, evolution.evaluated if budget.candidates else round(evolution.elapsed))
    best = evolution.best()
    minutes = max(evolution.elapsed, 1e-9) / 60
    bar.set_postfix_str(f"{evolution.evaluated} progs, {evolution.evaluated / minutes:.1f}/min, "
                        f"best {best.fitness:+.3f} (#{best.index}: {'; '.join(best.edits)[:60]})")

