"""Plot tools/bench.py's results: time per step for each workload and implementation.

    python tools/bench.py --json bench.json --plot docs/bench.png   # run and plot
    python tools/plot_bench.py bench.json docs/bench.png             # plot a saved run

One group of bars per workload, one bar per implementation (optgen, optax, torch's fused
AdamW, the 8-bit and CPU-Adam references), on a log scale: the 8-bit references are tens of
times slower than the others. Each bar is the median time per step over every block of every
process; its whisker spans the processes' own medians. matplotlib is optional
(``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def plot(summaries: list[dict], runs: list[list[dict]], machine: str, path: Path) -> None:
    """Write the bar chart of ``summaries`` (bench.py's rows) to ``path``; ``runs`` per process."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(n for s in summaries for n in s["median_ms"]))
    width = 0.8 / max(len(s["median_ms"]) for s in summaries)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(summaries) + 2), 4.5))
    for name in names:
        xs, medians, spans = [], [], []
        for w, summary in enumerate(summaries):
            if name not in summary["median_ms"]:
                continue
            per_process = _process_medians(runs, w, name)
            present = list(summary["median_ms"])  # each group centred on its own bars
            xs.append(w + (present.index(name) - (len(present) - 1) / 2) * width)
            medians.append(summary["median_ms"][name])
            spans.append([medians[-1] - min(per_process), max(per_process) - medians[-1]])
        ax.bar(xs, medians, width, label=name, yerr=np.array(spans).T, capsize=2)
    ax.set_xticks(range(len(summaries)), [s["workload"] for s in summaries])
    ax.set_yscale("log")
    ax.set_ylabel("ms per step (median; whiskers: per-process medians)")
    ax.set_title(f"AdamW step per workload\n{machine}", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _process_medians(runs: list[list[dict]], workload: int, name: str) -> list[float]:
    return [float(np.median(process[workload]["times_ms"][name])) for process in runs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="tools/bench.py --json output")
    parser.add_argument("png", type=Path, help="where to write the figure")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    plot(data["summaries"], data["runs"], data["machine"], args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
