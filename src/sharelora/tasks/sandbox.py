"""Run untrusted generated Python (HumanEval completions) in a separate, limited process per sample.

Model output is never executed in the evaluator's process. :func:`run_program` starts a fresh
interpreter (``python -I -c BOOTSTRAP``) in its own session and process group, hands it the
program on stdin (then stdin is ``/dev/null``) and reads back, through pipes, at most
``Limits.output_bytes`` of stdout+stderr and one JSON result line on a dedicated file
descriptor. Inside the child, before a line of the sample runs, the bootstrap applies what this
machine permits, strongest first:

====================  ======================================================================
no network            a new network namespace (``unshare(CLONE_NEWNET)``: no interface but a
                      loopback that is down, so every connect / bind fails); on top of that an
                      audit hook refuses ``socket.__new__`` / ``connect`` / ``bind`` /
                      ``getaddrinfo``. Without namespaces the hook alone blocks Python's
                      sockets; code reaching libc through ``ctypes`` is not stopped then.
processes             a new PID namespace (the sample is pid 2 under a pid 1 that only waits:
                      when the sample ends, or pid 1 is killed, the kernel kills every process
                      of the namespace, including ones that called
                      ``setsid``; no process outside is addressable, so it cannot signal the
                      evaluator) and ``RLIMIT_NPROC``. RLIMIT_NPROC counts the processes of the
                      sample's real uid and is not enforced for root, so a root evaluator runs
                      the sample as ``nobody`` (uid 65534; the interpreter's sys.path folders
                      that nobody cannot read, e.g. pyenv's under /root, are bind-mounted
                      read-only into the sandbox's /tmp; where that is impossible the sample
                      stays root and ``isolation()["uid"]`` says 0); an unprivileged evaluator
                      gets RLIMIT_NPROC per user namespace. The audit hook also refuses ``subprocess``,
                      ``os.system``, ``os.exec*`` / ``spawn*`` and signals to other processes.
files                 a new mount namespace: every existing mount is bind-remounted read-only
                      (MS_BIND, so only this namespace's view changes, never the file system),
                      and fresh size-capped tmpfs (``Limits.disk_mb``) are mounted on ``/tmp``,
                      ``/var/tmp`` and ``/dev/shm``; the working directory is a new folder in
                      that ``/tmp``. ``RLIMIT_FSIZE`` caps any one file. The evaluator's own
                      temporary directory (the fallback working directory) is removed after the
                      run.
CPU, memory, files    ``RLIMIT_CPU`` (soft; SIGKILL one second later), ``RLIMIT_AS``,
                      ``RLIMIT_NOFILE``, ``RLIMIT_CORE = 0``.
wall clock            the evaluator kills the whole process group (and the namespace's pid 1,
                      whatever its group) with SIGKILL after ``Limits.timeout_s``.
====================  ======================================================================

:func:`isolation` reports which rows this machine got (also in every :class:`SandboxResult`).
Where namespaces are refused (a container without CAP_SYS_ADMIN and without user namespaces),
what remains is the rlimits, the process-group kill and the audit hook: then a sample that
reaches libc through ``ctypes`` can open sockets, signal same-user processes and write files the
evaluator's user may write, and a forked child that calls ``setsid`` outlives the kill.

A sample *passes* when its program runs to the end without an exception: the bootstrap then
writes ``{"ok": true, "nonce": ...}`` (the nonce came on stdin, so printing cannot fake it) and
leaves with ``os._exit(0)``, skipping anything the sample registered with ``atexit``.
``sys.exit(0)``, ``os._exit(0)``, a signal, a timeout or an output past the cap are failures.
This protects the evaluator from a sample; it is no defence against a sample written to forge
its own result (it runs in the bootstrap's interpreter and could find the nonce by
introspection).
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
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any



@dataclass(frozen=True)
class Limits:
    """What one sample may use.

    Attributes:
        timeout_s: wall clock from the start of the child interpreter to its end (startup included).
        cpu_s: CPU seconds (RLIMIT_CPU); None = ceil(timeout_s).
        memory_mb: address space (RLIMIT_AS) of the child, interpreter included (~30 MB).
        file_mb: largest file the child may write (RLIMIT_FSIZE).
        disk_mb: size of each tmpfs mounted on /tmp, /var/tmp, /dev/shm (mount namespace only).
        processes: RLIMIT_NPROC (processes of the sample's uid).
        open_files: RLIMIT_NOFILE.
        output_bytes: stdout+stderr kept; a sample printing more is killed (status ``output_limit``).
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


@dataclass
class SandboxResult:
    """The outcome of one sample.

    ``status``: ``passed``; ``failed`` (an exception, ``error`` names it); ``exited`` (the process
    ended without a result line: ``os._exit``, a signal, a crash); ``timeout``; ``output_limit``.
    """

    status: str
    error: str | None = None
    exit_code: int | None = None
    output: str = ""
    seconds: float = 0.0
    isolation: dict[str, Any] = field(default_factory=dict)
    tag: str = ""  # in the child's argv (never the nonce): lets a test find leftover processes

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The child's first code. It must not import the sample's modules (nothing of sharelora): a fresh
# interpreter in isolated mode (-I: no PYTHON* variables, no user site, no script dir on sys.path).
BOOTSTRAP = r'''
import builtins, ctypes, json, os, resource, signal, sys
_write, _dumps, _exit = os.write, json.dumps, os._exit
req = json.loads(sys.stdin.buffer.read().decode("utf-8"))
null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
RES = req["result_fd"]
def report(**d):
    try:
        _write(RES, (_dumps(d) + "\n").encode())
    except OSError:
        pass
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWUSER, NEWPID, NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
iso = {"net_namespace": False, "pid_namespace": False, "mount_namespace": False, "read_only_mounts": 0,
       "tmpfs": [], "uid": os.getuid(), "user_namespace": False, "audit_hook": False, "rlimits": {}}
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
done = 0
if want:
    tries = [NEWNET | NEWPID | NEWNS, NEWNET | NEWPID, NEWNET] if root else []
    tries += [NEWUSER | NEWNET | NEWPID | NEWNS, NEWUSER | NEWNET | NEWPID, NEWUSER | NEWNET]
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
iso["mount_namespace"] = bool(done & NEWNS)
if done & NEWPID:
    pid = os.fork()
    if pid:
        # Still in the caller's PID namespace: report the namespace's pid 1 so the evaluator can
        # kill it (and with it the namespace) whatever process group it moves to; mirror its exit.
        report(type="init", pid=pid)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        code = os.waitstatus_to_exitcode(status)
        _exit(code if code >= 0 else 128 - code)
    # The namespace's pid 1: it only waits. The sample is its child (pid 2), so the sample gets
    # ordinary signal semantics and cannot kill its init (signals from inside to pid 1 without a
    # handler are dropped); when the sample ends, pid 1 ends and the kernel kills the rest.
    iso["pid_namespace"] = True
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the bootstrap
    pid = os.fork()
    if pid:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        code = os.waitstatus_to_exitcode(status)
        _exit(code if code >= 0 else 128 - code)
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
os.closerange(3, RES)
os.closerange(RES + 1, 1 << 16)
report(type="isolation", **iso)
nonce = req["nonce"]
program = req["program"]
req = None
ok, error = False, None
try:
    exec(compile(program, "<sample>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
    ok = True
except BaseException as e:  # SystemExit too: sys.exit(0) before the checks is not a pass
    try:
        error = f"{type(e).__name__}: {e}"[:500]
    except BaseException:
        error = type(e).__name__
try:
    sys.stdout.flush(); sys.stderr.flush()
except BaseException:
    pass
report(type="result", ok=ok, error=error, nonce=nonce)
_exit(0 if ok else 1)
'''


def run_program(program: str, limits: Limits = Limits(), *, namespaces: bool = True) -> SandboxResult:
    """Run ``program`` (Python source) in a sandboxed child process and return what happened.

    Args:
        program: the whole program; it passes if it runs to its end without an exception.
        limits: see :class:`Limits`.
        namespaces: False skips the namespaces (tests of the fallback; never needed otherwise).
    """
    tag = "sharelora-sandbox-" + secrets.token_hex(8)
    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="sharelora-sandbox-")
    os.chmod(workdir, 0o755)  # a sample dropped to uid nobody must reach it (it is chowned in the child)
    rfd, wfd = os.pipe()
    t0 = time.monotonic()
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "HOME": workdir, "TMPDIR": workdir}
    request = {"program": program, "nonce": nonce, "result_fd": wfd, "rlimits": limits.rlimits(),
               "disk_mb": limits.disk_mb, "namespaces": namespaces}
    proc = None
    try:
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-c", BOOTSTRAP, tag], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(wfd,),
                                    cwd=workdir, env=env, start_new_session=True, close_fds=True)
        finally:
            os.close(wfd)
        try:
            proc.stdin.write(json.dumps(request).encode("utf-8"))
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        status, output, lines, code = _watch(proc, rfd, limits, t0)
    finally:
        os.close(rfd)
        if proc is not None and proc.poll() is None:
            _kill(proc, None)
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.monotonic() - t0
    records = [r for r in (_parse(line) for line in lines) if r]
    isolation = next((r for r in records if r.get("type") == "isolation"), {})
    isolation = {k: v for k, v in isolation.items() if k != "type"}
    result = next((r for r in records if r.get("type") == "result" and r.get("nonce") == nonce), None)
    text = output.decode("utf-8", errors="replace")
    if status is None:
        if result is None:
            status, error = "exited", f"the sample ended without a result (exit status {code})"
        elif result.get("ok") and code == 0:
            status, error = "passed", None
        else:
            status, error = "failed", result.get("error") or f"exit status {code}"
    else:
        error = {"timeout": f"killed after the {limits.timeout_s:g} s wall-clock limit",
                 "output_limit": f"killed after printing more than {limits.output_bytes} bytes"}[status]
    return SandboxResult(status, error, code, text, round(seconds, 3), isolation, tag)


def _watch(proc: subprocess.Popen, rfd: int, limits: Limits, t0: float):
    """Read output and result lines until both pipes close, the cap or the deadline; kill on either.

    Returns (status or None, output bytes, result lines, exit code).
    """
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(rfd, selectors.EVENT_READ, "res")
    output, result, status, init_pid = bytearray(), bytearray(), None, None
    deadline = t0 + limits.timeout_s
    exited_at = None
    while sel.get_map():
        now = time.monotonic()
        if now >= deadline:
            status = "timeout"
            break
        if exited_at is None and _has_exited(proc):
            exited_at = now
        if exited_at is not None and now - exited_at > 0.5:
            break  # the bootstrap is gone; whatever still holds the pipes is a leftover to kill
        for key, _ in sel.select(timeout=min(0.05, deadline - now)):
            fd = key.fileobj if key.data == "res" else key.fileobj.fileno()
            chunk = os.read(fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            if key.data == "out":
                room = limits.output_bytes - len(output)
                output += chunk[:max(0, room)]
                if len(chunk) > room:
                    status = "output_limit"
            elif len(result) < 1 << 16:
                result += chunk
                if init_pid is None:
                    init_pid = next((r["pid"] for r in map(_parse, bytes(result).splitlines())
                                     if r and r.get("type") == "init"), None)
        if status:
            break
    sel.close()
    _kill(proc, init_pid)  # also on success: nothing the sample started survives it
    code = proc.wait()
    return status, bytes(output), bytes(result).decode("utf-8", errors="replace").splitlines(), code


def _has_exited(proc: subprocess.Popen) -> bool:
    """Whether the bootstrap has ended, without reaping it (its pid keeps the process group reserved)."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill(proc: subprocess.Popen, init_pid: int | None) -> None:
    """SIGKILL the sample's PID-namespace init (the whole namespace dies with it) and its process group.

    Called before ``proc`` is reaped, so neither id can have been reused by another process: the
    init is the bootstrap's unreaped child, the group id is the bootstrap's own pid.
    """
    if init_pid is not None:
        try:
            os.kill(init_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _parse(line: bytes | str) -> dict | None:
    try:
        r = json.loads(line)
    except (ValueError, TypeError):
        return None
    return r if isinstance(r, dict) else None


def run_programs(programs: Sequence[str], limits: Limits = Limits(), *, workers: int = 2,
                 progress: bool = False, desc: str = "sandbox",
                 on_result: Callable[[int, SandboxResult], None] | None = None) -> list[SandboxResult]:
    """:func:`run_program` over ``programs``, ``workers`` children at a time, results in order."""
    from tqdm.auto import tqdm

    results: list[SandboxResult | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(programs), desc=desc, disable=not progress) as bar:
        futures = {pool.submit(run_program, p, limits): i for i, p in enumerate(programs)}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            if on_result is not None:
                on_result(i, results[i])
            bar.update(1)
    return results  # type: ignore[return-value]


_ISOLATION: dict[str, Any] | None = None


def isolation() -> dict[str, Any]:
    """What the sandbox gets on this machine (namespaces, uid, read-only mounts, rlimits), measured once."""
    global _ISOLATION
    if _ISOLATION is None:
        r = run_program("pass", Limits(timeout_s=20))
        if not r.passed:
            raise RuntimeError(f"the sandbox cannot run even an empty program here: {r.status}: {r.error}\n{r.output}")
        _ISOLATION = r.isolation
    return dict(_ISOLATION)
