"""Run untrusted generated Python (HumanEval completions) in separate, limited processes, and judge it
from a process the sample cannot reach.

Model output is never executed in the evaluator's process. Every child is a fresh interpreter
(``python -I -c BOOTSTRAP``) in its own session and process group; it gets its request on stdin
(then stdin is ``/dev/null``), and the evaluator reads back, through pipes, at most
``Limits.output_bytes`` of stdout+stderr and JSON records on a dedicated file descriptor.

**The verdict** (:func:`run_check`). A sample is the *candidate*: its program (prompt + completion)
runs in one sandboxed child, which then only answers calls of its entry point. The problem's tests
run in a second sandboxed child, the *judge*, which never executes a line of the sample: it runs the
problem's trusted setup (the prompt, for helpers such as ``poly``), binds the entry point's name to
a proxy, and runs the tests. Each call of the proxy sends the arguments to the candidate and gets
back its value as strictly typed JSON (:data:`CODEC`: None, bool, int, float, complex, str, bytes,
list, tuple, dict, set, frozenset, each tagged with its exact type; raw JSON numbers and objects,
unknown tags, unhashable keys and oversized or too-deep messages are refused); the judge rebuilds
plain builtin objects from it, so every ``==`` and ``assert`` of the tests runs on builtin values,
in the judge. An object whose ``__eq__`` says yes to everything cannot be sent (a builtin subclass
is sent as its builtin value), and an exception is sent as its name and message. The verdict is
the judge's result line, on a pipe only the judge holds; whatever the candidate writes, to any of
its descriptors, is at most a wrong answer to a call. The candidate's child is in other
namespaces than the judge (it cannot see, signal or trace it) and the judge is not dumpable
(``PR_SET_DUMPABLE`` 0, which keeps a same-uid process from tracing it where there are no
namespaces). :func:`run_program` runs a whole program alone; its ``completed`` status is the
program's own word (it can forge it), so it serves tests of the isolation, never a verdict.

**Isolation.** Inside each child, before a line of the sample runs, the bootstrap applies what this
machine permits, strongest first:

====================  ======================================================================
no network            a new network namespace (``unshare(CLONE_NEWNET)``: no interface but a
                      loopback that is down, so every connect / bind fails); on top of that an
                      audit hook refuses ``socket.__new__`` / ``connect`` / ``bind`` /
                      ``getaddrinfo``.
processes             a new PID namespace (the sample is pid 2 under a pid 1 that only waits:
                      when the sample ends, or pid 1 is killed, the kernel kills every process
                      of the namespace, including ones that called ``setsid``; no process
                      outside is addressable, so it cannot signal the evaluator or the judge)
                      and ``RLIMIT_NPROC``. RLIMIT_NPROC counts the processes of the sample's
                      real uid and is not enforced for root, so a root evaluator runs the
                      sample as ``nobody`` (uid 65534; the interpreter's sys.path folders that
                      nobody cannot read, e.g. pyenv's under /root, are bind-mounted read-only
                      into the sandbox's /tmp); an unprivileged evaluator gets RLIMIT_NPROC per
                      user namespace. The audit hook also refuses ``subprocess``,
                      ``os.system``, ``os.exec*`` / ``spawn*`` and signals to other processes.
IPC                   a new IPC namespace (``CLONE_NEWIPC``): SysV shared memory, semaphores
                      and message queues and POSIX message queues made by the sample live in
                      it and are freed by the kernel when its last process ends.
files                 a new mount namespace: every existing mount is bind-remounted read-only
                      (MS_BIND, so only this namespace's view changes, never the file system),
                      and fresh size-capped tmpfs (``Limits.disk_mb``) are mounted on ``/tmp``,
                      ``/var/tmp`` and ``/dev/shm``; the working directory is a new folder in
                      that ``/tmp``. ``RLIMIT_FSIZE`` caps any one file. The evaluator's own
                      temporary directory (the fallback working directory) is removed after the
                      run.
CPU, memory, files    ``RLIMIT_CPU`` (soft; SIGKILL one second later), ``RLIMIT_AS``,
                      ``RLIMIT_NOFILE``, ``RLIMIT_CORE = 0``.
wall clock            the evaluator kills each child's process group (and its namespace's
                      pid 1, whatever its group) with SIGKILL after ``Limits.timeout_s``.
====================  ======================================================================

A child is *isolated* when it got the network, PID, IPC and mount namespaces, read-only mounts, its
own /tmp, and the sample runs unprivileged (uid nobody, or in a user namespace whose capabilities
were dropped). :func:`isolation` reports what this machine gets (also in every
:class:`SandboxResult`). **Where a child is not isolated** (a container that refuses namespaces)
it refuses to run the sample and the evaluator raises :class:`SandboxUnavailable`, unless the
caller passes ``allow_unisolated=True`` (``sharelora eval --allow-unisolated-sandbox``); then only
the rlimits, the process-group kill and the audit hook remain, :data:`FALLBACK_WARNING` (what is
not protected) is printed once per process, and the sample runs as the evaluator's user.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any

# False simulates a machine without namespaces (tests of the fallback); never needed otherwise.
USE_NAMESPACES = True

# The largest message (one JSON line) a judge reads from a candidate.
MESSAGE_BYTES = 8 << 20

FALLBACK_WARNING = (
    "sharelora sandbox: Linux namespaces are unavailable here, so generated code runs as your user "
    "with only resource limits, a process-group kill and a Python audit hook. It is NOT protected "
    "from: writing or deleting any file your user may write (outside its temporary directory too); "
    "leaving processes behind (a child that calls setsid escapes the kill); signalling or tracing "
    "your processes, the evaluator included (through ctypes); opening network connections (through "
    "ctypes); leaving SysV shared memory, semaphores and message queues behind; and, by tampering "
    "with the evaluator, changing its own verdict. Run code you do not trust only where namespaces "
    "work, or inside a VM or container you can throw away.")


class SandboxUnavailable(ValueError):
    """The sandbox cannot isolate samples here and the caller did not opt in to the fallback.

    A ValueError so the command line prints it as one line (exit status 2), like other requests
    that cannot be done as asked.
    """


@dataclass(frozen=True)
class Limits:
    """What one sample may use (each of the candidate's and the judge's processes gets the same).

    Attributes:
        timeout_s: wall clock from the start of the child interpreters to their end (startup included).
        cpu_s: CPU seconds (RLIMIT_CPU); None = ceil(timeout_s).
        memory_mb: address space (RLIMIT_AS) of the child, interpreter included (~30 MB).
        file_mb: largest file the child may write (RLIMIT_FSIZE).
        disk_mb: size of each tmpfs mounted on /tmp, /var/tmp, /dev/shm (mount namespace only).
        processes: RLIMIT_NPROC (processes of the sample's uid).
        open_files: RLIMIT_NOFILE.
        output_bytes: stdout+stderr kept per child; a child printing more is killed (``output_limit``).
    """

    timeout_s: float = 5.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    file_mb: int = 16
    disk_mb: int = 32
    processes: int = 32
    open_files: int = 64
    output_bytes: int = 64 * 1024

    def rlimits(self) -> dict[str, int]:
        cpu = self.cpu_s if self.cpu_s is not None else max(1, math.ceil(self.timeout_s))
        return {"RLIMIT_CPU": cpu, "RLIMIT_AS": self.memory_mb << 20, "RLIMIT_FSIZE": self.file_mb << 20,
                "RLIMIT_NPROC": self.processes, "RLIMIT_NOFILE": self.open_files, "RLIMIT_CORE": 0}


@dataclass(frozen=True)
class Check:
    """One sample and how to judge it.

    Attributes:
        program: the candidate's program (untrusted), e.g. a HumanEval prompt + completion.
        entry_point: the function of ``program`` the tests call.
        tests: trusted code run by the judge, with ``entry_point`` bound to a proxy of the
            candidate's function (e.g. HumanEval's ``def check(candidate): ...`` + ``check(name)``);
            the sample passes if it runs to its end without an exception.
        setup: trusted code the judge runs first (e.g. the HumanEval prompt, which defines helpers
            some tests use); its own definition of ``entry_point`` is replaced by the proxy.
    """

    program: str
    entry_point: str
    tests: str
    setup: str = ""


@dataclass
class SandboxResult:
    """The outcome of one sample.

    ``status``: ``passed`` (the judge ran the tests to their end); ``failed`` (an exception: a
    failed assert, the candidate's error or a value it could not send; ``error`` names it);
    ``completed`` (:func:`run_program` only: the program says it ran to its end); ``exited`` (a
    process ended without a result line: ``os._exit``, a signal, a crash); ``timeout``;
    ``output_limit``. ``output`` is what the sample printed, ``check_output`` what the judge
    printed; ``isolation`` is what the sample's process got.
    """

    status: str
    error: str | None = None
    exit_code: int | None = None
    output: str = ""
    seconds: float = 0.0
    isolation: dict[str, Any] = field(default_factory=dict)
    tag: str = ""  # in the children's argv (never the nonce): lets a test find leftover processes
    check_output: str = ""

    @property
    def passed(self) -> bool:
        """The judge's verdict; never true for :func:`run_program`."""
        return self.status == "passed"

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# How values cross between the judge and the candidate. Run in both children (the candidate's copy
# is the sample's to tamper with: it can only choose which builtin values it answers).
CODEC = r'''
import builtins as _builtins, json as _json, operator as _operator, re as _re
MAX_DEPTH = 64
_HEX = _re.compile(r"-?[0-9a-f]+")
_SEQ_TAGS = {list: "l", tuple: "t", set: "S", frozenset: "F"}
_SEQ_KINDS = {"l": list, "t": tuple, "S": set, "F": frozenset}
_AS_BASE = ((int, int.__index__), (float, float.__float__), (complex, lambda x: complex(x.real, x.imag)),
            (str, str.__str__), (bytes, bytes), (list, list), (tuple, tuple), (dict, dict), (set, set),
            (frozenset, frozenset))


class SampleError(Exception):
    """The candidate raised, ended, or answered with something that is not a value."""


class SampleExit(BaseException):
    """The candidate raised SystemExit, KeyboardInterrupt or another non-Exception."""


def encode(x, depth=0):
    """``x`` as JSON data naming its exact builtin type: None, bool and str as themselves, every
    other value a list [tag, ...]: i int (hex), f float (float.hex), c complex, y bytes (hex),
    l list, t tuple, S set, F frozenset, d dict (k1, v1, k2, v2, ...). A subclass of these types
    is sent as its builtin value; anything else is a TypeError."""
    if depth > MAX_DEPTH:
        raise ValueError(f"the value is nested more than {MAX_DEPTH} deep")
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return ["i", format(x, "x")]
    if t is float:
        return ["f", x.hex()]
    if t is complex:
        return ["c", x.real.hex(), x.imag.hex()]
    if t is bytes:
        return ["y", x.hex()]
    if t in _SEQ_TAGS:
        return [_SEQ_TAGS[t], *(encode(v, depth + 1) for v in x)]
    if t is dict:
        out = ["d"]
        for k, v in x.items():
            out += (encode(k, depth + 1), encode(v, depth + 1))
        return out
    for base, plain in _AS_BASE:
        if isinstance(x, base):
            return encode(plain(x), depth)
    if hasattr(t, "__index__"):  # e.g. numpy integers
        return encode(_operator.index(x), depth)
    raise TypeError(f"a value of type {t.__name__} cannot be compared safely; return builtin values "
                    "(None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset)")


def decode(v, depth=0):
    """The value ``encode`` gave, rebuilt from exact builtin types; anything else is a SampleError."""
    if v is None or v is True or v is False or type(v) is str:
        return v
    if depth > MAX_DEPTH:
        raise SampleError(f"the candidate's value is nested more than {MAX_DEPTH} deep")
    if type(v) is not list or not v or type(v[0]) is not str:
        raise SampleError("the candidate sent something that is not a value")
    tag, n = v[0], len(v)
    try:
        if tag == "i" and n == 2 and type(v[1]) is str and _HEX.fullmatch(v[1]):
            return int(v[1], 16)
        if tag == "f" and n == 2 and type(v[1]) is str:
            return float.fromhex(v[1])
        if tag == "c" and n == 3 and type(v[1]) is str and type(v[2]) is str:
            return complex(float.fromhex(v[1]), float.fromhex(v[2]))
        if tag == "y" and n == 2 and type(v[1]) is str:
            return bytes.fromhex(v[1])
        if tag in _SEQ_KINDS:
            return _SEQ_KINDS[tag]([decode(x, depth + 1) for x in v[1:]])
        if tag == "d" and n % 2 == 1:
            items = [decode(x, depth + 1) for x in v[1:]]
            return dict(zip(items[0::2], items[1::2]))
    except (ValueError, TypeError, OverflowError) as e:  # bad hex, unhashable keys or members
        raise SampleError(f"the candidate sent something that is not a value ({type(e).__name__}: {e})") from None
    raise SampleError(f"the candidate sent something that is not a value (tag {tag[:20]!r})")


def _no_json_number_or_object(*args):
    raise SampleError("the candidate sent a raw JSON number or object")


def read_message(line):
    """One JSON line as a non-empty list whose first item is a str; anything else is a SampleError."""
    try:
        msg = _json.loads(line, parse_int=_no_json_number_or_object, parse_float=_no_json_number_or_object,
                          parse_constant=_no_json_number_or_object, object_pairs_hook=_no_json_number_or_object)
    except SampleError:
        raise
    except (ValueError, RecursionError, MemoryError) as e:
        raise SampleError(f"the candidate sent a line that is not JSON ({type(e).__name__})") from None
    if type(msg) is not list or not msg or type(msg[0]) is not str:
        raise SampleError("the candidate sent a message that is not a list starting with its kind")
    return msg


def rebuilt(name, message):
    """The exception the candidate raised, rebuilt on the judge's side: a builtin Exception class by
    its name, SampleExit for other builtins (SystemExit, ...), else SampleError."""
    cls = getattr(_builtins, name, None) if name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:
            pass
    text = f"{name[:100]}: {message}"
    if isinstance(cls, type) and issubclass(cls, BaseException):
        return SampleExit(text)
    return SampleError("the candidate raised " + text)
'''


# The children's first code. It must not import the sample's modules (nothing of sharelora): a fresh
# interpreter in isolated mode (-I: no PYTHON* variables, no user site, no script dir on sys.path).
# Records on the result descriptor, in this order: "init" (the PID namespace's pid 1, or null), then
# "isolation" or "refused", both written before any sample code runs, then the mode's result.
BOOTSTRAP = r'''
import builtins, ctypes, json, os, resource, signal, sys
_write, _dumps, _exit = os.write, json.dumps, os._exit
req = json.loads(sys.stdin.buffer.read().decode("utf-8"))
null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
RES = req["result_fd"]
KEEP = sorted({RES, *req["keep_fds"]})
def report(**d):
    try:
        _write(RES, (_dumps(d) + "\n").encode())
    except OSError:
        pass
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWIPC, NEWUSER, NEWPID, NEWNET = 0x00020000, 0x08000000, 0x10000000, 0x20000000, 0x40000000
iso = {"net_namespace": False, "pid_namespace": False, "ipc_namespace": False, "mount_namespace": False,
       "read_only_mounts": 0, "tmpfs": [], "uid": os.getuid(), "user_namespace": False,
       "capabilities_dropped": False, "audit_hook": False, "rlimits": {}, "isolated": False}
root = os.geteuid() == 0
uid, gid = os.getuid(), os.getgid()
want = req["namespaces"]
def others_can_read(path):
    import stat
    p = os.path.abspath(path)
    try:
        st = os.stat(p)
        if not st.st_mode & stat.S_IROTH or (stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH):
            return False
        while p != "/":
            p = os.path.dirname(p)
            if not os.stat(p).st_mode & stat.S_IXOTH:
                return False
    except OSError:
        return False
    return True
def try_unshare(flags):
    return libc.unshare(flags) == 0
def wait_for(pid):
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    _exit(code if code >= 0 else 128 - code)
done = 0
if want:
    kinds = [NEWNET | NEWPID | NEWNS | NEWIPC, NEWNET | NEWPID | NEWNS, NEWNET | NEWPID, NEWNET]
    tries = list(kinds) if root else []
    tries += [NEWUSER | k for k in kinds]
    for flags in tries:
        if try_unshare(flags):
            done = flags
            break
if done & NEWUSER:
    iso["user_namespace"] = True
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        pass
iso["net_namespace"] = bool(done & NEWNET)
iso["ipc_namespace"] = bool(done & NEWIPC)
iso["mount_namespace"] = bool(done & NEWNS)
if done & NEWPID:
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid:
        # Still in the caller's PID namespace: report the namespace's pid 1 (first, before the child
        # may write anything) so the evaluator can kill it, and with it the namespace, whatever
        # process group it moves to; mirror its exit.
        report(type="init", pid=pid)
        os.write(go_w, b"x")
        wait_for(pid)
    os.read(go_r, 1)
    os.close(go_r); os.close(go_w)
    # The namespace's pid 1: it only waits. The sample is its child (pid 2), so the sample gets
    # ordinary signal semantics and cannot kill its init (signals from inside to pid 1 without a
    # handler are dropped); when the sample ends, pid 1 ends and the kernel kills the rest.
    iso["pid_namespace"] = True
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the bootstrap
    pid = os.fork()
    if pid:
        wait_for(pid)
else:
    report(type="init", pid=None)
work = os.getcwd()
if iso["mount_namespace"]:
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
    MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
    ST = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC), (1024, MS_NOATIME),
          (2048, MS_NODIRATIME), (4096, MS_RELATIME))
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    if mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        iso["mount_namespace"] = False  # without private propagation nothing may be mounted
    else:
        points = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                p = line.split()[4]
                points.append(p.encode().decode("unicode_escape"))
        for p in points:
            try:
                have = os.statvfs(p).f_flag
            except OSError:
                continue
            keep = 0
            for st, ms in ST:
                if have & st:
                    keep |= ms
            # MS_BIND | MS_REMOUNT changes this namespace's mount only, never the superblock.
            if mount(None, p.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY | keep, None) == 0:
                iso["read_only_mounts"] += 1
        if iso["pid_namespace"]:
            mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        opts = f"size={int(req['disk_mb'])}m,mode=1777".encode()
        for p in ("/tmp", "/var/tmp", "/dev/shm"):
            if os.path.isdir(p) and mount(b"tmpfs", p.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts) == 0:
                iso["tmpfs"].append(p)
        if "/tmp" in iso["tmpfs"]:
            work = "/tmp/work"
            os.mkdir(work, 0o700)
            if root and not iso["user_namespace"]:
                # uid nobody must import the standard library, which may sit under a private
                # folder (pyenv in /root): bind each such sys.path entry, read-only, into /tmp.
                os.mkdir("/tmp/.python", 0o755)
                moved = {}
                for i, p in enumerate(list(sys.path)):
                    if os.path.isdir(p) and not others_can_read(p):
                        q = f"/tmp/.python/{i}"
                        os.mkdir(q, 0o755)
                        if mount(p.encode(), q.encode(), None, MS_BIND, None) == 0 and mount(
                                None, q.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None) == 0:
                            moved[p] = q
                            sys.path[i] = q
                for mod in list(sys.modules.values()):  # packages imported so far (collections, encodings)
                    path = getattr(mod, "__path__", None)
                    if isinstance(path, list):
                        path[:] = [next((q + x[len(p):] for p, q in moved.items() if x == p or x.startswith(p + "/")), x)
                                   for x in path]
                sys.path_importer_cache.clear()
if root and not iso["user_namespace"] and all(others_can_read(p) for p in sys.path if os.path.exists(p)):
    os.chown(work, 65534, 65534)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    iso["uid"] = 65534
elif iso["user_namespace"] and iso["mount_namespace"]:
    # Drop this user namespace's capabilities over the mounts set up above (a nested one has
    # none over them), so the sample cannot unmount the tmpfs or remount the files writable.
    if try_unshare(NEWUSER):
        try:
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} 0 1"), ("gid_map", f"{gid} 0 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            iso["capabilities_dropped"] = True
        except OSError:
            pass
os.chdir(work)
os.environ["HOME"] = os.environ["TMPDIR"] = work
for name, value in req["rlimits"].items():
    which = getattr(resource, name)
    hard = value + 1 if name == "RLIMIT_CPU" else value
    try:
        resource.setrlimit(which, (value, hard))
        iso["rlimits"][name] = value
    except (ValueError, OSError):
        pass
ME = os.getpid()
BLOCKED = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
           "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.forkpty", "pty.spawn"}
def hook(event, args):
    if event in BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event in ("os.kill", "os.killpg") and args and args[0] not in (ME, 0):
        raise PermissionError(f"sandbox: {event} of another process is not allowed")
sys.addaudithook(hook)
iso["audit_hook"] = True
unprivileged = (iso["uid"] != 0 and not iso["user_namespace"]) or iso["capabilities_dropped"]
iso["isolated"] = bool(iso["net_namespace"] and iso["pid_namespace"] and iso["ipc_namespace"]
                       and iso["mount_namespace"] and iso["read_only_mounts"] and "/tmp" in iso["tmpfs"]
                       and unprivileged)
if not iso["isolated"] and not req["allow_unisolated"]:
    report(type="refused", **iso)
    _exit(3)
low = 3
for fd in KEEP:
    os.closerange(low, fd)
    low = fd + 1
os.closerange(low, 1 << 16)
report(type="isolation", **iso)
mode, nonce, entry = req["mode"], req.get("nonce"), req.get("entry_point")
program, setup, tests = req.get("program"), req.get("setup"), req.get("tests")
CALLS, REPLIES, MAX_LINE = req.get("calls_fd"), req.get("replies_fd"), req.get("message_bytes")
req = None
def describe(e):
    try:
        return (str(e) if type(e) is SampleError else f"{type(e).__name__}: {e}")[:500]
    except BaseException:
        return type(e).__name__
def flush():
    try:
        sys.stdout.flush(); sys.stderr.flush()
    except BaseException:
        pass
if mode == "program":
    ok, error = False, None
    try:
        exec(compile(program, "<sample>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
        ok = True
    except BaseException as e:  # SystemExit too: sys.exit(0) before the end is not completion
        error = describe(e)
    flush()
    report(type="result", ok=ok, error=error, nonce=nonce)
    _exit(0 if ok else 1)
elif mode == "candidate":
    # Run the sample's program, then answer the judge's calls of its entry point until the judge
    # closes the pipe. Everything here is the sample's to tamper with; all it can do is answer.
    def send(msg):
        data = (_dumps(msg) + "\n").encode()
        while data:
            data = data[_write(REPLIES, data):]
    g = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(program, "<sample>", "exec"), g)
        if entry not in g:
            raise NameError(f"name {entry!r} is not defined")
        fn = g[entry]
        if not callable(fn):
            raise TypeError(f"{entry!r} is not callable")
    except BaseException as e:
        flush()
        send(["error", describe(e)])
        _exit(1)
    send(["ready"])
    for line in os.fdopen(CALLS, "rb"):
        msg = read_message(line)
        try:
            value = fn(*[decode(a) for a in msg[1]], **{k: decode(v) for k, v in msg[2]})
            reply = ["value", encode(value)]
        except BaseException as e:
            reply = ["raised", type(e).__name__, describe(e).partition(": ")[2]]
        flush()
        send(reply)
    _exit(0)
elif mode == "judge":
    # Trusted: the problem's setup and tests, with the entry point bound to a proxy whose every
    # call goes to the candidate's process and comes back as builtin values.
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no same-uid process may trace this one
    replies = os.fdopen(REPLIES, "rb")
    def receive():
        line = replies.readline(MAX_LINE + 1)
        if not line:
            raise SampleError("the candidate's process ended without answering (it exited, crashed or was killed)")
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            raise SampleError(f"the candidate answered with more than {MAX_LINE} bytes")
        return read_message(line)
    def candidate(*args, **kwargs):
        data = (_dumps(["call", [encode(a) for a in args], [[k, encode(v)] for k, v in kwargs.items()]]) + "\n").encode()
        try:
            while data:
                data = data[_write(CALLS, data):]
        except OSError:
            raise SampleError("the candidate's process ended before it was called (it exited, crashed or was killed)") from None
        msg = receive()
        if msg[0] == "value" and len(msg) == 2:
            return decode(msg[1])
        if msg[0] == "raised" and len(msg) == 3 and type(msg[1]) is str and type(msg[2]) is str:
            raise rebuilt(msg[1][:200], msg[2][:500])
        raise SampleError("the candidate answered with something that is not a reply")
    candidate.__name__ = candidate.__qualname__ = entry
    ok, error = False, None
    try:
        first = receive()
        if first[0] == "error" and len(first) == 2 and type(first[1]) is str:
            raise SampleError(f"the candidate's program failed: {first[1][:500]}")
        if first != ["ready"]:
            raise SampleError("the candidate did not start as a candidate does")
        g = {"__name__": "__main__", "__builtins__": builtins}
        exec(compile(setup, "<setup>", "exec"), g)
        g[entry] = candidate
        exec(compile(tests, "<tests>", "exec"), g)
        ok = True
    except BaseException as e:
        error = describe(e)
    flush()
    report(type="result", ok=ok, error=error)
    _exit(0 if ok else 1)
'''


def codec() -> dict[str, Any]:
    """The judge's and candidate's ``encode`` / ``decode`` / ``read_message`` (:data:`CODEC`), for tests."""
    namespace: dict[str, Any] = {}
    exec(compile(CODEC, "<codec>", "exec"), namespace)
    return namespace


class _Child:
    """One bootstrap process: its request, working directory, output and result records."""

    def __init__(self, request: dict[str, Any], limits: Limits, tag: str, pass_fds: Sequence[int] = ()):
        self.workdir = tempfile.mkdtemp(prefix="sharelora-sandbox-")
        os.chmod(self.workdir, 0o755)  # a sample dropped to uid nobody must reach it (chowned in the child)
        self.rfd, wfd = os.pipe()
        self.output, self.records, self.code = bytearray(), bytearray(), None
        self.proc: subprocess.Popen | None = None
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "HOME": self.workdir, "TMPDIR": self.workdir}
        request = {**request, "result_fd": wfd, "keep_fds": list(pass_fds), "rlimits": limits.rlimits(),
                   "disk_mb": limits.disk_mb, "message_bytes": MESSAGE_BYTES}
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-c", CODEC + BOOTSTRAP, tag], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         pass_fds=(wfd, *pass_fds), cwd=self.workdir, env=env,
                                         start_new_session=True, close_fds=True)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(wfd)
        try:
            self.proc.stdin.write(json.dumps(request).encode("utf-8"))
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def header(self) -> tuple[dict | None, dict | None]:
        """The records the bootstrap wrote before any sample code ran: (init, isolation or refused)."""
        lines = [_parse(line) for line in bytes(self.records).splitlines()[:2]]
        init = lines[0] if lines and lines[0] and lines[0].get("type") == "init" else None
        second = lines[1] if init and len(lines) > 1 and lines[1] and lines[1].get("type") in (
            "isolation", "refused") else None
        return init, second

    def later_records(self) -> list[dict]:
        return [r for r in map(_parse, bytes(self.records).splitlines()[2:]) if r]

    def isolation(self) -> dict[str, Any]:
        second = self.header()[1] or {}
        return {k: v for k, v in second.items() if k != "type"}

    def refused(self) -> bool:
        second = self.header()[1]
        return bool(second) and second["type"] == "refused"

    def kill(self) -> None:
        """SIGKILL the child's PID-namespace init (the namespace dies with it) and its process group.

        Called before the bootstrap is reaped, so its pid, which is the group id, cannot have been
        reused; the init is killed only while it is still the bootstrap's child.
        """
        if self.proc is None:
            return
        self._drain()
        init = (self.header()[0] or {}).get("pid")
        if type(init) is int and init > 1 and _parent_of(init) == self.proc.pid:
            try:
                os.kill(init, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _drain(self) -> None:
        """Whatever records are already in the pipe (the init record may not have been read yet)."""
        os.set_blocking(self.rfd, False)
        try:
            while len(self.records) < 1 << 16:
                chunk = os.read(self.rfd, 65536)
                if not chunk:
                    break
                self.records += chunk
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stdin) if self.proc is not None else ():
            try:
                f.close()
            except OSError:
                pass
        try:
            os.close(self.rfd)
        except OSError:
            pass
        shutil.rmtree(self.workdir, ignore_errors=True)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _watch(children: Sequence[_Child], main: _Child, limits: Limits, t0: float) -> str | None:
    """Read every child's output and records until ``main`` ends, the cap or the deadline; then kill all.

    Returns the status (``timeout``, ``output_limit``) or None; each child's exit code is in ``code``.
    """
    sel = selectors.DefaultSelector()
    for c in children:
        sel.register(c.proc.stdout, selectors.EVENT_READ, (c, "out"))
        sel.register(c.rfd, selectors.EVENT_READ, (c, "res"))
    status, exited_at = None, None
    deadline = t0 + limits.timeout_s
    while any(key.data[0] is main for key in sel.get_map().values()):
        now = time.monotonic()
        if now >= deadline:
            status = "timeout"
            break
        if exited_at is None and _has_exited(main.proc):
            exited_at = now
        if exited_at is not None and now - exited_at > 0.5:
            break  # the bootstrap is gone; whatever still holds the pipes is a leftover to kill
        for key, _ in sel.select(timeout=min(0.05, deadline - now)):
            c, kind = key.data
            fd = key.fileobj if kind == "res" else key.fileobj.fileno()
            chunk = os.read(fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            if kind == "out":
                room = limits.output_bytes - len(c.output)
                c.output += chunk[:max(0, room)]
                if len(chunk) > room:
                    status = "output_limit"
            elif len(c.records) < 1 << 16:
                c.records += chunk
        if status:
            break
    sel.close()
    for c in children:
        c.kill()  # also on success: nothing the sample started survives it
    for c in children:
        c.code = c.proc.wait()
    return status


def _has_exited(proc: subprocess.Popen) -> bool:
    """Whether the bootstrap has ended, without reaping it (its pid keeps the process group reserved)."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _parse(line: bytes | str) -> dict | None:
    try:
        r = json.loads(line)
    except (ValueError, TypeError):
        return None
    return r if isinstance(r, dict) else None


def _unavailable(iso: dict[str, Any]) -> SandboxUnavailable:
    missing = [name for name, ok in (
        ("a network namespace", iso.get("net_namespace")), ("a PID namespace", iso.get("pid_namespace")),
        ("an IPC namespace", iso.get("ipc_namespace")),
        ("a mount namespace with read-only mounts and its own /tmp",
         iso.get("mount_namespace") and iso.get("read_only_mounts") and "/tmp" in (iso.get("tmpfs") or ())),
        ("an unprivileged user (uid nobody or a user namespace without capabilities)",
         (iso.get("uid") != 0 and not iso.get("user_namespace")) or iso.get("capabilities_dropped")))
               if not ok]
    return SandboxUnavailable(
        f"the sandbox cannot isolate generated code on this machine (it lacks {', '.join(missing) or 'isolation'}), "
        "so it refuses to run it. Run where Linux namespaces are allowed (as root, or with unprivileged user "
        "namespaces), or, to run it anyway as your own user with only resource limits, pass "
        "--allow-unisolated-sandbox (sharelora eval) / allow_unisolated=True (library); the sandbox then prints "
        "what it does not protect")


_warned = threading.Lock()
_WARNED = False


def _warn_once(isolation: dict[str, Any]) -> None:
    """Print :data:`FALLBACK_WARNING` to stderr the first time an unisolated sample runs in this process."""
    global _WARNED
    if isolation.get("isolated", True):
        return
    with _warned:
        if _WARNED:
            return
        _WARNED = True
    print(FALLBACK_WARNING, file=sys.stderr, flush=True)


def _settings(namespaces: bool | None) -> bool:
    return USE_NAMESPACES if namespaces is None else namespaces


def run_program(program: str, limits: Limits = Limits(), *, namespaces: bool | None = None,
                allow_unisolated: bool = False) -> SandboxResult:
    """Run ``program`` (Python source) alone in a sandboxed child and return how it ended.

    Status ``completed`` means the program *says* it ran to its end: it runs in that interpreter
    and could forge it. Use it to test the isolation; judge samples with :func:`run_check`.

    Args:
        program: the whole program.
        limits: see :class:`Limits`.
        namespaces: False skips the namespaces (tests of the fallback); None: :data:`USE_NAMESPACES`.
        allow_unisolated: run the program even where the child is not isolated (see the module
            docstring); otherwise that raises :class:`SandboxUnavailable` before it runs.
    """
    result = _run_program(program, limits, _settings(namespaces), allow_unisolated)
    _warn_once(result.isolation)
    return result


def _run_program(program: str, limits: Limits, namespaces: bool, allow_unisolated: bool) -> SandboxResult:
    tag = "sharelora-sandbox-" + secrets.token_hex(8)
    nonce = secrets.token_hex(16)
    t0 = time.monotonic()
    child = _Child({"mode": "program", "program": program, "nonce": nonce, "namespaces": namespaces,
                    "allow_unisolated": allow_unisolated}, limits, tag)
    try:
        status = _watch([child], child, limits, t0)
    finally:
        child.close()
    if child.refused():
        raise _unavailable(child.isolation())
    result = next((r for r in child.later_records() if r.get("type") == "result" and r.get("nonce") == nonce), None)
    if status is None:
        if result is None:
            status, error = "exited", f"the sample ended without a result (exit status {child.code})"
        elif result.get("ok") and child.code == 0:
            status, error = "completed", None
        else:
            status, error = "failed", result.get("error") or f"exit status {child.code}"
    else:
        error = _limit_error(status, limits)
    return SandboxResult(status, error, child.code, child.output.decode("utf-8", errors="replace"),
                         round(time.monotonic() - t0, 3), child.isolation(), tag)


def run_check(check: Check, limits: Limits = Limits(), *, namespaces: bool | None = None,
              allow_unisolated: bool = False) -> SandboxResult:
    """Judge one sample: its program in one sandboxed child, the tests in another (see the module docstring).

    ``passed`` comes only from the judge, which runs ``check.setup`` and ``check.tests`` (trusted)
    with ``check.entry_point`` bound to a proxy of the candidate's function; values cross as
    builtin types only. Both children get ``limits``; the wall clock covers both.

    Args:
        check: the sample and its tests (:class:`Check`).
        limits, namespaces, allow_unisolated: as for :func:`run_program`.
    """
    tag = "sharelora-sandbox-" + secrets.token_hex(8)
    namespaces = _settings(namespaces)
    t0 = time.monotonic()
    calls_r, calls_w = os.pipe()
    replies_r, replies_w = os.pipe()
    common = {"entry_point": check.entry_point, "namespaces": namespaces, "allow_unisolated": allow_unisolated}
    children: list[_Child] = []
    try:
        children.append(_Child({**common, "mode": "candidate", "program": check.program, "calls_fd": calls_r,
                                "replies_fd": replies_w}, limits, tag, (calls_r, replies_w)))
        children.append(_Child({**common, "mode": "judge", "setup": check.setup, "tests": check.tests,
                                "calls_fd": calls_w, "replies_fd": replies_r}, limits, tag, (calls_w, replies_r)))
        for fd in (calls_r, calls_w, replies_r, replies_w):
            os.close(fd)
        calls_r = calls_w = replies_r = replies_w = -1
        sample, judge = children
        status = _watch(children, judge, limits, t0)
    finally:
        for fd in (calls_r, calls_w, replies_r, replies_w):
            if fd >= 0:
                os.close(fd)
        for c in children:
            c.close()
    for c in children:
        if c.refused():
            raise _unavailable(c.isolation())
    _warn_once(sample.isolation())
    result = next((r for r in judge.later_records() if r.get("type") == "result"), None)
    if status is None:
        if result is None:
            status, error = "exited", f"the judge ended without a verdict (exit status {judge.code})"
        elif result.get("ok") is True and judge.code == 0:
            status, error = "passed", None
        else:
            status, error = "failed", result.get("error") or f"exit status {judge.code}"
    else:
        error = _limit_error(status, limits)
    return SandboxResult(status, error, judge.code, sample.output.decode("utf-8", errors="replace"),
                         round(time.monotonic() - t0, 3), sample.isolation(), tag,
                         judge.output.decode("utf-8", errors="replace"))


def _limit_error(status: str, limits: Limits) -> str:
    return {"timeout": f"killed after the {limits.timeout_s:g} s wall-clock limit",
            "output_limit": f"killed after printing more than {limits.output_bytes} bytes"}[status]


def _run_all(run: Callable[[Any], SandboxResult], items: Sequence[Any], workers: int, progress: bool, desc: str,
             on_result: Callable[[int, SandboxResult], None] | None) -> list[SandboxResult]:
    from tqdm.auto import tqdm

    results: list[SandboxResult | None] = [None] * len(items)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(items), desc=desc, disable=not progress) as bar:
        futures = {pool.submit(run, item): i for i, item in enumerate(items)}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            if on_result is not None:
                on_result(i, results[i])
            bar.update(1)
    return results  # type: ignore[return-value]


def run_programs(programs: Sequence[str], limits: Limits = Limits(), *, workers: int = 2,
                 progress: bool = False, desc: str = "sandbox", allow_unisolated: bool = False,
                 on_result: Callable[[int, SandboxResult], None] | None = None) -> list[SandboxResult]:
    """:func:`run_program` over ``programs``, ``workers`` children at a time, results in order."""
    return _run_all(lambda p: run_program(p, limits, allow_unisolated=allow_unisolated), programs, workers,
                    progress, desc, on_result)


def run_checks(checks: Sequence[Check], limits: Limits = Limits(), *, workers: int = 2,
               progress: bool = False, desc: str = "sandbox", allow_unisolated: bool = False,
               on_result: Callable[[int, SandboxResult], None] | None = None) -> list[SandboxResult]:
    """:func:`run_check` over ``checks``, ``workers`` samples (two children each) at a time, results in order."""
    return _run_all(lambda c: run_check(c, limits, allow_unisolated=allow_unisolated), checks, workers,
                    progress, desc, on_result)


_ISOLATION: dict[bool, dict[str, Any]] = {}


def isolation(namespaces: bool | None = None) -> dict[str, Any]:
    """What the sandbox gets on this machine (namespaces, uid, read-only mounts, rlimits), measured once.

    ``isolated`` says whether samples run isolated here (else they are refused unless allowed).
    """
    namespaces = _settings(namespaces)
    if namespaces not in _ISOLATION:
        r = _run_program("pass", Limits(timeout_s=20), namespaces, allow_unisolated=True)  # a trusted probe
        if not r.completed:
            raise RuntimeError(f"the sandbox cannot run even an empty program here: {r.status}: {r.error}\n{r.output}")
        _ISOLATION[namespaces] = r.isolation
    return dict(_ISOLATION[namespaces])


def require_isolation(allow_unisolated: bool = False) -> dict[str, Any]:
    """:func:`isolation`, or :class:`SandboxUnavailable` where samples would run unisolated and
    ``allow_unisolated`` is False; call it before work that ends in running samples (e.g. generation).
    Where the fallback is allowed, :data:`FALLBACK_WARNING` is printed (once per process)."""
    iso = isolation()
    if not iso.get("isolated"):
        if not allow_unisolated:
            raise _unavailable(iso)
        _warn_once(iso)
    return iso
