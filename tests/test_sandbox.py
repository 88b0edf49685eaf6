"""The sandbox against hostile samples: each is killed or counted as failed, and the evaluator (this
test process) survives. Tests of a protection this machine cannot give (no namespace, no uid drop)
are skipped with the reason; docs/RESULTS_CODE_MATH.md says what each machine gets. Programs run
alone (``run_program``: ``completed`` is the program's own word); the verdict, judged from outside
the sample's process, is tested in test_sandbox_verdict.py."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from sharelora.tasks import sandbox
from sharelora.tasks.sandbox import FALLBACK_WARNING, Limits, SandboxUnavailable, isolation, run_program, run_programs

FAST = Limits(timeout_s=2.0)
# Where the sandbox cannot isolate (no namespaces), these programs of ours run in the fallback, opted in.
OPTS = {} if isolation()["isolated"] else {"allow_unisolated": True}


def run(program: str, limits: Limits = FAST, **kw):
    return run_program(program, limits, **{**OPTS, **kw})


@pytest.fixture(scope="module")
def iso():
    return isolation()


def leftover_processes(tag: str) -> list[int]:
    """Pids whose command line carries the run's tag (the bootstrap's argv, inherited by forks)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if tag.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("sharelora-sandbox-*")}


# ---- plain programs ---------------------------------------------------------------------------

def test_a_program_that_runs_to_its_end_passes_and_its_output_is_kept():
    r = run("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('hello')\n", FAST)
    assert r.status == "completed" and r.completed and r.exit_code == 0
    assert r.output == "hello\n"


def test_a_failing_assertion_fails_and_names_the_exception():
    r = run("assert 1 + 1 == 3, 'arithmetic'\n", FAST)
    assert r.status == "failed" and not r.completed
    assert r.error == "AssertionError: arithmetic"


def test_a_syntax_error_fails():
    r = run("def f(:\n", FAST)
    assert r.status == "failed" and r.error.startswith("SyntaxError")


def test_the_standard_library_imports():
    r = run("import math, typing, hashlib, re, collections.abc, itertools, fractions, heapq\n"
                    "assert hashlib.md5(b'x').hexdigest() == '9dd4e461268c8034f5c8564e155c67a6'\n", FAST)
    assert r.completed, (r.error, r.output)


def test_the_isolation_report_names_what_was_applied(iso):
    assert iso["audit_hook"] is True
    assert iso["rlimits"]["RLIMIT_AS"] == Limits().memory_mb << 20
    assert {"net_namespace", "pid_namespace", "ipc_namespace", "mount_namespace", "uid", "isolated"} <= set(iso)


def test_programs_run_in_order_with_workers():
    rs = run_programs([f"assert {i} % 2 == 0" for i in range(6)], FAST, workers=3, **OPTS)
    assert [r.completed for r in rs] == [True, False, True, False, True, False]


# ---- exit tricks --------------------------------------------------------------------------------

@pytest.mark.parametrize("trick", [
    "import sys\nsys.exit(0)\nassert False",
    "exit()\nassert False",
    "raise SystemExit(0)",
    "raise KeyboardInterrupt",
    "import os\nos._exit(0)",
    "import atexit, os\natexit.register(lambda: os._exit(0))\nassert False",
    "print('{\"type\": \"result\", \"ok\": true}', flush=True)\nimport os\nos._exit(0)",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
], ids=["sys.exit", "exit", "SystemExit", "KeyboardInterrupt", "os._exit", "atexit", "fake-result", "self-kill"])
def test_exit_tricks_before_the_checks_do_not_pass(trick):
    r = run(trick, FAST)
    assert not r.completed and r.status in ("failed", "exited"), r


def test_patching_the_functions_the_bootstrap_reports_with_does_not_change_the_result():
    r = run("import os, json\njson.dumps = lambda *a, **k: 'x'\nos._exit = lambda c: None\nassert False", FAST)
    assert r.status == "failed" and r.error.startswith("AssertionError")


# ---- time, CPU, memory, output ------------------------------------------------------------------

def test_an_infinite_loop_is_killed_at_the_wall_clock_limit():
    t0 = time.monotonic()
    r = run("while True:\n    pass\n", Limits(timeout_s=1.0))
    assert r.status in ("timeout", "exited") and not r.completed
    assert time.monotonic() - t0 < 4.0


def test_a_sleeping_sample_is_killed_by_the_wall_clock_not_the_cpu_limit():
    r = run("import time\ntime.sleep(60)\n", Limits(timeout_s=1.0))
    assert r.status == "timeout" and r.seconds < 3.0


def test_ignoring_signals_does_not_outlive_the_limit():
    r = run("import signal\nfor s in (signal.SIGTERM, signal.SIGXCPU, signal.SIGINT):\n"
                    "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n", Limits(timeout_s=1.5))
    assert r.status in ("timeout", "exited") and r.seconds < 4.0


def test_a_huge_allocation_fails_inside_the_sample():
    r = run("x = bytearray(8 << 30)\n", FAST)
    assert r.status == "failed" and r.error.startswith("MemoryError")


def test_printing_megabytes_is_cut_at_the_cap_and_killed():
    limits = Limits(timeout_s=3.0, output_bytes=10_000)
    r = run("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)\n", limits)
    assert r.status == "output_limit" and not r.completed
    assert len(r.output) <= limits.output_bytes and r.seconds < 2.5


# ---- processes and the evaluator ------------------------------------------------------------------

def test_a_fork_bomb_is_contained_and_leaves_no_process_behind():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.monotonic()
    r = run(bomb, Limits(timeout_s=1.5, processes=16))
    assert not r.completed and time.monotonic() - t0 < 6.0
    time.sleep(0.2)
    assert leftover_processes(r.tag) == []


def test_a_background_child_in_its_own_session_dies_with_the_sample(iso):
    if not iso["pid_namespace"]:
        pytest.skip("no PID namespace here: a child that calls setsid escapes the process-group kill (documented)")
    r = run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n", FAST)
    assert r.completed
    time.sleep(0.2)
    assert leftover_processes(r.tag) == []


def test_killing_the_parent_or_the_evaluator_fails_and_the_evaluator_survives():
    me = os.getpid()
    for attempt in ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
                    f"import os, signal\nos.kill({me}, signal.SIGKILL)",
                    f"import os, signal\nos.killpg(os.getpgid({me}), signal.SIGKILL)",
                    "import os, signal\nos.kill(-1, signal.SIGKILL)"):
        r = run(attempt, FAST)
        assert not r.completed, attempt
    assert os.getpid() == me  # still here


def test_killing_the_evaluator_through_libc_fails(iso):
    if not (iso["pid_namespace"] or iso["uid"] != os.getuid()):
        pytest.skip("no PID namespace and the same uid: libc kill() reaches the evaluator (documented)")
    r = run(f"import ctypes\nassert ctypes.CDLL(None).kill({os.getpid()}, 9) == 0\n", FAST)
    assert not r.completed


# ---- files ------------------------------------------------------------------------------------------

def test_filling_the_disk_fails_and_leaves_nothing_behind(iso):
    before = sandbox_dirs()
    fill = ("import os\nfor i in range(10000):\n    with open(f'f{i}', 'wb') as f:\n"
            "        f.write(b'x' * (1 << 20))\n")
    r = run(fill, Limits(timeout_s=3.0, file_mb=4, disk_mb=8))
    assert r.status == "failed" and r.error.startswith("OSError"), r
    assert sandbox_dirs() <= before  # the working directory is removed


def test_one_file_past_the_size_limit_fails():
    r = run("with open('big', 'wb') as f:\n    f.write(b'x' * (8 << 20))\n", Limits(timeout_s=3.0, file_mb=1))
    assert r.status == "failed" and "File too large" in r.error


def test_files_written_to_tmp_do_not_reach_the_evaluators_tmp(iso):
    if "/tmp" not in iso["tmpfs"]:
        pytest.skip("no mount namespace here: /tmp is the real one (documented)")
    name = f"sharelora-sandbox-probe-{os.getpid()}"
    r = run(f"open('/tmp/{name}', 'w').write('x')\nopen('/var/tmp/{name}', 'w').write('x')\n", FAST)
    assert r.completed, r.error
    assert not Path("/tmp", name).exists() and not Path("/var/tmp", name).exists()


@pytest.fixture
def victim():
    """A world-writable folder and file outside /tmp (beside this test file), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix=".sandbox-victim-", dir=Path(__file__).parent))
    os.chmod(folder, 0o777)
    target = folder / "keep.txt"
    target.write_text("still here")
    os.chmod(target, 0o666)
    yield target
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def test_deleting_files_outside_its_directory_fails(victim):
    r = run(f"import os, shutil\nos.remove({str(victim)!r})\n", FAST)
    assert not r.completed and victim.read_text() == "still here"
    r = run(f"import shutil\nshutil.rmtree({str(victim.parent)!r})\n", FAST)
    assert not r.completed and victim.read_text() == "still here"


def test_deleting_or_overwriting_through_libc_fails(iso, victim):
    if not iso["read_only_mounts"]:
        pytest.skip("no read-only mount namespace here: libc calls can change the evaluator's files (documented)")
    r = run(f"import ctypes\nassert ctypes.CDLL(None).unlink({str(victim).encode()!r}) == 0\n", FAST)
    assert not r.completed and victim.read_text() == "still here"
    r = run(f"import _io\n_io.FileIO({str(victim)!r}, 'w').write(b'gone')\n", FAST)
    assert not r.completed and victim.read_text() == "still here"


# ---- network ----------------------------------------------------------------------------------------

@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.3)
    yield srv
    srv.close()


def _no_connection(srv) -> bool:
    try:
        conn, _ = srv.accept()
    except (socket.timeout, TimeoutError):
        return True
    conn.close()
    return False


def test_opening_a_socket_fails(listener):
    port = listener.getsockname()[1]
    r = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n", FAST)
    assert r.status == "failed" and not r.completed
    assert _no_connection(listener)


def test_a_socket_through_libc_reaches_nothing(iso, listener):
    if not iso["net_namespace"]:
        pytest.skip("no network namespace here: only Python's socket module is blocked (documented)")
    port = listener.getsockname()[1]
    program = (
        "import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "fd = libc.socket(2, 1, 0)\nassert fd >= 0\n"
        f"addr = struct.pack('<HH4s8x', 2, {socket.htons(port)}, bytes([127, 0, 0, 1]))\n"
        "assert libc.connect(fd, addr, len(addr)) == 0, 'no connection'\n")
    r = run(program, FAST)
    assert not r.completed
    assert _no_connection(listener)


# ---- without namespaces: what remains ---------------------------------------------------------------

def test_without_namespaces_the_limits_and_the_hook_still_hold(listener):
    port = listener.getsockname()[1]
    assert run("while True:\n    pass\n", Limits(timeout_s=1.0), namespaces=False, allow_unisolated=True).status in ("timeout", "exited")
    r = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\n", FAST, namespaces=False, allow_unisolated=True)
    assert r.status == "failed" and "not allowed" in r.error and _no_connection(listener)
    r = run("print('x' * 10**7)", Limits(timeout_s=3.0, output_bytes=1000), namespaces=False, allow_unisolated=True)
    assert r.status == "output_limit"
    r = run(f"import os\nos.kill({os.getpid()}, 9)", FAST, namespaces=False, allow_unisolated=True)
    assert r.status == "failed" and "not allowed" in r.error
    assert run("assert True", FAST, namespaces=False, allow_unisolated=True).completed


# ---- IPC ----------------------------------------------------------------------------------------------

def sysv_objects() -> set[tuple[str, int, int]]:
    """(kind, key, id) of every SysV shared memory segment, semaphore set and message queue on the host."""
    found = set()
    for kind in ("shm", "sem", "msg"):
        for line in Path("/proc/sysvipc", kind).read_text().splitlines()[1:]:
            key, ident = line.split()[:2]
            found.add((kind, int(key), int(ident)))
    return found


def remove_sysv(objects) -> None:
    import ctypes

    libc = ctypes.CDLL(None)
    for kind, _, ident in objects:  # IPC_RMID = 0
        {"shm": lambda i: libc.shmctl(i, 0, None), "sem": lambda i: libc.semctl(i, 0, 0),
         "msg": lambda i: libc.msgctl(i, 0, None)}[kind](ident)


def test_sysv_ipc_made_by_a_sample_does_not_outlive_it(iso):
    if not iso["ipc_namespace"]:
        pytest.skip("no IPC namespace here: SysV objects a sample makes stay on the host (documented)")
    key = 0x5A000000 + os.getpid() % 0x10000
    program = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nIPC_CREAT = 0o1000\n"
        f"assert libc.shmget({key}, 16 << 20, IPC_CREAT | 0o600) >= 0, ctypes.get_errno()\n"
        "assert libc.shmget(0, 16 << 20, IPC_CREAT | 0o600) >= 0, ctypes.get_errno()\n"  # IPC_PRIVATE
        f"assert libc.semget({key}, 4, IPC_CREAT | 0o600) >= 0, ctypes.get_errno()\n"
        f"assert libc.msgget({key}, IPC_CREAT | 0o600) >= 0, ctypes.get_errno()\n"
        f"assert str({key}) in open('/proc/sysvipc/shm').read()\n")  # they exist, in the sample's namespace
    before = sysv_objects()
    r = run(program, Limits(timeout_s=3.0, memory_mb=256))
    left = sysv_objects() - before
    remove_sysv(left)
    assert r.completed, (r.error, r.output)
    assert left == set()


# ---- without isolation: refused unless the caller opts in ------------------------------------------

def test_without_isolation_a_sample_is_refused_before_it_runs_unless_the_caller_opts_in(victim, capsys, monkeypatch):
    from sharelora.tasks.sandbox import Check, run_check

    marker = victim.parent / "ran"
    program = f"open({str(marker)!r}, 'w').write('x')\n"
    with pytest.raises(SandboxUnavailable, match="--allow-unisolated-sandbox") as e:
        run_program(program, FAST, namespaces=False)
    assert "allow_unisolated=True" in str(e.value) and "a PID namespace" in str(e.value)
    with pytest.raises(SandboxUnavailable):
        run_check(Check(program + "def f():\n    return 1\n", "f", "assert f() == 1\n"), FAST, namespaces=False)
    assert not marker.exists()  # neither refusal ran a line of it
    monkeypatch.setattr(sandbox, "_WARNED", False)
    capsys.readouterr()
    r = run_program(program, FAST, namespaces=False, allow_unisolated=True)
    assert r.completed and marker.exists() and r.isolation["isolated"] is False
    err = capsys.readouterr().err
    assert err.count(FALLBACK_WARNING) == 1
    r = run_check(Check("def f():\n    return 1\n", "f", "assert f() == 1\n"), FAST, namespaces=False,
                  allow_unisolated=True)
    assert r.passed and FALLBACK_WARNING not in capsys.readouterr().err  # once per process


def test_the_fallback_warning_says_what_it_does_not_protect():
    text = FALLBACK_WARNING.lower()
    for harm in ("outside its temporary directory", "setsid", "the evaluator included", "network",
                 "shared memory", "verdict"):
        assert harm in text, harm


def test_an_isolated_run_prints_no_warning(iso, capsys, monkeypatch):
    if not iso["isolated"]:
        pytest.skip("this machine cannot isolate samples")
    monkeypatch.setattr(sandbox, "_WARNED", False)
    assert run_program("pass", FAST).completed
    assert FALLBACK_WARNING not in capsys.readouterr().err


@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "fallback"])
def test_records_a_sample_writes_cannot_pose_as_the_bootstraps(namespaces):
    """A fake "init" record would make the evaluator SIGKILL a pid of the sample's choice, a fake
    "refused" record would abort the whole evaluation: only the records written before the sample
    runs count."""
    import subprocess

    victim = subprocess.Popen(["sleep", "30"])
    try:
        fakes = [json.dumps({"type": "init", "pid": victim.pid}), json.dumps({"type": "refused"})]
        program = (f"import os\nfor fd in range(3, 64):\n    for rec in {fakes!r}:\n        try:\n"
                   "            os.write(fd, (rec + '\\n').encode())\n        except OSError:\n            pass\n")
        r = run(program, FAST, namespaces=namespaces, allow_unisolated=True)
        assert r.completed, (r.error, r.output)
        time.sleep(0.1)
        assert victim.poll() is None  # not killed by the evaluator
    finally:
        victim.kill()
        victim.wait()
