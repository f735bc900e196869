"""The search log: one JSON object a line, appended and flushed per candidate, read back to resume.

The first line holds the settings; each later line is one evaluated candidate. A line cut
short by a kill is ignored when the log is read, so a killed search resumes from its last
whole candidate.
"""

from __future__ import annotations

import json
from pathlib import Path

from optgen.atomic import append_durably, write_atomic
from optgen.diagnostics import SpecError


def read(path: Path) -> tuple[dict | None, list[dict]]:
    """The settings and the candidates in the log at ``path`` (``(None, [])`` when there
    is none).
    """
    if not path.exists():
        return None, []
    records = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # the last line of a killed search: drop it and what follows
    if not records or "settings" not in records[0]:
        raise SpecError(
            f"'{path}' is not an optgen search log",
            hint="give --out a new folder, or the folder of an earlier search to resume it",
            code="E021",
        )
    return records[0]["settings"], records[1:]


def start(path: Path, settings: dict, kept: int | None = None) -> None:
    """Begin the log with ``settings``, or cut a resumed log back to its whole lines."""
    if kept is None:
        write_atomic(path, json.dumps({"settings": settings}) + "\n")
        return
    with open(path, "rb") as file:
        lines = file.read().split(b"\n")
    write_atomic(path, b"\n".join(lines[: kept + 1]) + b"\n")


def append(path: Path, record: dict) -> None:
    append_durably(path, json.dumps(record) + "\n")
