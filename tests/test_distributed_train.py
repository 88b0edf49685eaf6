"""`sharelora train` under torchrun: two gloo processes on this CPU against one process of the same run.

Every run is a real `python -m torch.distributed.run --nproc-per-node 2 ... -m sharelora train` on
127.0.0.1 with a tiny local model and CSV data (no downloads). The shapes are chosen so that the
uneven cases happen: 81 training examples in global batches of 8 (the last step has one example, so
rank 1 runs a zero-weighted stand-in micro-batch to join the gradient sync), 2 micro-batches per
process and step, and 17 dev examples scored in batches of 4 (9 on rank 0, 8 on rank 1).

Why 1 and 2 processes agree only to rounding: a step's gradient is the same sum over the same
examples, but one process sums a micro-batch of 4 examples where two processes each sum 2 and then
add the two halves in the all-reduce (and pad their batches to other lengths), so the fp32 sums are
taken in another order; AdamW then carries those ~1e-7 relative differences into the weights.
The equivalence runs have no dropout: each process draws its own masks, so with dropout two
processes are a run with other masks, not the same numbers.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from training_tiny import self_killing_cli, tiny_bert, tiny_data, tiny_tokenizer, write_csv

pytestmark = pytest.mark.skipif(os.name != "posix" or not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(), reason="needs POSIX and gloo")

N_TRAIN, N_DEV, N_TEST = 81, 17, 15
BATCH, GRAD_ACCUM, EVAL_BATCH = 8, 2, 4
STEPS = -(-N_TRAIN // BATCH)  # one epoch: the adapter is the last step's
ADAPTER = "adapter/adapter_model.safetensors"


SELF_KILLING_TRAIN = self_killing_cli("loop")  # kill -9 just before the forward of micro-batch argv[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model_dir = root / "tiny-bert-no-dropout"
    model = tiny_bert()
    model.config.hidden_dropout_prob = 0.0  # the base model's own dropout off: see the module docstring
    model.save_pretrained(model_dir)
    tiny_tokenizer(model_dir).save_pretrained(model_dir)
    data_dir = root / "data"
    data_dir.mkdir()
    for split, rows in tiny_data(n_train=N_TRAIN, n_dev=N_DEV, n_test=N_TEST).splits.items():
        write_csv(data_dir / f"{split}.csv", rows)
    return model_dir, data_dir


def train_args(inputs, out, *extra, dropout="0"):
    model_dir, data_dir = inputs
    return ["train", "--model", str(model_dir), "--dataset", str(data_dir), "--epochs", "1",
            "--batch-size", str(BATCH), "--grad-accum", str(GRAD_ACCUM), "--eval-batch-size", str(EVAL_BATCH),
            "--dropout", dropout, "--lr", "5e-3", "--seed", "1", "--log-every", "1", "--checkpoint-every", "2",
            "--keep-state", "--no-progress", "--output-dir", str(out), *extra]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process(*args):
    return [sys.executable, "-m", "sharelora", *args, "--threads", "1"]


def two_processes(*args, script=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port())]
    return launcher + (["-m", "sharelora"] if script is None else [script]) + list(args)


def run(command, expect_ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "one"
    run(one_process(*train_args(inputs, out)))
    return out


@pytest.fixture(scope="module")
def ddp(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "two"
    run(two_processes(*train_args(inputs, out)))
    return out


def records(out, kind=None):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def relative_differences(a, b):
    """max |a - b| / max |b| per tensor of two adapter files (same keys)."""
    x, y = load_file(a / ADAPTER), load_file(b / ADAPTER)
    assert x.keys() == y.keys()
    return {k: ((x[k] - y[k]).abs().max() / y[k].abs().max().clamp(min=1e-30)).item() for k in y}


def test_two_processes_end_with_the_adapter_of_one_process(single, ddp):
    diffs = relative_differences(ddp, single)
    assert max(diffs.values()) <= 1e-4, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    # the steps took the same examples: the same losses, up to the rounding of the sums
    one, two = records(single, "train"), records(ddp, "train")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    for r1, r2 in zip(one, two):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5), r2["step"]


def test_rank_0_alone_writes_the_run(ddp):
    results = json.loads((ddp / "results.json").read_text())
    assert results["processes"] == 2 and len(results["peak_rss_mb_per_process"]) == 2
    assert results["examples"] == {"train": N_TRAIN, "dev": N_DEV, "test": N_TEST}
    kinds = [r["kind"] for r in records(ddp)]  # one record per step and evaluation, not one per process
    assert kinds == ["train"] * STEPS + ["eval", "test"]
    assert (ddp / "curves.png").is_file() and (ddp / "adapter" / "run_info.json").is_file()
    assert not (ddp / ".lock").exists()


def test_evaluation_gathers_every_dev_example_once_from_both_processes(single, ddp):
    (dev_one,), (dev_two,) = records(single, "eval"), records(ddp, "eval")
    # 9 examples scored on rank 0 and 8 on rank 1 (plus one repeated and dropped to even the batches)
    assert dev_two["examples"] == dev_one["examples"] == N_DEV
    assert dev_two["accuracy"] == dev_one["accuracy"]
    assert dev_two["loss"] == pytest.approx(dev_one["loss"], rel=1e-4)  # an example twice or missing: far off
    (test_one,), (test_two,) = records(single, "test"), records(ddp, "test")
    assert test_two["examples"] == N_TEST and test_two["accuracy"] == test_one["accuracy"]


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_run(inputs, tmp_path):
    # with dropout: every rank's generator states have to come back from the checkpoint
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    run(two_processes(*train_args(inputs, uninterrupted, dropout="0.1")))
    script = tmp_path / "self_killing_train.py"
    script.write_text(SELF_KILLING_TRAIN)
    kill_at = 2 * 6 + 2  # rank 0's micro-batches: 2 a step; killed after 1 of step 7's, checkpoint at step 6
    proc = run(two_processes(str(kill_at), *train_args(inputs, killed, dropout="0.1"), script=str(script)),
               expect_ok=False)
    assert proc.returncode != 0 and not (killed / "results.json").exists()
    checkpoint = json.loads(load_file_metadata(killed / "state" / "checkpoint.safetensors")["state"])
    assert checkpoint["step"] == 6 and len(checkpoint["rng_ranks"]) == 1

    run(two_processes(*train_args(inputs, killed, "--resume", dropout="0.1")))
    assert json.loads((killed / "results.json").read_text())["resumed"] == 1
    for name in (ADAPTER, "state/checkpoint.safetensors"):
        x, y = load_file(uninterrupted / name), load_file(killed / name)
        assert x.keys() == y.keys()
        assert [k for k in x if not torch.equal(x[k], y[k])] == [], name
    strip = lambda rs: [(r["kind"], r["step"], r.get("loss"), r.get("grad_norm")) for r in rs]  # noqa: E731
    assert strip(records(killed)) == strip(records(uninterrupted))


def load_file_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_fsdp_two_processes_end_with_the_adapter_of_ddp(inputs, ddp, tmp_path):
    out = tmp_path / "fsdp"
    run(two_processes(*train_args(inputs, out, "--fsdp")))
    diffs = relative_differences(out, ddp)
    assert max(diffs.values()) <= 1e-4, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    assert json.loads((out / "results.json").read_text())["fsdp"] is True
    (dev_fsdp,), (dev_ddp,) = records(out, "eval"), records(ddp, "eval")
    assert dev_fsdp["examples"] == N_DEV and dev_fsdp["accuracy"] == dev_ddp["accuracy"]


def test_fsdp_in_a_single_process_names_the_launcher(inputs, tmp_path):
    proc = run(one_process(*train_args(inputs, tmp_path / "x", "--fsdp")), expect_ok=False)
    assert proc.returncode == 2 and "torchrun --nproc-per-node" in proc.stderr
