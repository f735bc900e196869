"""What a search leaves in ``--out``: ranked specs, a CSV of every candidate, a summary, a plot.

Every file is written atomically (``optgen.atomic``): a reader never sees half of one.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import re
from pathlib import Path

from optgen.atomic import write_atomic
from optgen.search.evolve import Candidate, Evolution
from optgen.search.program import program_ir
from optgen.search.validate import SEEDS as VALIDATION_SEEDS
from optgen.search.validate import Result, beats

RANKED = 10
_SIGN_OP = re.compile(r"= sign ")


def ranked(candidates: list[Candidate]) -> list[Candidate]:
    """Candidates scored on every task first (by fitness), then the rest (by fitness)."""
    stages = max(len(c.stage_scores) for c in candidates)
    return sorted(candidates, key=lambda c: (len(c.stage_scores) < stages, c.fitness, c.index))


def write_candidates(out: Path, candidates: list[Candidate], tasks: list[str]) -> None:
    """``results.csv`` (every candidate) and ``ranked/rank01.spec`` ... (the best ``RANKED``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "rank",
            "index",
            "parent",
            "digest",
            "fitness",
            "tasks_scored",
            "uses_sign",
            *(f"{t}_loss" for t in tasks),
            *(f"{t}_lr" for t in tasks),
            "edits",
        ]
    )
    for rank, c in enumerate(ranked(candidates), 1):
        writer.writerow(
            [
                rank,
                c.index,
                c.parent,
                c.digest,
                f"{c.fitness:.4f}",
                len(c.stage_scores),
                uses_sign(c.text),
                *(f"{c.losses[t][0]:.6g}" if t in c.losses else "" for t in tasks),
                *(c.losses[t][1] if t in c.losses else "" for t in tasks),
                " | ".join(c.edits),
            ]
        )
    write_atomic(out / "results.csv", buffer.getvalue())
    (out / "ranked").mkdir(exist_ok=True)
    for rank, c in enumerate(ranked(candidates)[:RANKED], 1):
        header = (
            f"# rank {rank}: candidate {c.index}, fitness {c.fitness:.4f} (mean log loss ratio to "
            "the seed spec)\n"
        )
        write_atomic(
            out / "ranked" / f"rank{rank:02d}.spec", header + renamed(c.text, f"candidate{c.index}")
        )


def renamed(text: str, name: str) -> str:
    """A candidate's spec text under its own optimizer name (candidates keep the seed spec's
    while searching: the name is part of the IR their hash is taken from)."""
    return re.sub(
        r"^optimizer [A-Za-z_][A-Za-z0-9_]*", f"optimizer {name}", text, count=1, flags=re.M
    )


@functools.lru_cache(maxsize=4096)
def uses_sign(text: str) -> bool:
    """Whether the optimized update takes a sign (a Lion- or signSGD-like step): read from the IR
    after the passes, so a sign in dead code does not count."""
    return _SIGN_OP.search(program_ir(text)) is not None


def write_plot(out: Path, candidates: list[Candidate]) -> bool:
    """``progress.png``: the best fitness so far against time; False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot

    full = max(len(c.stage_scores) for c in candidates)
    times, best, current = [], [], math.inf
    for c in candidates:
        if len(c.stage_scores) == full and c.fitness < current:
            current = c.fitness
        times.append(c.elapsed / 60)
        best.append(current)
    figure, axes = pyplot.subplots(figsize=(6, 3.5))
    axes.step(times, best, where="post")
    axes.set_xlabel("minutes")
    axes.set_ylabel("best fitness (mean log loss ratio to seed)")
    axes.axhline(0, color="gray", lw=0.5)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot.close(figure)
    write_atomic(out / "progress.png", buffer.getvalue())
    return True


def validation_table(
    table: dict[str, dict[str, Result]], baseline_label: str
) -> tuple[str, list[str]]:
    """A Markdown table of held-out losses (mean ± std over seeds, tuned learning rate), and the
    labels of the winners that beat the baseline on at least one task and lose on none."""
    tasks = list(next(iter(table.values())))
    lines = ["| program | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    better = []
    for label, row in table.items():
        cells = []
        for t in tasks:
            mark = ""
            if label != baseline_label:
                mark = (
                    " (better)"
                    if beats(row[t], table[baseline_label][t])
                    else " (worse)"
                    if beats(table[baseline_label][t], row[t])
                    else ""
                )
            cells.append(f"{row[t].mean:.4g} ± {row[t].std:.2g} @ {row[t].learning_rate:g}{mark}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if label != baseline_label:
            wins = [beats(row[t], table[baseline_label][t]) for t in tasks]
            losses = [beats(table[baseline_label][t], row[t]) for t in tasks]
            if any(wins) and not any(losses):
                better.append(label)
    return "\n".join(lines) + "\n", better


def summarize(
    evolution: Evolution, budget: str, resumed: int, winners: dict, table: dict, plotted: bool
):
    """``summary.json``'s content and ``summary.md``'s text.

    ``winners`` maps labels to (candidate, simplified text, simplified fitness); ``table`` is
    validate()'s, the seed spec's row first.
    """
    settings, candidates = evolution.settings, evolution.candidates[1:]
    seed_spec, tasks = settings["seed_spec"], settings["tasks"]
    minutes = max(evolution.elapsed, 1e-9) / 60
    signed = [c for c in ranked(candidates) if uses_sign(c.text)] if candidates else []
    markdown_table, better = validation_table(table, seed_spec)
    summary = {
        "settings": {k: v for k, v in settings.items() if k != "seed_text"},
        "budget": budget,
        "candidates": len(candidates),
        "resumed_after": resumed,
        "duplicates_redrawn": sum(c.duplicates for c in candidates),
        "candidates_per_minute": round(len(candidates) / minutes, 2),
        "scored_on_every_task": sum(len(c.stage_scores) == len(tasks) for c in candidates),
        "using_sign": len(signed),
        "best_using_sign": signed
        and {
            "candidate": signed[0].index,
            "fitness": signed[0].fitness,
            "tasks_scored": len(signed[0].stage_scores),
            "edits": signed[0].edits,
        },
        "winners": {
            k: {
                "candidate": c.index,
                "fitness": c.fitness,
                "simplified_fitness": f,
                "edits": c.edits,
            }
            for k, (c, _, f) in winners.items()
        },
        "held_out": {
            label: {t: r.__dict__ for t, r in row.items()} for label, row in table.items()
        },
        "beat_baseline": better,
        "plot": plotted,
    }
    sign_note = signed and (
        f" (the best of them: candidate {signed[0].index}, fitness {signed[0].fitness:+.3f} on "
        f"{len(signed[0].stage_scores)} of {len(tasks)} tasks)"
    )
    verdict = (
        f"Beat tuned {seed_spec} on the held-out tasks (better on at least one, worse on none, "
        f"beyond the spread over seeds): {', '.join(better)}."
        if better
        else f"Nothing beat tuned {seed_spec} on the held-out tasks: no winner was better on a "
        "task without being worse on another, beyond the spread over seeds."
    )
    markdown = (
        f"# optgen search from {seed_spec}\n\n{len(candidates)} distinct programs "
        f"({summary['candidates_per_minute']} a minute, {summary['duplicates_redrawn']} "
        "duplicates redrawn), "
        f"{summary['scored_on_every_task']} scored on every task, {len(signed)} using "
        f"sign(){sign_note or ''}."
        f"\n\nHeld-out loss, mean ± std over {len(VALIDATION_SEEDS)} seeds @ tuned learning "
        "rate:\n\n"
        f"{markdown_table}\n{verdict}\n"
    )
    return summary, markdown


def write_summary(out: Path, summary: dict, markdown: str) -> None:
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    write_atomic(out / "summary.md", markdown)
