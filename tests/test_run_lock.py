"""One writer per output directory: a second run refuses at once, a lock left by kill -9 is taken over."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from training_tiny import save_tiny_model_dir, tiny_bundle, tiny_data, write_csv

from sharelora.cli import main
from sharelora.training import TrainConfig, train
from sharelora.training import lock as lock_module
from sharelora.training.compare import compare
from sharelora.training.lock import LOCK_NAME, OutputDirLockedError, output_dir_lock

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the holder is killed with SIGKILL")

HOLD = r"""
import sys, time
from sharelora.training.lock import output_dir_lock
with output_dir_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


def config(tmp_path, name="run", **kw):
    values = dict(model="tiny-bert", dataset="tiny", method="sharea", epochs=1, batch_size=8,
                  output_dir=str(tmp_path / name))
    values.update(kw)
    return TrainConfig(**values)


def run(tmp_path, name="run", **kw):
    train_kw = {k: kw.pop(k) for k in ("resume", "overwrite", "on_step") if k in kw}
    return train(config(tmp_path, name, **kw), bundle=tiny_bundle(tmp_path), data=tiny_data(), progress=False,
                 **train_kw)


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of tmp_path/run (until it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_run_into_a_directory_another_process_writes_refuses_at_once(holder, tmp_path):
    bundle, data = tiny_bundle(tmp_path), tiny_data()
    start = time.perf_counter()
    with pytest.raises(OutputDirLockedError) as refused:
        train(config(tmp_path), bundle=bundle, data=data, progress=False)
    assert time.perf_counter() - start < 1.0  # no waiting, nothing loaded
    message = str(refused.value)
    assert str(tmp_path / "run") in message and f"pid {holder.pid} on host {socket.gethostname()}" in message
    assert "wait for it to finish" in message and "--output-dir" in message
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # nothing written
    assert holder.poll() is None


def test_the_command_line_refuses_with_a_one_line_error_and_exit_status_2(holder, tmp_path, capsys):
    start = time.perf_counter()
    assert main(["train", "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert time.perf_counter() - start < 2.0
    err = capsys.readouterr().err
    assert err.startswith(f"sharelora train: error: output directory {tmp_path / 'run'} is in use")
    assert f"pid {holder.pid}" in err


def test_a_lock_left_by_a_killed_process_is_taken_over(holder, tmp_path, capsys):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    left = tmp_path / "run" / LOCK_NAME
    assert json.loads(left.read_text())["pid"] == holder.pid  # kill -9 leaves the file behind
    assert run(tmp_path)["status"] == "finished"
    assert f"was left by pid {holder.pid}" in capsys.readouterr().err
    assert not left.exists()


def test_the_lock_names_this_process_while_the_run_is_active(tmp_path):
    seen = []
    run(tmp_path, on_step=lambda step: seen.append(json.loads((tmp_path / "run" / LOCK_NAME).read_text())))
    assert seen and all(h["pid"] == os.getpid() and h["host"] == socket.gethostname() and h["started"] for h in seen)
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # removed when the run ends


def test_a_stale_lock_file_is_not_taken_for_a_run(tmp_path):
    def leave_stale_lock():
        (tmp_path / "run").mkdir(exist_ok=True)
        (tmp_path / "run" / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))

    leave_stale_lock()
    assert run(tmp_path, on_step=lambda step: step == 3)["status"] == "interrupted"  # a fresh start, not "exists"
    leave_stale_lock()
    resumed = run(tmp_path, resume=True)
    assert resumed["status"] == "finished" and resumed["resumed"] == 1
    leave_stale_lock()
    assert run(tmp_path, overwrite=True)["resumed"] == 0


# --- comparisons: their own directory is locked, each run's directory too ------------------------------
@pytest.fixture(scope="module")
def local_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    model_dir = save_tiny_model_dir(root / "tiny-bert")
    data_dir = root / "data"
    data_dir.mkdir()
    for split, rows in tiny_data(n_train=16, n_dev=8, n_test=8).splits.items():
        write_csv(data_dir / f"{split}.csv", rows)
    return TrainConfig(model=str(model_dir), dataset=str(data_dir), epochs=1, batch_size=8, max_eval_examples=8)


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "child-processes"])
def test_a_comparison_and_its_runs_do_not_lock_each_other_out(local_inputs, tmp_path, isolate):
    methods = ["sharea"] if isolate else ["lora", "sharea"]  # a child process costs a Python start
    summary = compare(local_inputs, methods, [0], tmp_path / "cmp", isolate=isolate)
    assert [r["method"] for r in summary["rows"]] == methods
    assert not list((tmp_path / "cmp").rglob(LOCK_NAME))


def test_a_second_comparison_into_the_same_directory_refuses(local_inputs, tmp_path):
    with output_dir_lock(tmp_path / "cmp"):
        with pytest.raises(OutputDirLockedError, match=f"pid {os.getpid()}"):
            compare(local_inputs, ["sharea"], [0], tmp_path / "cmp", isolate=False)
    assert not (tmp_path / "cmp" / "sharea-s0").exists()


# --- where flock is unavailable: the file itself is the lock -------------------------------------------------
class NoFlock:
    """An fcntl whose flock the file system refuses, as some network mounts do."""

    LOCK_EX, LOCK_NB = 2, 4

    @staticmethod
    def flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")


@pytest.fixture(params=["no fcntl", "flock refused"])
def without_flock(request, monkeypatch):
    monkeypatch.setattr(lock_module, "fcntl", None if request.param == "no fcntl" else NoFlock)


def test_without_flock_a_held_directory_is_refused(without_flock, tmp_path):
    with output_dir_lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(OutputDirLockedError, match=f"pid {os.getpid()}"):
            with output_dir_lock(tmp_path):
                pass
    assert not path.exists()


def test_without_flock_a_lock_of_a_dead_process_on_this_host_is_taken_over(without_flock, tmp_path, capsys):
    pid = dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with output_dir_lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"was left by pid {pid}" in capsys.readouterr().err


def test_without_flock_a_lock_from_another_host_is_left_to_the_user(without_flock, tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere"}))
    with pytest.raises(OutputDirLockedError, match=f"host elsewhere.*delete {re.escape(str(tmp_path / LOCK_NAME))}"):
        with output_dir_lock(tmp_path):
            pass
