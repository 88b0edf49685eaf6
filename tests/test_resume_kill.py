"""kill -9 a `sharelora train` process, then --resume it: the result is bit for bit the uninterrupted run's.

Every run here is a real process on a tiny local model and CSV data (no downloads) with gradient
accumulation (4 micro-batches a step) and dropout 0.1 (adapter and model), so the generator
states, the data order and the accumulation position all have to come back exactly. One epoch, so
that the adapter (the best epoch's weights) is the last step's. "The same" is
the strictest it can be: every tensor of the final adapter and of the final resume checkpoint
(weights, AdamW moments, generator states) is equal byte for byte, and so is the adapter file's
tensor section (the safetensors header's metadata map is the one part whose order may differ).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from training_tiny import save_tiny_model_dir, self_killing_cli, tiny_data, write_csv

pytestmark = pytest.mark.skipif(os.name != "posix", reason="kill -9 is POSIX")

STEPS = 18  # one epoch of 144 examples in batches of 8
GRAD_ACCUM = 4
CHECKPOINT_EVERY = 2


SELF_KILLING_TRAIN = self_killing_cli("loop")  # kill -9 just before the forward of micro-batch argv[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    model_dir = save_tiny_model_dir(root / "tiny-bert")
    data_dir = root / "data"
    data_dir.mkdir()
    for split, rows in tiny_data(n_train=144, n_dev=16, n_test=16).splits.items():
        write_csv(data_dir / f"{split}.csv", rows)
    return model_dir, data_dir


def train_args(inputs, out, *extra):
    model_dir, data_dir = inputs
    return ["train", "--model", str(model_dir), "--dataset", str(data_dir), "--epochs", "1", "--batch-size", "8",
            "--grad-accum", str(GRAD_ACCUM), "--dropout", "0.1", "--checkpoint-every", str(CHECKPOINT_EVERY),
            "--seed", "3", "--threads", "1", "--keep-state", "--no-progress", "--output-dir", str(out), *extra]


def sharelora(*args):
    return [sys.executable, "-m", "sharelora.cli", *args]


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("kill") / "uninterrupted"
    proc = subprocess.run(sharelora(*train_args(inputs, out)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def checkpoint_step(out):
    """The step of ``out``'s resume checkpoint; None while there is none."""
    try:
        with safe_open(str(out / "state" / "checkpoint.safetensors"), framework="pt") as f:
            return json.loads(f.metadata()["state"])["step"]
    except Exception:  # not there yet (or, on a file system without atomic rename, half written)
        return None


def kill_after_checkpoint(proc, out, rng, at_least, timeout=120.0):
    """SIGKILL ``proc`` at a random moment shortly after its checkpoint reached step ``at_least``.

    The moment is tied to a step rather than to wall time alone: a step takes from ~0.02 s to
    ~0.3 s on our CPUs, so a purely timed kill could land anywhere from the first step to after
    the run. The random part (up to 50 ms) puts it anywhere inside the following step or two.
    """
    deadline = time.monotonic() + timeout
    while (checkpoint_step(out) or 0) < at_least:
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before its checkpoint at step {at_least}"
        assert time.monotonic() < deadline, f"no checkpoint at step {at_least} in time"
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.05))
    assert proc.poll() is None, "the run finished before the kill; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return checkpoint_step(out)


def raw(t):
    return t.reshape(-1).view(torch.uint8)


def tensor_section(path):
    """The safetensors header without its metadata map, and the bytes of all tensors."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    return header, data[8 + n :]


def assert_bit_identical(a, b):
    for name in ("adapter/adapter_model.safetensors", "state/checkpoint.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys(), name
        differ = [k for k in x if x[k].dtype != y[k].dtype or x[k].shape != y[k].shape
                  or not torch.equal(x[k], y[k]) or not torch.equal(raw(x[k]), raw(y[k]))]
        assert not differ, f"{name}: {differ}"
    adapter = "adapter/adapter_model.safetensors"
    assert tensor_section(a / adapter) == tensor_section(b / adapter)


def train_records(out):
    """(kind, step, loss, lr, grad_norm) of every train record: the steps the run took, once each."""
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm")) for r in records]


def test_killed_twice_at_random_moments_then_resumed_equals_the_uninterrupted_run(inputs, uninterrupted, tmp_path):
    out, rng = tmp_path / "killed", random.Random()
    first = subprocess.Popen(sharelora(*train_args(inputs, out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    at_first = kill_after_checkpoint(first, out, rng, rng.choice(range(CHECKPOINT_EVERY, 10, CHECKPOINT_EVERY)))
    second = subprocess.Popen(sharelora(*train_args(inputs, out, "--resume")), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    at_second = kill_after_checkpoint(second, out, rng, min(at_first + rng.choice((2, 4)), STEPS - CHECKPOINT_EVERY))
    kills = f"killed with checkpoints at steps {at_first} and {at_second} of {STEPS}"
    assert first.returncode == second.returncode == -signal.SIGKILL, kills
    # at_second may be STEPS on a fast CPU: killed after the last checkpoint, in the final evaluation
    # or while saving the adapter; the resume must still finish it to the same bytes.
    assert 0 < at_first < at_second <= STEPS and not (out / "results.json").exists(), kills

    last = subprocess.run(sharelora(*train_args(inputs, out, "--resume")), capture_output=True, text=True, timeout=300)
    assert last.returncode == 0, last.stderr
    assert json.loads((out / "results.json").read_text())["resumed"] == 2
    assert_bit_identical(uninterrupted, out)
    assert train_records(out) == train_records(uninterrupted), kills


def test_killed_between_the_micro_batches_of_a_step_then_resumed_equals_the_uninterrupted_run(
        inputs, uninterrupted, tmp_path):
    # Micro-batch m (from 1) belongs to step (m - 1) // 4 + 1; (m - 1) % 4 of that step's micro-batches
    # are done (forward and backward, gradients accumulated) when it is killed: 1 to 3 of them here,
    # after the first checkpoint (step 2) and before the last step.
    m = random.choice([m for m in range(CHECKPOINT_EVERY * GRAD_ACCUM + 1, (STEPS - 1) * GRAD_ACCUM)
                       if (m - 1) % GRAD_ACCUM != 0])
    step, done = (m - 1) // GRAD_ACCUM + 1, (m - 1) % GRAD_ACCUM
    where = f"killed in step {step} after {done} of its {GRAD_ACCUM} micro-batches"
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", SELF_KILLING_TRAIN, str(m), *train_args(inputs, out)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert 0 < checkpoint_step(out) < step, where  # the accumulated gradients died with the process

    resumed = subprocess.run(sharelora(*train_args(inputs, out, "--resume")), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_bit_identical(uninterrupted, out)
    assert train_records(out) == train_records(uninterrupted), where
