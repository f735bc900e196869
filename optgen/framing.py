"""The one file format of everything optgen saves (artifacts, optimizer state)::

    MAGIC                      one line: the kind of file and its format version
    SHA-256 hex\\n              digest of everything after this line
    {JSON header}\\n            what the payload holds
    payload                    raw bytes

Writing goes through :mod:`optgen.atomic`. Reading checks the magic and the digest
before anything is decoded, so a truncated, bit-flipped or foreign file is refused
whole: it can never reach a decoder (``jax.export``, ``np.frombuffer``) half-read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from optgen.atomic import open_atomic


class Unreadable(Exception):
    """The file cannot be read (the message is the system's reason)."""


class Foreign(Exception):
    """The file does not start with the expected magic (the message quotes its first line)."""


class Damaged(Exception):
    """The file's content does not match its digest: truncated or altered."""


def write(
    path: str | os.PathLike, magic: bytes, header: dict, chunks: Callable[[], Iterable]
) -> None:
    """Write a framed file atomically. ``chunks()`` yields the payload's buffers (bytes, arrays);
    it is called twice, once to digest and once to write, so no joined copy is ever made."""
    head = json.dumps(header).encode() + b"\n"
    digest = hashlib.sha256(head)
    for chunk in chunks():
        digest.update(memoryview(chunk).cast("B"))
    with open_atomic(path) as out:
        out.write(magic + digest.hexdigest().encode() + b"\n" + head)
        for chunk in chunks():
            out.write(memoryview(chunk).cast("B"))


def read(path: str | os.PathLike, magic: bytes) -> tuple[dict, memoryview]:
    """The header and payload of a framed file; raises :class:`Unreadable`, :class:`Foreign` or
    :class:`Damaged`.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise Unreadable(err.strerror or str(err)) from None
    if not data.startswith(magic):
        raise Foreign(repr(data.split(b"\n", 1)[0][:40]))
    view = memoryview(data)[len(magic) :]
    digest, content = bytes(view[:64]), view[65:]
    if view[64:65] != b"\n" or hashlib.sha256(content).hexdigest().encode() != digest:
        raise Damaged()
    end = data.index(b"\n", len(magic) + 65)  # the digest matched: this is the header line written
    return json.loads(data[len(magic) + 65 : end]), memoryview(data)[end + 1 :]
