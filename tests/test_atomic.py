"""optgen/atomic.py: what a write does to each kind of existing path, and what it leaves behind.

Special files are made in tmp_path (a FIFO, and a copy of /dev/null made with mknod where
allowed), never the system's own: on today's main a write would replace them.
"""

from __future__ import annotations

import os
import stat
import threading

import pytest

from optgen import atomic
from optgen.diagnostics import SpecError


def test_a_new_file_honours_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_atomic(tmp_path / "a", "x")
        os.umask(0o077)
        atomic.write_atomic(tmp_path / "b", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o600


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "out"
    path.write_text("old")
    path.chmod(0o640)
    atomic.write_atomic(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_symlink_is_kept_and_its_target_written(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    real.write_text("old")
    real.chmod(0o604)
    link.symlink_to("real")
    atomic.write_atomic(link, "new")
    assert (
        link.is_symlink()
        and real.read_text() == "new"
        and stat.S_IMODE(real.stat().st_mode) == 0o604
    )
    dangling = tmp_path / "dangling"
    dangling.symlink_to("made")
    atomic.write_atomic(dangling, "x")
    assert dangling.is_symlink() and (tmp_path / "made").read_text() == "x"


def test_a_fifo_is_written_through(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    atomic.write_atomic(fifo, b"through the pipe")
    reader.join(timeout=30)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(fifo.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_a_character_device_is_written_through(tmp_path):
    null = tmp_path / "null"
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null of our own
    except (PermissionError, OSError) as err:
        pytest.skip(f"cannot make a device node here: {err}")
    atomic.write_atomic(null, "discarded")
    assert stat.S_ISCHR(null.stat().st_mode) and null.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]


def test_a_socket_or_directory_is_refused(tmp_path):
    import socket

    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(SpecError) as err:
            atomic.write_atomic(path, "x")
    assert err.value.code == "E015" and "socket" in err.value.message
    with pytest.raises(SpecError) as err:
        atomic.write_atomic(tmp_path, "x")
    assert err.value.code == "E007"


@pytest.mark.parametrize("length", [200, 242, 255])
def test_names_up_to_the_limit_can_be_written(tmp_path, length):
    path = tmp_path / ("n" * length)
    atomic.write_atomic(path, "x")
    assert path.read_text() == "x" and len(os.listdir(tmp_path)) == 1


def test_abandoned_temporary_files_are_removed_by_the_next_write(tmp_path):
    path = tmp_path / "out"
    atomic.write_atomic(path, "first")
    with pytest.raises(KeyboardInterrupt):
        with atomic.open_atomic(path) as out:  # a writer that dies leaves its file if killed
            out.write(b"partial")
            temp = [p for p in tmp_path.iterdir() if p.name != "out"]
            os.link(temp[0], tmp_path / (temp[0].name[:-4] + "x.tmp"))  # what a kill -9 would leave
            raise KeyboardInterrupt
    assert len(list(tmp_path.iterdir())) == 2
    other = tmp_path / "other"
    atomic.write_atomic(other, "o")  # another target's temporaries are not its business
    assert len(list(tmp_path.iterdir())) == 3
    atomic.write_atomic(path, "second")
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]
        and path.read_text() == "second"
    )


def test_a_live_writers_temporary_file_is_kept(tmp_path):
    path = tmp_path / "out"
    with atomic.open_atomic(path) as first:
        first.write(b"one")
        atomic.write_atomic(path, "two")  # a concurrent writer of the same target
        assert len(list(tmp_path.iterdir())) == 2  # the first writer's file survived the cleanup
    assert path.read_text() == "one" and len(list(tmp_path.iterdir())) == 1
