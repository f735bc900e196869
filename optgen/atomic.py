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
                        hint=f"create it first (mkdir -p {folder})", code="E006")
    if target.is_dir():
        raise SpecError(f"cannot write '{target}': it is a directory", hint="give a file name", code="E007")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise SpecError(f"cannot write '{target}': {err.strerror}", code="E007") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        os.unlink(tmp)
        if isinstance(err, OSError):  # disk full, permissions: the old file is intact
            raise SpecError(f"cannot write '{target}': {err.strerror}", code="E007") from None
        raise
