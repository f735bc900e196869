"""Atomic file writes: a temporary file in the target's folder, then a rename.

A reader sees the old file or the new one, never a part; on any error the old file
is left as it was and the temporary file is removed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from optgen.diagnostics import SpecError


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically; a missing folder is a SpecError naming it."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise SpecError(f"cannot write '{target}': folder '{folder}' does not exist",
                        hint=f"create it first (mkdir -p {folder})")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
