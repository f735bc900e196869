"""What a search leaves in ``--out``: ranked specs, a CSV of every candidate, a summary, a plot.

Every file is written atomically (``optgen.atomic``): a reader never sees half of one.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from optgen.atomic import write_atomic
from optgen.search.evolve import Candidate
from optgen.search.validate import Result, beats

RANKED = 10


def ranked(candidates: list[Candidate]) -> list[Candidate]:
    """Candidates scored on every task first (by fitness), then the rest (by fitness)."""
    stages = max(len(c.stage_scores) for c in candidates)
    return sorted(candidates, key=lambda c: (len(c.stage_scores) < stages, c.fitness, c.index))


def write_candidates(out: Path, candidates: list[Candidate], tasks: list[str]) -> None:
    """``results.csv`` (every candidate) and ``ranked/rank01.spec`` ... (the best ``RANKED``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["rank", "index", "parent", "digest", "fitness", "tasks_scored", "uses_sign",
                     *(f"{t}_loss" for t in tasks), *(f"{t}_lr" for t in tasks), "edits"])
    for rank, c in enumerate(ranked(candidates), 1):
        writer.writerow([rank, c.index, c.parent, c.digest, f"{c.fitness:.4f}", len(c.stage_scores), uses_sign(c.text),
                         *(f"{c.losses[t][0]:.6g}" if t in c.losses else "" for t in tasks),
                         *(c.losses[t][1] if t in c.losses else "" for t in tasks), " | ".join(c.edits)])
    write_atomic(out / "results.csv", buffer.getvalue())
    (out / "ranked").mkdir(exist_ok=True)
    for rank, c in enumerate(ranked(candidates)[:RANKED], 1):
        header = f"# rank {rank}: candidate {c.index}, fitness {c.fitness:.4f} (mean log loss ratio to the seed spec)\n"
        write_atomic(out / "ranked" / f"rank{rank:02d}.spec", header + c.text)


def uses_sign(text: str) -> bool:
    """Whether the update takes a sign (a Lion- or signSGD-like step)."""
    return "sign(" in text.split("update:", 1)[-1]


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


def validation_table(table: dict[str, dict[str, Result]], baseline_label: str) -> tuple[str, list[str]]:
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
                mark = " (better)" if beats(row[t], table[baseline_label][t]) else \
                    " (worse)" if beats(table[baseline_label][t], row[t]) else ""
            cells.append(f"{row[t].mean:.4g} ± {row[t].std:.2g} @ {row[t].learning_rate:g}{mark}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if label != baseline_label:
            wins = [beats(row[t], table[baseline_label][t]) for t in tasks]
            losses = [beats(table[baseline_label][t], row[t]) for t in tasks]
            if any(wins) and not any(losses):
                better.append(label)
    return "\n".join(lines) + "\n", better


def write_summary(out: Path, summary: dict, markdown: str) -> None:
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    write_atomic(out / "summary.md", markdown)
