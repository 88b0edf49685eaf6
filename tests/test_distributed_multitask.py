"""`sharelora multitask` under torchrun: two gloo processes on this CPU against one process of the same run.

Two local tasks with 2 and 3 labels (a head each; the per-task layout routes rows with
``adapter_names``) on a tiny dropout-free BERT. 51 training rows in global batches of 8: the last
step has 3 rows, so one process gets 2 and the other 1, and a micro-batch of a process often holds
rows of one task only, so the other task's B's take no part in that process's forward (DDP looks
for unused tensors). 11 + 9 dev rows scored in batches of 4 on two processes. Why 1 and 2 processes
agree to rounding only, and why the equivalence runs have no dropout: tests/test_distributed_train.py.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_distributed_train import load_file_metadata, one_process, run, two_processes
from test_multitask import three_way
from training_tiny import self_killing_cli, tiny_bert, tiny_data, tiny_tokenizer, write_csv

pytestmark = pytest.mark.skipif(os.name != "posix" or not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(), reason="needs POSIX and gloo")

SIZES = {"sent": (29, 11, 7), "kind": (22, 9, 6)}  # train, dev, test rows
BATCH, GRAD_ACCUM, EVAL_BATCH = 8, 2, 4
STEPS = -(-sum(n for n, _, _ in SIZES.values()) // BATCH)  # one epoch of the mixed rows
ADAPTER = "adapter/adapter_model.safetensors"


SELF_KILLING_MULTITASK = self_killing_cli("multitask")  # kill -9 just before the forward of micro-batch argv[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-mt")
    model_dir = root / "tiny-bert-no-dropout"
    model = tiny_bert().bert
    model.config.hidden_dropout_prob = 0.0
    model.save_pretrained(model_dir)
    tiny_tokenizer(model_dir).save_pretrained(model_dir)
    tasks = {}
    for name, (n_train, n_dev, n_test) in SIZES.items():
        d = tasks[name] = root / name
        d.mkdir()
        if name == "sent":
            splits = tiny_data(n_train=n_train, n_dev=n_dev, n_test=n_test, seed=5).splits
        else:
            splits = {"train": three_way(n_train, 1), "dev": three_way(n_dev, 2), "test": three_way(n_test, 3)}
        for split, rows in splits.items():
            write_csv(d / f"{split}.csv", rows)
    return model_dir, tasks


def mt_args(inputs, out, *extra, dropout="0"):
    model_dir, tasks = inputs
    return ["multitask", "--model", str(model_dir), "--tasks", ",".join(f"{n}={d}" for n, d in tasks.items()),
            "--method", "sharea", "--epochs", "1", "--batch-size", str(BATCH), "--grad-accum", str(GRAD_ACCUM),
            "--eval-batch-size", str(EVAL_BATCH), "--dropout", dropout, "--lr", "1e-2", "--seed", "1",
            "--log-every", "1", "--checkpoint-every", "2", "--keep-state", "--no-progress", "--output-dir", str(out),
            *extra]


def records(out, kind=None):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def max_relative_difference(a, b):
    x, y = load_file(a / ADAPTER), load_file(b / ADAPTER)
    assert x.keys() == y.keys()
    return max(((x[k] - y[k]).abs().max() / y[k].abs().max().clamp(min=1e-30)).item() for k in y)


@pytest.fixture(scope="module")
def joint(inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    run(one_process(*mt_args(inputs, root / "one")))
    run(two_processes(*mt_args(inputs, root / "two")))
    return root / "one", root / "two"


def test_two_processes_end_with_the_multi_task_adapter_of_one_process(joint):
    one, two = joint
    assert max_relative_difference(two, one) <= 1e-4
    losses = [(r["step"], r["loss"]) for r in records(one, "train")]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    for (_, l1), r2 in zip(losses, records(two, "train")):  # one record per step, not one per process
        assert r2["loss"] == pytest.approx(l1, rel=1e-5)


def test_evaluation_is_gathered_once_per_task_and_rank_0_alone_writes(joint):
    one, two = joint
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in joint)
    assert r2["processes"] == 2 and len(r2["peak_rss_mb_per_process"]) == 2
    for name, (_, n_dev, n_test) in SIZES.items():
        assert r2["tasks"][name]["dev"]["examples"] == n_dev and r2["tasks"][name]["test"]["examples"] == n_test
        assert r2["tasks"][name]["test"]["accuracy"] == r1["tasks"][name]["test"]["accuracy"]
        assert r2["tasks"][name]["test"]["loss"] == pytest.approx(r1["tasks"][name]["test"]["loss"], rel=1e-4)
    assert [r["kind"] for r in records(two)] == [r["kind"] for r in records(one)]
    assert not (two / ".lock").exists() and (two / "curves.png").is_file()


@pytest.fixture(scope="module")
def continual(inputs, tmp_path_factory):
    """A continual run (stage 1: sent, 4 steps; stage 2: kind, 3 steps) on two processes, DDP and FSDP."""
    root = tmp_path_factory.mktemp("continual")
    run(two_processes(*mt_args(inputs, root / "ddp", "--continual")))
    run(two_processes(*mt_args(inputs, root / "fsdp", "--continual", "--fsdp")))
    return root / "ddp", root / "fsdp"


def test_continual_on_two_processes_forgets_exactly_nothing(continual):
    results = json.loads((continual[0] / "results.json").read_text())
    assert results["forgetting"]["per_task"]["sent"] == 0.0
    assert results["processes"] == 2 and len(results["stages"]) == 2


def test_fsdp_continual_two_processes_end_with_the_adapter_of_ddp(continual):
    ddp, fsdp = continual
    assert max_relative_difference(fsdp, ddp) <= 1e-4
    results, reference = (json.loads((d / "results.json").read_text()) for d in (fsdp, ddp))
    assert results["fsdp"] is True and results["processes"] == 2 and len(results["stages"]) == 2
    assert results["forgetting"]["per_task"]["sent"] == 0.0  # stage 2 left the first task's tensors alone
    assert results["forgetting"]["matrix"] == reference["forgetting"]["matrix"]
    grad_norms = [(r["grad_norm"], q["grad_norm"]) for r, q in zip(records(fsdp, "train"), records(ddp, "train"))]
    assert len(grad_norms) == 7 and all(a == pytest.approx(b, rel=1e-4) and a > 0 for a, b in grad_norms)


def test_a_killed_fsdp_continual_run_resumes_to_the_uninterrupted_run(inputs, continual, tmp_path):
    _, uninterrupted = continual
    killed = tmp_path / "killed"
    script = tmp_path / "self_killing_multitask.py"
    script.write_text(SELF_KILLING_MULTITASK)
    kill_at = 2 * 6 + 1  # rank 0: 2 micro-batches a step; killed in step 7 (stage 2's third), the checkpoint is step 6's
    proc = run(two_processes(str(kill_at), *mt_args(inputs, killed, "--continual", "--fsdp"), script=str(script)),
               expect_ok=False)
    assert proc.returncode != 0 and not (killed / "results.json").exists()
    checkpoint = json.loads(load_file_metadata(killed / "state" / "checkpoint.safetensors")["state"])
    assert checkpoint["step"] == 6 and checkpoint["stage"] == 1
    run(two_processes(*mt_args(inputs, killed, "--continual", "--fsdp", "--resume")))
    assert json.loads((killed / "results.json").read_text())["resumed"] == 1
    x, y = load_file(uninterrupted / ADAPTER), load_file(killed / ADAPTER)
    assert x.keys() == y.keys() and [k for k in x if not torch.equal(x[k], y[k])] == []


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_run(inputs, tmp_path):
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    run(two_processes(*mt_args(inputs, uninterrupted, dropout="0.1")))
    script = tmp_path / "self_killing_multitask.py"
    script.write_text(SELF_KILLING_MULTITASK)
    kill_at = 2 * 4 + 2  # rank 0: 2 micro-batches a step; killed in step 5 (its second), the checkpoint is step 4's
    proc = run(two_processes(str(kill_at), *mt_args(inputs, killed, dropout="0.1"), script=str(script)),
               expect_ok=False)
    assert proc.returncode != 0 and not (killed / "results.json").exists()
    checkpoint = json.loads(load_file_metadata(killed / "state" / "checkpoint.safetensors")["state"])
    assert checkpoint["step"] == 4 and len(checkpoint["rng_ranks"]) == 1
    run(two_processes(*mt_args(inputs, killed, "--resume", dropout="0.1")))
    assert json.loads((killed / "results.json").read_text())["resumed"] == 1
    x, y = load_file(uninterrupted / ADAPTER), load_file(killed / ADAPTER)
    assert x.keys() == y.keys() and [k for k in x if not torch.equal(x[k], y[k])] == []


def test_fsdp_two_processes_end_with_the_multi_task_adapter_of_ddp(inputs, joint, tmp_path):
    _, ddp = joint
    out = tmp_path / "fsdp"
    run(two_processes(*mt_args(inputs, out, "--fsdp")))
    assert max_relative_difference(out, ddp) <= 1e-4
    results, reference = (json.loads((d / "results.json").read_text()) for d in (out, ddp))
    assert results["fsdp"] is True and results["processes"] == 2
    for name, (_, n_dev, _) in SIZES.items():
        assert results["tasks"][name]["dev"]["examples"] == n_dev
        assert results["tasks"][name]["test"]["accuracy"] == reference["tasks"][name]["test"]["accuracy"]


def test_fsdp_leaves_a_task_absent_from_a_step_untouched_as_ddp_does(inputs, tmp_path):
    # global batches of 2 rows: many steps hold one task only. FSDP reduces a zero gradient for the other
    # task's tensors; left so, AdamW would move them (momentum, weight decay) where DDP leaves them alone.
    small = ("--batch-size", "2", "--grad-accum", "1")
    run(two_processes(*mt_args(inputs, tmp_path / "ddp", *small)))
    run(two_processes(*mt_args(inputs, tmp_path / "fsdp", *small, "--fsdp")))
    assert max_relative_difference(tmp_path / "fsdp", tmp_path / "ddp") <= 1e-4
