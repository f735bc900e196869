"""Fault injection: whatever happens during a save, what the user had is intact.

- kill -9 at random moments while a process saves state in a loop (several rounds): the file
  always loads, as one whole save; the temporary files the kills left are removed by the next save;
- a full disk (a file-size limit in a subprocess) for saved state, artifacts and ``-o``: a
  located error, the old file byte for byte, no temporary file;
- a read-only folder: the same;
- special files: a symlink is kept, a device or FIFO is written through, never replaced;
- seeded single-bit flips of saved state and of artifacts: every one is refused, none loads;
- concurrent saves to one path: the file is one whole save, nothing left behind.

Counts are small on CI; more rounds run with
``OPTGEN_FAULT_ROUNDS=20 OPTGEN_FAULT_FLIPS=2000 pytest tests/test_faults.py``.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optgen
from optgen import atomic
from optgen.artifact import save_artifact

ROUNDS = int(os.environ.get("OPTGEN_FAULT_ROUNDS", "4"))
FLIPS = int(os.environ.get("OPTGEN_FAULT_FLIPS", "150"))


def _trained(steps: int = 2, shape=(64, 32)):
    opt = optgen.load("adamw", learning_rate=0.1)
    params = {"w": jnp.ones(shape), "b": jnp.zeros(7, jnp.bfloat16)}
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    state = opt.init(params)
    for _ in range(steps):
        params, state = opt.step(params, grads, state)
    return opt, params, state


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# -- kill -9 during saves ----------------------------------------------------------------------

_SAVER = """
import sys, jax.numpy as jnp, optgen
opt = optgen.load("adamw", learning_rate=0.1)
params = {"w": jnp.ones((1024, 512)), "b": jnp.zeros(7, jnp.bfloat16)}
grads = {"w": jnp.full((1024, 512), 0.5), "b": jnp.full(7, 0.5, jnp.bfloat16)}
state = opt.init(params)
while True:
    params, state = opt.step(params, grads, state)
    optgen.save_state(sys.argv[1], state, opt)
    print(int(state.count), flush=True)
"""


def test_kill_9_during_saves_never_loses_the_file(tmp_path):
    path = tmp_path / "state.opt"
    opt = optgen.load("adamw", learning_rate=0.1)
    params = {"w": jnp.ones((1024, 512)), "b": jnp.zeros(7, jnp.bfloat16)}
    rng = np.random.default_rng(13)
    kills, left = 0, 0
    for _ in range(ROUNDS):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, text=True
        )
        saved = [int(proc.stdout.readline())]  # at least one whole save this round
        time.sleep(rng.uniform(0.0, 0.4))  # then kill it somewhere in a later save (or between two)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        saved += [int(line) for line in proc.stdout.read().split()]
        proc.stdout.close()
        back = optgen.load_state(str(path), opt, params)  # never E332: a whole file, old or new
        # + 1: renamed, killed before it printed
        assert saved[0] <= int(back.count) <= saved[-1] + 1
        expected_mu = float(np.asarray(back.slots["mu"]["w"])[0, 0])
        # that save's values
        assert expected_mu == pytest.approx(0.5 * (1 - 0.9 ** int(back.count)), rel=1e-5)
        left = max(left, len(_leftovers(tmp_path)))
    assert kills == ROUNDS
    optgen.save_state(str(path), back, opt)  # the next save removes what the kills left
    assert _leftovers(tmp_path) == [], f"{left} temporary files after a kill"


# -- full disk ---------------------------------------------------------------------------------

_FULL = """
import json, resource, signal, sys, jax.numpy as jnp, optgen
from click.testing import CliRunner
from optgen.artifact import save_artifact
from optgen.cli import main
# past the limit a write fails with EFBIG instead of killing us
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
opt = optgen.load("adamw", learning_rate=0.1)
state = opt.init({"w": jnp.ones((256, 64))})
results = []
for limit in json.loads(sys.argv[2]):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    for kind in ("state", "artifact", "cli"):
        path = f"{sys.argv[1]}/{kind}.out"
        try:
            if kind == "state":
                optgen.save_state(path, state, opt)
            elif kind == "artifact":
                save_artifact(path, opt.compiled, "f32", "n", ["cpu"])
            else:
                run = CliRunner().invoke(main, ["compile", "adamw", "-o", path])
                raise optgen.SpecError(run.output) if run.exit_code else SystemExit("written")
        except optgen.Diagnostic as err:
            results.append([limit, kind, str(err)])
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print(json.dumps(results))
"""


def test_a_full_disk_leaves_the_old_files(tmp_path):
    olds = {kind: f"the {kind} the user had".encode() for kind in ("state", "artifact", "cli")}
    for kind, data in olds.items():
        (tmp_path / f"{kind}.out").write_bytes(data)
    limits = [0, 1, 100, 1000, 4096]  # every output here is larger than 7 kB
    proc = subprocess.run(
        [sys.executable, "-c", _FULL, str(tmp_path), json.dumps(limits)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert len(results) == len(limits) * 3, results  # every case failed, none wrote
    for limit, kind, message in results:
        assert "error[E007]" in message and "File too large" in message, (limit, kind, message)
    for kind, data in olds.items():
        assert (tmp_path / f"{kind}.out").read_bytes() == data
    assert _leftovers(tmp_path) == []


# -- read-only folder --------------------------------------------------------------------------


def test_a_read_only_folder_leaves_the_old_file(tmp_path, monkeypatch):
    opt, params, state = _trained()
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "state.opt"
    optgen.save_state(str(path), state, opt)
    before = path.read_bytes()
    folder.chmod(0o555)
    # root writes anywhere: make the folder refuse new files as the kernel would
    if os.geteuid() == 0:
        real_open = os.open

        def refusing(name, flags, *args, **kwargs):
            if str(name).startswith(str(folder)) and flags & os.O_CREAT:
                raise PermissionError(13, "Permission denied", name)
            return real_open(name, flags, *args, **kwargs)

        monkeypatch.setattr(atomic.os, "open", refusing)
    try:
        params2, state2 = opt.step(params, jax.tree.map(jnp.ones_like, params), state)
        with pytest.raises(optgen.SpecError) as err:
            optgen.save_state(str(path), state2, opt)
        assert err.value.code == "E007" and "Permission denied" in err.value.message
        assert path.read_bytes() == before and sorted(os.listdir(folder)) == ["state.opt"]
    finally:
        folder.chmod(0o755)


# -- special files -----------------------------------------------------------------------------


def test_saves_through_a_symlink_a_device_and_a_fifo(tmp_path):
    opt, params, state = _trained()
    real, link = tmp_path / "real.opt", tmp_path / "link.opt"
    link.symlink_to(real.name)
    optgen.save_state(str(link), state, opt)
    assert link.is_symlink() and real.is_file()
    assert int(optgen.load_state(str(link), opt, params).count) == 2

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    optgen.save_state(str(fifo), state, opt)
    reader.join(timeout=60)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    (tmp_path / "from-pipe.opt").write_bytes(got[0])
    assert int(optgen.load_state(str(tmp_path / "from-pipe.opt"), opt, params).count) == 2

    null = tmp_path / "null"
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except OSError:
        return  # no device nodes here; tests/test_atomic.py says so too
    optgen.save_state(str(null), state, opt)
    save_artifact(str(null), opt.compiled, "f32", "n", ["cpu"])
    assert stat.S_ISCHR(null.stat().st_mode)
    assert _leftovers(tmp_path) == []


# -- bit flips ---------------------------------------------------------------------------------


def _flip_each(path, data: bytes, load, codes, rng) -> int:
    for _ in range(FLIPS):
        bit = int(rng.integers(len(data) * 8))
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        with pytest.raises(optgen.Diagnostic) as err:
            load()
        assert err.value.code in codes, (bit, err.value.render())
    return FLIPS


def test_every_bit_flip_of_saved_state_or_an_artifact_is_refused(tmp_path):
    rng = np.random.default_rng(2026)
    opt, params, state = _trained(shape=(16, 8))
    state_path, artifact_path = tmp_path / "s.opt", tmp_path / "a.artifact"
    optgen.save_state(str(state_path), state, opt)
    save_artifact(str(artifact_path), opt.compiled, "f32", "n", ["cpu"])
    flips = _flip_each(
        state_path,
        state_path.read_bytes(),
        lambda: optgen.load_state(str(state_path), opt, params),
        {"E331", "E332"},
        rng,
    )
    flips += _flip_each(
        artifact_path,
        artifact_path.read_bytes(),
        lambda: optgen.load_artifact(str(artifact_path)),
        {"E323", "E324"},
        rng,
    )
    assert flips == 2 * FLIPS


# -- concurrent saves --------------------------------------------------------------------------


def test_concurrent_saves_leave_one_whole_file(tmp_path):
    opt, params, state = _trained(steps=0)
    states = []
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    for _ in range(5):
        states.append(jax.tree.map(jnp.copy, state))  # step donates the state it is given
        params, state = opt.step(params, grads, state)
    path = tmp_path / "state.opt"
    errors = []

    def saver(s):
        try:
            for _ in range(5):
                optgen.save_state(str(path), s, opt)
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=saver, args=(s,)) for s in states]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # a live writer's temporary file is locked: no other writer's cleanup removes it
    assert errors == []
    back = optgen.load_state(str(path), opt, params)
    assert int(back.count) in range(5)
    assert _leftovers(tmp_path) == []
