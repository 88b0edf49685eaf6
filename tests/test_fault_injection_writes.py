"""Saves survive kill -9 and a full disk: the files hold the previous complete version or the new one.

A fork server (tests/fault_writer.py) imports torch once and forks writers, which the test kills
with SIGKILL: at every file-system call of one save in turn (deterministic), and at random
moments of a loop of saves (seeded delays). After each kill the directory must load as exactly
version k or k + 1 (tensors and config of one version), and hold nothing but the files and
stale ``.tmp`` files, which loading ignores.
"""

from __future__ import annotations

import errno
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from sharelora import ShareLoraError
from sharelora.method import checkpoint
from sharelora.training.state import load_checkpoint, load_weights

import fault_writer
from fault_writer import BEST, CHECKPOINT

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self/fd").is_dir(),
                                reason="needs fork and /proc (Linux)")

RANDOM_KILLS = 20  # per kind, on top of one kill at every file-system call of a save
FILES = {"adapter": {checkpoint.WEIGHTS_NAME, "adapter_config.json"}, "checkpoint": {BEST, CHECKPOINT}}


class Server:
    """The fork server as a subprocess, spoken to in lines."""

    def __init__(self, log: Path):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(Path(fault_writer.__file__))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log, "wb"), cwd=Path(__file__).parent)
        self.pending = b""
        assert self.line(timeout=120) == "ready"

    def line(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                raise AssertionError(f"the fork server said nothing for {timeout} s or died; its stderr:\n"
                                     f"{self.log.read_text()[-3000:]}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def writer_ended(self) -> bool:
        """Whether the server has reported the writer gone (or failing), reading what is there without waiting."""
        while select.select([self.proc.stdout], [], [], 0)[0]:
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                return True
            self.pending += chunk
        return any(line.startswith((b"dead", b"error")) for line in self.pending.split(b"\n"))

    def run(self, *command, kill_after: float | None = None) -> tuple[list[int], int, list[float]]:
        """Run one writer; SIGKILL it ``kill_after`` s after it finished its first save.

        Returns the versions it finished, its signal, and how long each of those saves took.
        Timing the kill from a finished save puts it at a random point of the next one, whatever
        the speed of the machine.
        """
        self.proc.stdin.write((" ".join(map(str, command)) + "\n").encode())
        self.proc.stdin.flush()
        words = self.line().split()
        assert words[0] == "pid", words
        pid, done, seconds = int(words[1]), [], []
        while True:
            words = self.line().split()
            if words[0] == "done":
                done.append(int(words[1]))
                seconds += [float(w) for w in words[2:]]
                if kill_after is not None:
                    time.sleep(kill_after)
                    if not self.writer_ended():  # else the pid may already belong to another process
                        os.kill(pid, signal.SIGKILL)
                    kill_after = None
            elif words[0] == "error":
                raise AssertionError(f"the writer failed: {' '.join(words[1:])}")
            elif words[0] == "dead":
                return done, int(words[1]), seconds

    def close(self) -> None:
        self.proc.stdin.close()  # the server leaves its loop; no writer is alive between runs
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server") / "stderr.txt")
    yield s
    s.close()


@pytest.fixture(scope="module")
def versions():
    v = fault_writer.Versions()
    v.reader = fault_writer.base_model()  # loads into these, so that the writers' model is never touched
    v.reader_optimizer = torch.optim.AdamW(v.reader.parameters(), lr=1e-3)
    return v


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check(kind: str, directory: Path, versions, candidates: tuple[int, int], stats: dict) -> int:
    """The version the directory holds, after asserting it is exactly one of ``candidates``, whole."""
    names = set(os.listdir(directory))
    stale = names - FILES[kind]
    pattern = "|".join(re.escape(n) for n in FILES[kind])
    assert all(re.fullmatch(rf"\.({pattern})\..+\.tmp", n) for n in stale), stale
    stats["stale tmp files"] = max(stats.get("stale tmp files", 0), len(stale))
    if kind == "adapter":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config, tensors = checkpoint.load_adapter(directory)
        found = [k for k in candidates if same(tensors, versions.adapter_tensors(k))]
        assert found, f"the weights are none of versions {candidates}"
        assert config.alpha == 8.0 + found[0], f"weights of version {found[0]} loaded with alpha {config.alpha}"
        if caught:
            stats["killed between the two renames"] = stats.get("killed between the two renames", 0) + 1
        return found[0]
    model, optimizer = versions.reader, versions.reader_optimizer
    step = load_checkpoint(directory / CHECKPOINT, model, optimizer)["step"]
    assert step in candidates and same(dict(model.named_parameters()), versions.parameters(step))
    load_weights(directory / BEST, model)
    best = [k for k in candidates if k >= step and same(dict(model.named_parameters()), versions.parameters(k))]
    assert best, f"{BEST} is none of versions {candidates} at or after the checkpoint's step {step}"
    return step


@pytest.mark.parametrize("kind", fault_writer.KINDS)
def test_kill_9_at_every_file_system_call_of_a_save_leaves_the_old_or_the_new_version(kind, server, versions,
                                                                                       tmp_path):
    versions.save(kind, tmp_path, 0)
    held, stats, n = 0, {}, 0
    while True:
        n += 1
        done, sig, _ = server.run("step", kind, tmp_path, held + 1, n)
        held = check(kind, tmp_path, versions, (held, held + 1), stats)
        if done:  # the save got past its last call: every point of it has been tried
            assert sig == 0 and held == done[0]
            break
        assert sig == signal.SIGKILL
    print(f"\n{kind}: killed at each of {n - 1} file-system calls of a save; {stats}")
    assert n > 8


@pytest.mark.parametrize("kind", fault_writer.KINDS)
def test_kill_9_at_random_moments_of_repeated_saves_leaves_the_old_or_the_new_version(kind, server, versions,
                                                                                       tmp_path):
    versions.save(kind, tmp_path, 0)
    rng = random.Random(f"kill-9-{kind}")
    held, stats, seconds, t0 = 0, {}, [], time.perf_counter()
    for _ in range(RANDOM_KILLS):
        one_save = sorted(seconds)[len(seconds) // 2] if seconds else 0.05  # median so far
        done, sig, took = server.run("loop", kind, tmp_path, held + 1, kill_after=rng.uniform(0, 1.2 * one_save))
        assert sig == signal.SIGKILL
        seconds += took
        held = check(kind, tmp_path, versions, (done[-1], done[-1] + 1), stats)
        stats["saves completed"] = stats.get("saves completed", 0) + len(done)
    print(f"\n{kind}: {RANDOM_KILLS} kills in {time.perf_counter() - t0:.1f} s (median save "
          f"{1e3 * sorted(seconds)[len(seconds) // 2]:.0f} ms); {stats}")
    # The loaded files ignore the stale temporaries; a normal save afterwards is whole again.
    versions.save(kind, tmp_path, held + 1)
    assert check(kind, tmp_path, versions, (held + 1, held + 1), stats) == held + 1


# ---- a full disk -------------------------------------------------------------------------------

def fill_disk(monkeypatch, call: str, name: str) -> None:
    """``os.<call>`` fails with ENOSPC for the temporary file of ``name`` (a write after 100 bytes got through)."""
    real = getattr(os, call)

    def full(fd, *args):
        if name in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
            if call == "write":
                real(fd, bytes(args[0][:100]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, *args)

    monkeypatch.setattr(os, call, full)


@pytest.mark.parametrize("call", ["write", "fsync"])
@pytest.mark.parametrize("name", [checkpoint.WEIGHTS_NAME, "adapter_config.json"])
def test_a_full_disk_during_an_adapter_save_is_a_clear_error_and_keeps_the_previous_adapter(
        call, name, versions, tmp_path, monkeypatch):
    versions.save("adapter", tmp_path, 1)
    fill_disk(monkeypatch, call, name)
    with pytest.raises(ShareLoraError, match=rf"could not write .*{re.escape(name)}: no space left on device") as e:
        versions.save("adapter", tmp_path, 2)
    monkeypatch.undo()
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == sorted(FILES["adapter"])  # temporary files removed
    assert check("adapter", tmp_path, versions, (1, 1), {}) == 1


@pytest.mark.parametrize("call", ["write", "fsync"])
def test_a_full_disk_during_a_checkpoint_save_is_a_clear_error_and_keeps_the_previous_checkpoint(
        call, versions, tmp_path, monkeypatch):
    versions.save("checkpoint", tmp_path, 1)
    fill_disk(monkeypatch, call, CHECKPOINT)
    with pytest.raises(ShareLoraError, match=rf"could not write .*{CHECKPOINT}: no space left on device"):
        versions.save("checkpoint", tmp_path, 2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted(FILES["checkpoint"])
    # best.safetensors was written before the disk filled up (version 2); the checkpoint is still version 1.
    assert check("checkpoint", tmp_path, versions, (1, 2), {}) == 1


# ---- temporary files a killed save left behind ------------------------------------------------

def test_the_next_save_removes_the_temporary_files_a_killed_save_left_but_not_a_live_writers(versions, tmp_path):
    versions.save("adapter", tmp_path, 1)
    old = time.time() - checkpoint.STALE_TEMP_S - 60
    stale = tmp_path / f".{checkpoint.WEIGHTS_NAME}.k1ll3d.tmp"  # the name _write_temp gives; untouched for > 1 h
    live = tmp_path / ".adapter_config.json.wr1t1ng.tmp"  # modified just now: may be another process mid-write
    foreign = tmp_path / ".notes.txt.k1ll3d.tmp"  # old, but not the temporary of a file the save writes
    for p in (stale, live, foreign):
        p.write_bytes(b"x" * 100)
    os.utime(stale, (old, old))
    os.utime(foreign, (old, old))
    versions.save("adapter", tmp_path, 2)
    assert not stale.exists() and live.exists() and foreign.exists()
    foreign.unlink()  # check() allows only the save's own temporaries beside its files
    assert check("adapter", tmp_path, versions, (2, 2), {}) == 2
