"""Atomic file writes: a temporary file in the target's folder, then a rename.

A reader sees the old file or the new one, never a part; on any error the old file
is left as it was and the temporary file is removed. What the target is decides how:

- a missing path or a regular file is replaced atomically; an existing file keeps its
  mode (and, where allowed, its owner), a new one gets ``0o666`` less the umask;
- a symlink is followed: its target is written (atomically, as above), the link stays;
- a character device or a FIFO (``/dev/null``, ``/dev/stdout``, a named pipe) is written
  through, as a shell redirection would: it is never replaced by a regular file;
- a block device, a socket or a directory is refused.

``append_durably`` is the one other way optgen writes a file: a log, appended line by line.

Temporary names are short (``.optgen-<16 hex>.<8 hex>.tmp``, whatever the target's
length) and locked while written; a write removes the unlocked ones a killed writer
of the same target left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from optgen.diagnostics import SpecError


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically; a missing folder is a SpecError naming it."""
    with open_atomic(path) as out:
        out.write(data.encode("utf-8") if isinstance(data, str) else data)


def append_durably(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` (whole lines) to ``path`` and ``fsync`` it before returning: a log that a
    kill can cut only inside its last line, which its reader then drops (``optgen search``'s)."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content to; it replaces ``path`` when the block
    ends without an error (and is discarded otherwise). Errors are SpecErrors naming ``path``."""
    shown = os.fspath(path)
    target = Path(os.path.realpath(shown))  # through symlinks: write the file a link points to
    kind = _existing_kind(target, shown)
    if kind == "special":
        with _write_through(target, shown) as out:
            yield out
        return
    folder = target.parent
    if not folder.is_dir():
        # as the user wrote it, unless a link's
        named = folder if os.path.islink(shown) else Path(shown).parent
        raise SpecError(
            f"cannot write '{shown}': folder '{named}' does not exist",
            hint=f"create it first (mkdir -p {named})",
            code="E006",
        )
    prefix = os.path.join(
        folder, f".optgen-{hashlib.sha256(target.name.encode()).hexdigest()[:16]}."
    )
    _remove_abandoned(prefix)
    try:
        fd, tmp = _create_locked(prefix)
    except OSError as err:
        raise SpecError(f"cannot write '{shown}': {err.strerror}", code="E007") from None
    try:
        if kind == "file":
            _keep_mode_and_owner(fd, target)
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
            os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):  # disk full, permissions: the old file is intact
            raise SpecError(f"cannot write '{shown}': {err.strerror}", code="E007") from None
        raise


def _create_locked(prefix: str) -> tuple[int, str]:
    """A new temporary file (mode 0o666 less the umask), locked until closed: a lock anyone can
    take marks a file whose writer is gone. If another writer's cleanup removed it before we held
    the lock, make another."""
    while True:
        tmp = f"{prefix}{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)


def _existing_kind(target: Path, shown: str) -> str:
    """``missing``, ``file`` or ``special`` (written through); a refused kind is a SpecError."""
    try:
        mode = target.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # a missing folder is reported as such next
        return "missing"
    except OSError as err:
        raise SpecError(f"cannot write '{shown}': {err.strerror}", code="E007") from None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        raise SpecError(
            f"cannot write '{shown}': it is a directory", hint="give a file name", code="E007"
        )
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return "special"
    what = (
        "a block device"
        if stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )
    raise SpecError(
        f"cannot write '{shown}': it is {what}", hint="write to a regular file", code="E015"
    )


@contextlib.contextmanager
def _write_through(target: Path, shown: str) -> Iterator[BinaryIO]:
    """Write into a character device or FIFO in place (not atomic: there is no old
    content to keep).
    """
    try:
        with open(target, "wb") as out:
            yield out
    except OSError as err:
        raise SpecError(f"cannot write '{shown}': {err.strerror}", code="E007") from None


def _keep_mode_and_owner(fd: int, target: Path) -> None:
    """The replacement keeps the replaced file's permission bits, and its owner where we
    may set it.
    """
    try:
        info = target.stat()
    except FileNotFoundError:  # removed meanwhile: a new file, umask mode
        return
    os.fchmod(fd, stat.S_IMODE(info.st_mode))
    with contextlib.suppress(PermissionError):
        if (info.st_uid, info.st_gid) != (os.getuid(), os.getgid()):
            os.fchown(fd, info.st_uid, info.st_gid)


def _remove_abandoned(prefix: str) -> None:
    """Delete temporary files for this target whose writer is gone (their lock is free)."""
    for name in glob.glob(glob.escape(prefix) + "*.tmp"):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(name)
        except OSError:  # locked: a live writer's; or already gone
            pass
        finally:
            os.close(fd)
