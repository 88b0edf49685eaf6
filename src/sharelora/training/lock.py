"""One writer per output directory: a lock file that a second ``sharelora train`` into it refuses on.

    with output_dir_lock("runs/x"):     # runs/x/.lock holds {"pid", "host", "started", "command"}
        ...                             # write the run; the file is removed on exit

The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<directory>/.lock``. The kernel releases it
when the holding process dies, however it dies, so a lock file left behind by ``kill -9`` (or a
crash, or a power cut) is stale by construction: the next run acquires it, says whose it was, and
writes its own details. A second live process fails at once with ``OutputDirLockedError``, naming
the directory, the holder's pid, host and start time, and what to do; it never waits.

Where flock is unavailable (no ``fcntl``: Windows; or a file system that refuses it with ENOLCK /
EOPNOTSUPP, as some network mounts do) the file itself is the lock: created with ``O_EXCL``, and
taken over only when it names a process on this host that no longer runs. A lock file written on
another host, or whose process cannot be checked, is then left to the user: the error says which
file to delete once no run uses the directory.

flock is advisory and per open file: a second ``output_dir_lock`` on the same directory in the
same process is refused as well (it would be a second writer too).
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"
# flock errors that mean "not supported here" rather than "held by someone else".
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


class OutputDirLockedError(ValueError):
    """Another process writes into this output directory.

    A ValueError, like RunExistsError, so that the command line prints it as one line (exit status 2).
    """


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def _read(path: Path) -> dict[str, Any]:
    """The holder recorded in a lock file; {} if it is empty (just created), unreadable or garbled."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "a process that has only just taken it"
    text = f"pid {holder['pid']} on host {holder.get('host', '?')}"
    if holder.get("started"):
        text += f", started {holder['started']}"
    if holder.get("command"):
        text += f": {holder['command']}"
    return text


def _locked_error(directory: Path, holder: dict[str, Any], extra: str = "") -> OutputDirLockedError:
    return OutputDirLockedError(
        f"output directory {directory} is in use by another sharelora process ({_describe(holder)}); "
        "wait for it to finish or stop it (then continue with --resume), or choose another --output-dir" + extra
    )


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host; True where that cannot be told (so: refuse)."""
    if os.name != "posix":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _write(fd: int, holder: dict[str, Any]) -> None:
    data = (json.dumps(holder) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


def _note_takeover(path: Path, previous: dict[str, Any]) -> None:
    if previous.get("pid"):
        print(f"note: {path} was left by {_describe(previous)}, which no longer holds it; taking it over",
              file=sys.stderr, flush=True)


def _acquire_flock(directory: Path, path: Path) -> int | None:
    """The locked descriptor of ``path``; None where flock is not supported (use the fallback)."""
    while True:
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:  # its holder just finished and removed it
                continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _locked_error(directory, _read(path)) from None
        except OSError as e:
            os.close(fd)
            if e.errno in _NO_FLOCK:
                if created:  # the fallback's lock is the file's existence: leave none of ours
                    path.unlink(missing_ok=True)
                return None
            raise
        # A holder that finished removes the file before it unlocks; if that happened between our
        # open and flock we locked a file no one else will open: start again with the path's file.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        opened = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            return fd
        os.close(fd)


def _acquire_exclusive(directory: Path, path: Path) -> int:
    """The fallback: the file's existence is the lock; taken over if its process is gone."""
    for _ in range(3):
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read(path)
            here = holder.get("host") == socket.gethostname()
            if not (here and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"])):
                raise _locked_error(directory, holder, (
                    f". File locks are not available here, so a lock left by a killed process is only "
                    f"recognised on its own host; if no process uses {directory}, delete {path}"
                )) from None
            _note_takeover(path, holder)
            path.unlink(missing_ok=True)
    raise _locked_error(directory, _read(path))


@contextmanager
def output_dir_lock(directory: str | Path) -> Iterator[Path]:
    """Hold ``<directory>/.lock`` (creating the directory) for the duration of the block.

    Raises OutputDirLockedError at once if another live process holds it. Yields the lock file's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = _acquire_flock(directory, path) if fcntl is not None else None
    flocked = fd is not None
    if flocked:
        _note_takeover(path, _read(path))
    else:
        fd = _acquire_exclusive(directory, path)
    try:
        _write(fd, _holder())
        yield path
    finally:
        if flocked:
            # Unlink while still holding the lock, then unlock (close): whoever opened the old file
            # in between sees that it is no longer the path's file and starts again (_acquire_flock).
            try:
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        else:  # the file is the lock (and Windows cannot remove an open file)
            os.close(fd)
            path.unlink(missing_ok=True)
