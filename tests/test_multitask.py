"""Multi-task runs on a tiny local BERT and small local CSV tasks with 2 and 3 labels (training/multitask.py).

The runs read their model and data from disk as a user's would (a model directory, one folder of
train/dev/test CSVs per task), so reloading a run's adapter directory (evaluate_tasks,
export_tasks_peft) goes through the same path. Every run is a few dozen steps: seconds.
"""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from training_tiny import FILLER, NEGATIVE, POSITIVE, tiny_bert, tiny_data, tiny_tokenizer, write_csv

from sharelora.runs.evaluate import evaluate_tasks, is_multitask_dir
from sharelora.runs.export import export_tasks_peft
from sharelora.training.multitask import (
    ONE_ADAPTER, MultiTaskConfig, MultiTaskRun, head_layout, mixed_order, train_multitask,
)


def three_way(n, seed):
    """Label 0: a positive word, 1: a negative word, 2: neither (filler only)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 3
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
        if label < 2:
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == 0 else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(model dir, {task: data folder}): 'sent' has 2 labels (24 train rows), 'kind' 3 labels (18)."""
    root = tmp_path_factory.mktemp("mt")
    model_dir = root / "tiny-bert"  # an encoder without a head, as MiniLM is: each run builds its classifier
    tiny_bert().bert.save_pretrained(model_dir)
    tiny_tokenizer(model_dir).save_pretrained(model_dir)
    sent, kind = root / "sent", root / "kind"
    for d in (sent, kind):
        d.mkdir()
    for split, rows in tiny_data(n_train=24, n_dev=12, n_test=12, seed=5).splits.items():
        write_csv(sent / f"{split}.csv", rows)
    for split, (n, seed) in {"train": (18, 1), "dev": (12, 2), "test": (12, 3)}.items():
        write_csv(kind / f"{split}.csv", three_way(n, seed))
    return model_dir, {"sent": sent, "kind": kind}


def config(inputs, out, **kw):
    model_dir, tasks = inputs
    values = dict(model=str(model_dir), tasks=[f"{n}={d}" for n, d in tasks.items()], method="sharea",
                  task_share="A", epochs=2, batch_size=8, lr=1e-2, log_every=2, checkpoint_every=2, seed=3,
                  output_dir=str(out))
    values.update(kw)
    return MultiTaskConfig(**values)


def run(inputs, out, **kw):
    options = {k: kw.pop(k) for k in ("on_step", "resume", "keep_state") if k in kw}
    return train_multitask(config(inputs, out, **kw), progress=False, **options)


def tensors(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


def records(out, kinds=("train", "eval", "stage")):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] in kinds]


def without_times(rows):
    return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rows]


# --- joint training ------------------------------------------------------------------------------------
def test_joint_run_writes_results_log_plot_and_a_multi_task_adapter(inputs, tmp_path):
    out = tmp_path / "joint"
    results = run(inputs, out)
    for name in ("results.json", "log.jsonl", "curves.png", "adapter/adapter_model.safetensors",
                 "adapter/run_info.json"):
        assert (out / name).is_file(), name
    assert not (out / "state").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "finished" and saved["layout"] == "per-task" and saved["steps"] == 2 * 6  # 42 rows / 8
    assert {n: t["num_labels"] for n, t in saved["tasks"].items()} == {"sent": 2, "kind": 3}
    assert {n: t["logits"] for n, t in saved["tasks"].items()} == {"sent": [0, 2], "kind": [0, 3]}
    for t in saved["tasks"].values():
        assert 0.0 <= t["test"]["accuracy"] <= 1.0 and t["test"]["examples"] == 12
    assert saved["mean"]["test"] == pytest.approx(
        (saved["tasks"]["sent"]["test"]["accuracy"] + saved["tasks"]["kind"]["test"]["accuracy"]) / 2)
    # One A per module type serves both tasks: the task-shared count is the A's, each task adds its B's.
    p = saved["parameters"]
    assert p["task_shared"] > 0 and p["adapter"] == p["task_shared"] + 2 * p["added_per_task"]
    evals = [r for r in records(out, ("eval",))]
    assert sorted((r["task"], r["step"]) for r in evals) == [("kind", 6), ("kind", 12), ("sent", 6), ("sent", 12)]
    assert is_multitask_dir(out) and is_multitask_dir(out / "adapter") and not is_multitask_dir(tmp_path)
    # The saved adapter directory scores each task as the run did (same ops on the same weights: equal).
    again = evaluate_tasks(out, split="test")["tasks"]
    for n in ("sent", "kind"):
        assert again[n]["accuracy"] == saved["tasks"][n]["test"]["accuracy"]
        assert again[n]["loss"] == saved["tasks"][n]["test"]["loss"]


def test_a_training_step_mixes_the_tasks_and_sends_each_row_through_its_own_adapter(inputs, tmp_path, monkeypatch):
    seen = []
    from sharelora.training import multitask

    def spy(model, inputs_):
        if model.training:
            seen.append(list(inputs_["adapter_names"]))
        return forward(model, inputs_)

    forward = multitask.model_logits
    monkeypatch.setattr(multitask, "model_logits", spy)
    run(inputs, tmp_path / "spy", epochs=1)
    assert len(seen) == 6 and sum(len(s) for s in seen) == 42
    assert sum(s.count("sent") for s in seen) == 24 and sum(s.count("kind") for s in seen) == 18
    assert sum(1 for s in seen if len(set(s)) == 2) >= 4  # most batches hold rows of both tasks


def test_mixed_order_is_a_function_of_its_arguments_and_follows_the_temperature():
    assert sorted(mixed_order([5, 7], seed=1, stage=0, epoch=0)) == list(range(12))  # T = 1: every row once
    assert mixed_order([5, 7], 1, 0, 0) == mixed_order([5, 7], 1, 0, 0)
    assert mixed_order([5, 7], 1, 0, 0) != mixed_order([5, 7], 1, 0, 1)
    sizes = [900, 100]
    flat = mixed_order(sizes, 0, 0, 0, temperature=1e6)  # p_t ~ N_t^(1/T) -> uniform over the tasks
    small = sum(1 for i in flat if i >= 900)
    assert len(flat) == 1000 and 430 < small < 570  # binomial(1000, 0.5): 4.4 standard deviations either side
    from collections import Counter

    visits = Counter(i for i in flat if i >= 900)  # the small task's rows again and again, a permutation a pass
    assert set(visits) == set(range(900, 1000)) and max(visits.values()) - min(visits.values()) <= 1
    t2 = sum(1 for i in mixed_order(sizes, 0, 0, 0, temperature=2.0) if i >= 900)
    expected = 1000 * 10 / (30 + 10)  # sqrt(100) / (sqrt(900) + sqrt(100))
    assert abs(t2 - expected) < 4.5 * (1000 * 0.25 * 0.75) ** 0.5


def test_sampling_temperature_run_finishes_with_the_same_number_of_rows(inputs, tmp_path):
    results = run(inputs, tmp_path / "temp", sampling_temperature=4.0, epochs=1)
    assert results["status"] == "finished" and results["steps"] == 6
    assert results["config"]["sampling_temperature"] == 4.0


def test_head_layout_of_different_label_counts():
    assert head_layout({"a": 2, "b": 3, "c": 4}, one_adapter=False) == (4, {"a": (0, 2), "b": (0, 3), "c": (0, 4)})
    assert head_layout({"a": 2, "b": 3, "c": 4}, one_adapter=True) == (9, {"a": (0, 2), "b": (2, 5), "c": (5, 9)})


def test_export_of_one_task_loads_into_a_base_with_its_own_label_count(inputs, tmp_path):
    from sharelora import ShareLoraModel
    from sharelora.sources import load_model

    out = tmp_path / "joint"
    run(inputs, out, epochs=1)
    written = export_tasks_peft(out, tmp_path / "peft")
    assert set(written) == {"sent", "kind"} and written["sent"] == tmp_path / "peft" / "sent"
    model_dir, _ = inputs
    ids = torch.tensor([[2, 5, 17, 20, 6, 3], [2, 9, 22, 3, 0, 0]])
    mask = (ids != 0).long()
    from sharelora.training.evaluate import load_trained_model

    multi, _, _ = load_trained_model(out)
    for n, labels in (("sent", 2), ("kind", 3)):
        base = load_model(str(model_dir), task="classification", num_labels=labels, report_new_weights=False).model
        peft = ShareLoraModel.from_peft(base, written[n]).eval()
        with torch.no_grad():
            want = multi(input_ids=ids, attention_mask=mask, adapter_names=[n, n]).logits[:, :labels]
            got = peft(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # merged-free fp32, same sums: ~1e-7
    one = export_tasks_peft(out, tmp_path / "one", names=["kind"])
    assert one == {"kind": tmp_path / "one"} and (tmp_path / "one" / "adapter_config.json").is_file()


# --- resume ---------------------------------------------------------------------------------------------
class Killed(Exception):
    pass


def test_joint_resume_after_a_stop_equals_the_uninterrupted_run(inputs, tmp_path):
    full = run(inputs, tmp_path / "a")
    stopped = run(inputs, tmp_path / "b", on_step=lambda step: step == 5)
    assert stopped["status"] == "interrupted" and stopped["step"] == 5
    resumed = run(inputs, tmp_path / "b", resume=True)
    assert resumed["resumed"] == 1
    assert resumed["tasks"] == full["tasks"] and resumed["mean"] == full["mean"]
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_times(records(tmp_path / "a")) == without_times(records(tmp_path / "b"))


@pytest.mark.parametrize("kill_at, extra", [
    (4, {}),  # joint: mid-epoch 1
    (9, {}),  # continual: in stage 2 (6 + 3 steps)
    (9, dict(task_share="AB", task_core="matrix")),  # continual task cores: in stage 2
    (5, dict(task_share="AB", task_core="diagonal")),  # continual task cores: in stage 1, training the basis
])
def test_resume_after_a_kill_equals_the_uninterrupted_run(inputs, tmp_path, kill_at, extra):
    continual = kill_at != 4

    def kill(step):
        if step == kill_at:  # after the checkpoint of step kill_at - 1 (every 2 steps) or of the stage's end
            raise Killed

    full = run(inputs, tmp_path / "a", continual=continual, **extra)
    with pytest.raises(Killed):
        run(inputs, tmp_path / "b", continual=continual, on_step=kill, **extra)
    resumed = run(inputs, tmp_path / "b", continual=continual, resume=True, **extra)
    assert resumed["tasks"] == full["tasks"] and resumed["stages"] == full["stages"]
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_times(records(tmp_path / "a")) == without_times(records(tmp_path / "b"))  # nothing twice
    if continual:
        assert resumed["forgetting"] == full["forgetting"]


def kill_at_step(cfg, step):
    """Run ``cfg`` in a child process that kills itself with SIGKILL after optimizer step ``step``."""
    script = ("import json, os, signal, sys\n"
              "from sharelora.training.multitask import MultiTaskConfig, train_multitask\n"
              "cfg = MultiTaskConfig(**json.loads(sys.argv[1]))\n"
              "step = int(sys.argv[2])\n"
              "train_multitask(cfg, progress=False, on_step=lambda s: s == step and os.kill(os.getpid(), signal.SIGKILL))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(dataclasses.asdict(cfg)), str(step)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_continual_task_cores_resume_after_sigkill_is_bit_identical(inputs, tmp_path):
    """A process killed with SIGKILL in stage 2 (a core stage): the resumed run equals the uninterrupted one."""
    extra = dict(continual=True, task_share="AB", task_core="matrix")
    full = run(inputs, tmp_path / "a", **extra)
    kill_at_step(config(inputs, tmp_path / "b", **extra), 9)
    assert not (tmp_path / "b" / "results.json").exists()
    resumed = run(inputs, tmp_path / "b", resume=True, **extra)
    assert resumed["resumed"] == 1 and resumed["stages"] == full["stages"]
    assert resumed["forgetting"] == full["forgetting"]
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_tasks_is_refused(inputs, tmp_path):
    run(inputs, tmp_path / "r", on_step=lambda s: s == 3)
    with pytest.raises(ValueError, match=r"different settings \['sampling_temperature'\]"):
        run(inputs, tmp_path / "r", sampling_temperature=2.0, resume=True)


# --- continual --------------------------------------------------------------------------------------------
def snapshots(monkeypatch):
    """Every adapter tensor after each stage, with the stage's best weights (as a resume in a later stage finds them)."""
    taken = []
    original = MultiTaskRun.score_stage

    def score_stage(self, stage):
        taken.append({key: t.detach().clone() for key, t in self.model.multi_adapter_state_dict().items()})
        return original(self, stage)

    monkeypatch.setattr(MultiTaskRun, "score_stage", score_stage)
    return taken


def task_tensors(state, task):
    """The tensors task ``task`` reads: its own (``task/...``) and the task-shared ones (``@group/...``)."""
    return {k: v for k, v in state.items() if k.startswith(f"{task}/") or k.startswith("@")}


def test_continual_sharea_with_frozen_shared_tensors_forgets_exactly_nothing(inputs, tmp_path, monkeypatch):
    taken = snapshots(monkeypatch)
    results = run(inputs, tmp_path / "c", continual=True)
    assert [s["tasks"] for s in results["stages"]] == [["sent"], ["kind"]]
    before, after = task_tensors(taken[0], "sent"), task_tensors(taken[1], "sent")
    assert any(k.startswith("@") for k in before) and any("modules_to_save" in k for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the first task's every tensor, bit for bit
    # ... so its outputs are too: every metric and the mean loss after stage 2 equal those after stage 1.
    first, last = results["stages"]
    assert last["dev"]["sent"] == first["dev"]["sent"] and last["test"]["sent"] == first["test"]["sent"]
    f = results["forgetting"]
    assert f["per_task"]["sent"] == 0.0 and f["mean_over_earlier_tasks"] == 0.0
    assert f["matrix"][0][1] is None and f["matrix"][1][0] == f["matrix"][0][0]
    # Stage 2 did train the second task's own tensors (B's and head), from their initial values.
    kind0, kind1 = task_tensors(taken[0], "kind"), task_tensors(taken[1], "kind")
    assert any(not torch.equal(kind0[k], kind1[k]) for k in kind0 if k.startswith("kind/"))


def test_training_the_shared_tensors_in_later_stages_changes_the_first_task(inputs, tmp_path, monkeypatch):
    """The control of the exact-zero test: with the shared A trained in stage 2, task 1's outputs move."""
    taken = snapshots(monkeypatch)
    results = run(inputs, tmp_path / "c", continual=True, continual_train_shared=True)
    shared = [k for k in taken[0] if k.startswith("@")]
    assert shared and all(not torch.equal(taken[0][k], taken[1][k]) for k in shared)
    first, last = results["stages"]
    assert last["test"]["sent"]["loss"] != first["test"]["sent"]["loss"]


def test_sequential_single_lora_baseline_runs_and_moves_the_first_task(inputs, tmp_path):
    results = run(inputs, tmp_path / "seq", method="lora", one_adapter=True, continual=True)
    assert results["layout"] == "one-adapter" and results["method"] == "lora"
    assert {n: t["logits"] for n, t in results["tasks"].items()} == {"sent": [0, 2], "kind": [2, 5]}
    assert {n: t["adapter"] for n, t in results["tasks"].items()} == {"sent": ONE_ADAPTER, "kind": ONE_ADAPTER}
    first, last = results["stages"]
    assert last["test"]["sent"]["loss"] != first["test"]["sent"]["loss"]  # one adapter trained on: it moved
    f = results["forgetting"]
    assert f["per_task"]["sent"] == f["matrix"][0][0] - f["matrix"][1][0]
    assert results["parameters"]["added_per_task"] == 0
    again = evaluate_tasks(tmp_path / "seq", names=["sent"], split="test")["tasks"]
    assert list(again) == ["sent"] and again["sent"]["loss"] == last["test"]["sent"]["loss"]


def test_separate_adapters_per_task_share_nothing(inputs, tmp_path):
    results = run(inputs, tmp_path / "sep", method="lora", task_share="none", continual=True)
    p = results["parameters"]
    assert p["task_shared"] == 0 and p["adapter"] == p["separate_lora"] == 2 * p["added_per_task"]
    assert results["forgetting"]["per_task"]["sent"] == 0.0  # nothing shared: nothing to forget


# --- HydraLoRA ----------------------------------------------------------------------------------------------
def test_hydra_trains_one_routed_adapter_for_the_mixture(inputs, tmp_path):
    out = tmp_path / "hydra"
    results = run(inputs, out, method="hydra", heads=2, epochs=1)
    assert results["method"] == "hydra" and results["layout"] == "one-adapter" and results["heads"] == 2
    assert results["config"]["method"] == "lora"  # HydraLoRA = LoRA's A, K routed B heads
    info = json.loads((out / "adapter" / "run_info.json").read_text())
    assert info["method"] == "hydra" and info["num_labels"] == 5
    again = evaluate_tasks(out, split="test")["tasks"]
    assert {n: again[n]["loss"] for n in again} == {n: t["test"]["loss"] for n, t in results["tasks"].items()}
    with pytest.raises(Exception, match="(?i)hydra|route"):
        export_tasks_peft(out, tmp_path / "peft")


# --- configuration errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(method="hydra"), "--heads K"),
    (dict(method="full"), "adapter method"),
    (dict(tasks=["a=x", "a=y"]), "appears twice"),
    (dict(tasks=[f"{ONE_ADAPTER}=x"]), "another name"),
    (dict(task_share="C"), "none, A, B or AB"),
    (dict(sampling_temperature=0.0), "> 0"),
    (dict(continual_train_shared=True), "--continual"),
    (dict(tasks=[]), "tasks is empty"),
])
def test_bad_configurations_name_the_problem(inputs, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        config(inputs, tmp_path / "x", **kw).resolved()


def test_unknown_task_in_evaluate_names_the_tasks(inputs, tmp_path):
    run(inputs, tmp_path / "j", epochs=1)
    with pytest.raises(ValueError, match=r"no task \['nope'\].*'sent', 'kind'"):
        evaluate_tasks(tmp_path / "j", names=["nope"])


# --- task cores: a task-shared A and B, each task its own core --------------------------------------------------
@pytest.mark.parametrize("core", ["matrix", "diagonal"])
def test_continual_task_cores_forget_exactly_nothing_and_add_only_a_core(inputs, tmp_path, monkeypatch, core):
    taken = snapshots(monkeypatch)
    results = run(inputs, tmp_path / core, continual=True, task_share="AB", task_core=core)
    assert results["task_core"] == core and [s["tasks"] for s in results["stages"]] == [["sent"], ["kind"]]
    before, after = task_tensors(taken[0], "sent"), task_tensors(taken[1], "sent")
    assert any(k.startswith("@") and "lora_B" in k for k in before)  # A and B are both the tasks' shared tensors
    assert all(torch.equal(before[k], after[k]) for k in before)  # task 1's every tensor, bit for bit
    first, last = results["stages"]
    assert last["dev"]["sent"] == first["dev"]["sent"] and last["test"]["sent"] == first["test"]["sent"]
    assert results["forgetting"]["per_task"]["sent"] == 0.0
    kind0, kind1 = task_tensors(taken[0], "kind"), task_tensors(taken[1], "kind")
    own = [k for k in kind0 if k.startswith("kind/") and "modules_to_save" not in k]
    assert own and any(not torch.equal(kind0[k], kind1[k]) for k in own)  # stage 2 trained the core
    # What one more task adds: its core alone, r x r (matrix) or r (diagonal) per adapted module.
    p = results["parameters"]
    r, modules = 8, len(own)
    assert p["added_per_task"] == modules * (r * r if core == "matrix" else r)
    assert all(kind1[k].numel() == (r * r if core == "matrix" else r) for k in own)


def stage_starts(monkeypatch):
    """Every adapter tensor when each stage starts (after start_stage: what its first step sees)."""
    taken = []
    original = MultiTaskRun.start_stage

    def start_stage(self, stage):
        original(self, stage)
        taken.append({key: t.detach().clone() for key, t in self.core.multi_adapter_state_dict().items()})

    monkeypatch.setattr(MultiTaskRun, "start_stage", start_stage)
    return taken


def test_basis_from_the_first_k_tasks_trains_them_jointly_then_freezes_it(inputs, tmp_path, monkeypatch):
    model_dir, tasks = inputs
    taken, starts = snapshots(monkeypatch), stage_starts(monkeypatch)
    three = [f"{n}={d}" for n, d in tasks.items()] + [f"again={tasks['sent']}"]
    results = run(inputs, tmp_path / "k2", tasks=three, continual=True, task_share="AB", task_core="matrix",
                  basis_tasks=2)
    assert [s["tasks"] for s in results["stages"]] == [["sent", "kind"], ["again"]]
    assert results["basis_tasks"] == 2 and "basis2" in results["name"]
    # The joint stage starts as a task-shared ShareLoRA: B = 0 and every basis task's core the identity (the
    # earlier start, every core 0 on a random B, left the joint stage at chance); the later task's core at 0.
    start, r = starts[0], 8
    cores = {n: [k for k in start if k.startswith(f"{n}/") and "lora_C" in k] for n in ("sent", "kind", "again")}
    assert all(torch.equal(start[k], torch.eye(r)) for n in ("sent", "kind") for k in cores[n])
    assert all(start[k].abs().sum() == 0 for k in cores["again"])
    basis_B = [k for k in start if k.startswith("@") and "lora_B" in k]
    assert basis_B and all(start[k].abs().sum() == 0 for k in basis_B)
    # ... and trains all of it: each basis task's cores, A and B moved in stage 1
    moved = [k for k in taken[0] if not torch.equal(taken[0][k], start[k])]
    assert all(k in moved for n in ("sent", "kind") for k in cores[n])
    assert all(k in moved for k in start if k.startswith("@"))
    for task in ("sent", "kind"):  # both basis tasks unchanged by stage 2, shared basis included
        before, after = task_tensors(taken[0], task), task_tensors(taken[1], task)
        assert all(torch.equal(before[k], after[k]) for k in before)
    f = results["forgetting"]
    assert f["per_task"] == {"sent": 0.0, "kind": 0.0, "again": 0.0} and f["mean_over_earlier_tasks"] == 0.0


def test_continual_task_cores_grow_the_basis_and_record_each_tasks_fit(inputs, tmp_path, monkeypatch):
    model_dir, tasks = inputs
    taken = snapshots(monkeypatch)
    three = [f"{n}={d}" for n, d in tasks.items()] + [f"again={tasks['sent']}"]
    results = run(inputs, tmp_path / "g", tasks=three, continual=True, task_share="AB", task_core="matrix",
                  grow_basis=2)
    assert results["grow_basis"] == 2 and "grow2" in results["name"]
    r = 8
    # each later task grew 2 directions (keys "...grow_<task>.lora_A/B" of the group), which it alone trained
    grown = {n: [k for k in taken[-1] if k.startswith("@") and f".grow_{n}." in k] for n in ("sent", "kind", "again")}
    assert not grown["sent"] and grown["kind"] and grown["again"]
    assert all(not torch.equal(taken[0][k], taken[1][k]) for k in grown["kind"] if "lora_B" in k)  # stage 2 trained
    assert all(torch.equal(taken[1][k], taken[2][k]) for k in grown["kind"])  # ... and stage 3 did not
    cores = {n: [k for k in taken[-1] if k.startswith(f"{n}/") and "lora_C" in k] for n in ("sent", "kind", "again")}
    assert {tuple(taken[-1][k].shape) for k in cores["sent"]} == {(r, r)}
    assert {tuple(taken[-1][k].shape) for k in cores["kind"]} == {(r + 2, r + 2)}
    assert {tuple(taken[-1][k].shape) for k in cores["again"]} == {(r + 4, r + 4)}  # kind's block and its own
    # the earlier tasks' tensors (the basis, their cores and heads) bit-identical after every later stage
    reads_sent = [k for k in taken[0] if k.startswith("sent/") or (k.startswith("@") and ".grow_" not in k)]
    assert all(torch.equal(taken[0][k], taken[2][k]) for k in reads_sent)
    reads_kind = [k for k in taken[1] if k.startswith("kind/")] + grown["kind"]
    assert all(torch.equal(taken[1][k], taken[2][k]) for k in reads_kind)
    f = results["forgetting"]
    assert f["per_task"] == {"sent": 0.0, "kind": 0.0, "again": 0.0}
    # the fit of each task to the basis it found (before its own growth), in results.json
    fit = results["basis_fit"]
    assert set(fit) == {"kind", "again"} and fit["kind"]["directions"] == r and fit["again"]["directions"] == r + 2
    assert all(0.0 < v["fit"] <= 1.0 and 0.0 < v["chance"] < 1.0 for v in fit.values())
    # what one more task adds: its cores and its new directions (A: 2 x d_in per module type, B: d_out x 2 per layer)
    p = results["parameters"]
    assert p["per_task"]["again"]["own"] == sum(taken[-1][k].numel() for k in cores["again"] + grown["again"])
    assert p["added_per_task"] == p["per_task"]["again"]["own"]


def optimizer_rates(monkeypatch):
    """Per stage: {trainable parameter name: its group's peak lr (base_lr)} of the stage's optimizer."""
    taken = []
    original = MultiTaskRun.begin_stage

    def begin_stage(self, stage):
        original(self, stage)
        rate = {id(p): g["base_lr"] for g in self.optimizer.param_groups for p in g["params"]}
        taken.append({n: rate[id(p)] for n, p in self.core.named_parameters() if p.requires_grad})

    monkeypatch.setattr(MultiTaskRun, "begin_stage", begin_stage)
    return taken


def test_core_lr_and_head_lr_set_the_rates_of_the_stages_after_the_basis(inputs, tmp_path, monkeypatch):
    rates = optimizer_rates(monkeypatch)
    cores = dict(continual=True, task_share="AB", task_core="matrix", lr=1e-2)
    results = run(inputs, tmp_path / "r", core_lr=5e-2, head_lr=3e-2, **cores)
    basis, later = rates
    assert any(n.startswith("sharelora_bank.@") for n in basis) and set(basis.values()) == {1e-2}  # the basis: --lr
    heads = {n for n in later if ".modules_to_save." in n}
    assert heads and {later[n] for n in heads} == {3e-2}
    assert {later[n] for n in later if n not in heads} == {5e-2} and all("lora_C" in n for n in later if n not in heads)
    # the log's lr follows the schedule of each stage's adapter rate: peak 1e-2 in stage 1, 5e-2 after
    peak = {}
    for r in records(tmp_path / "r", ("train",)):
        peak[r["stage"]] = max(peak.get(r["stage"], 0.0), r["lr"])
    assert peak[0] <= 1e-2 and 1e-2 < peak[1] <= 5e-2
    assert results["config"]["core_lr"] == 5e-2 and results["config"]["head_lr"] == 3e-2
    # head_lr defaults to core_lr; without either every stage keeps --lr (one group rate, as before)
    rates.clear()
    run(inputs, tmp_path / "d", core_lr=5e-2, **cores)
    assert set(rates[1].values()) == {5e-2}
    rates.clear()
    run(inputs, tmp_path / "n", **cores)
    assert set(rates[0].values()) == set(rates[1].values()) == {1e-2}
    # grown basis directions are basis: they train at --lr (at a core's lr a new LoRA-like direction diverges)
    rates.clear()
    run(inputs, tmp_path / "g", core_lr=5e-2, grow_basis=2, **cores)
    grown = {n for n in rates[1] if "/grow_kind/" in n}
    assert grown and {rates[1][n] for n in grown} == {1e-2}
    assert {rates[1][n] for n in rates[1] if "lora_C" in n} == {5e-2}


def test_core_lr_0_trains_the_later_heads_alone_on_zero_cores(inputs, tmp_path, monkeypatch):
    """The head-only check: the later task's cores stay 0 (its adapter computes the base model), its head learns."""
    model_dir, tasks = inputs
    taken, starts = snapshots(monkeypatch), stage_starts(monkeypatch)
    rates = optimizer_rates(monkeypatch)
    results = run(inputs, tmp_path / "h", continual=True, task_share="AB", task_core="matrix", core_lr=0, head_lr=2e-2)
    assert all(".modules_to_save.kind." in n for n in rates[1]) and set(rates[1].values()) == {2e-2}
    own = [k for k in taken[1] if k.startswith("kind/")]
    cores = [k for k in own if "lora_C" in k]
    assert cores and all(taken[1][k].abs().sum() == 0 for k in cores)
    assert any(not torch.equal(taken[1][k], starts[1][k]) for k in own if k not in cores)  # the head moved
    assert results["forgetting"]["per_task"]["sent"] == 0.0


@pytest.mark.parametrize("kw, message", [
    (dict(core_lr=1e-2), "needs --continual"),
    (dict(head_lr=1e-2, continual=True, continual_train_shared=True), "no --continual-train-shared"),
    (dict(core_lr=0, continual=True), "give the head's lr with --head-lr"),
    (dict(core_lr=-1.0, continual=True), "core_lr must be a number >= 0"),
    (dict(head_lr=0.0, continual=True), "head_lr must be a number > 0"),
    (dict(core_lr=1e-2, continual=True, one_adapter=True), "per-task layout"),
])
def test_bad_core_and_head_lr_name_the_fix(inputs, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        config(inputs, tmp_path / "x", **kw).resolved()


@pytest.mark.parametrize("kw, message", [
    (dict(task_share="AB"), "--task-core matrix"),
    (dict(task_core="matrix"), "needs --task-share AB"),
    (dict(task_core="full"), "task_core must be"),
    (dict(task_share="AB", task_core="matrix", grow_basis=2), "--grow-basis G"),
    (dict(grow_basis=2, continual=True), "--grow-basis G"),
    (dict(basis_tasks=2), "add --continual"),
    (dict(basis_tasks=3, continual=True), "from 1 to the number of tasks"),
    (dict(method="lora", one_adapter=True, task_share="AB", task_core="matrix"), "drop --one-adapter"),
    (dict(task_share="AB", task_core="matrix", orthonormalize_basis=True), "--orthonormalize-basis.*--continual"),
    (dict(task_share="AB", task_core="diagonal", continual=True, orthonormalize_basis=True), "--task-core matrix"),
    (dict(continual=True, orthonormalize_basis=True), "--task-share AB --task-core matrix"),
    (dict(task_share="AB", task_core="matrix", continual=True, continual_train_shared=True,
          orthonormalize_basis=True), "without --continual-train-shared"),
    (dict(task_share="AB", task_core="matrix", continual=True, fsdp=True, orthonormalize_basis=True), "drop --fsdp"),
])
def test_bad_task_core_settings_name_the_fix(inputs, tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        config(inputs, tmp_path / "x", **kw).resolved()


def test_basis_from_another_run_is_read_frozen_and_every_task_trains_only_its_core(inputs, tmp_path, monkeypatch):
    cores = dict(task_share="AB", task_core="matrix")
    run(inputs, tmp_path / "first", continual=True, **cores)
    given = {k: v for k, v in tensors(tmp_path / "first").items() if k.startswith("@")}
    taken, starts = snapshots(monkeypatch), stage_starts(monkeypatch)
    results = run(inputs, tmp_path / "given", continual=True, basis_from=str(tmp_path / "first"), seed=4, **cores)
    # on a given (trained) basis every task starts exactly at the base model: all cores 0, the first's too
    assert all(t.abs().sum() == 0 for k, t in starts[0].items() if "lora_C" in k)
    assert results["basis_from"] == str(tmp_path / "first") and "given" in results["name"]
    for state in taken:  # the basis is the given one after every stage, task 1's stage included
        assert all(torch.equal(state[k], given[k]) for k in given)
    after = tensors(tmp_path / "given")
    assert all(torch.equal(after[k], given[k]) for k in given)
    own = [k for k in after if k.startswith("sent/") and "lora_C" in k]
    assert own and any(after[k].abs().sum() > 0 for k in own)  # task 1 trained its core on the given basis
    assert results["forgetting"]["per_task"]["sent"] == 0.0
    # A basis of other settings is refused with what to do.
    run(inputs, tmp_path / "sharea", epochs=1)  # task_share A: a shared A, no shared B
    with pytest.raises(ValueError, match="does not fit this run's shared tensors.*same --method"):
        run(inputs, tmp_path / "bad", continual=True, basis_from=str(tmp_path / "sharea"), **cores)
    with pytest.raises(ValueError, match="drop --basis-tasks"):
        config(inputs, tmp_path / "x", continual=True, basis_tasks=2, basis_from="d", **cores).resolved()


def orthonormal(t, role):
    """Whether a basis tensor's directions (A's rows, B's columns) are orthogonal with equal length ||t||_F^2 / k."""
    t = t.double()
    gram = t @ t.T if role == "A" else t.T @ t
    c2 = t.square().sum() / gram.shape[0]
    return torch.allclose(gram, c2 * torch.eye(gram.shape[0], dtype=torch.float64), rtol=0, atol=1e-5 * float(c2))


def test_orthonormalize_basis_after_the_basis_stage_forgets_nothing_and_resumes_bit_identically(inputs, tmp_path,
                                                                                                monkeypatch):
    extra = dict(continual=True, task_share="AB", task_core="matrix", orthonormalize_basis=True)
    taken = snapshots(monkeypatch)
    full = run(inputs, tmp_path / "a", **extra)
    basis = [k for k in taken[0] if k.startswith("@")]
    # scored after stage 1 on the orthonormalized basis (the snapshot is what score_stage sees)
    assert basis and all(orthonormal(taken[0][k], "A" if k.endswith("lora_A") else "B") for k in basis)
    record = full["stages"][0]["orthonormalized_basis"]
    assert full["orthonormalized_basis"] == record and record["adapters"] == ["sent", "kind"]
    assert record["B"] == len([k for k in basis if k.endswith("lora_B")]) and record["conditioning"]["before"] > 1.0
    assert "orthonormalized_basis" not in full["stages"][1] and "-ortho" in full["name"]
    before, after = task_tensors(taken[0], "sent"), task_tensors(taken[1], "sent")
    assert all(torch.equal(before[k], after[k]) for k in before)  # task 1, basis included, bit for bit
    first, last = full["stages"]
    assert last["dev"]["sent"] == first["dev"]["sent"] and last["test"]["sent"] == first["test"]["sent"]
    assert full["forgetting"]["per_task"]["sent"] == 0.0
    saved = tensors(tmp_path / "a")
    assert all(torch.equal(saved[k], taken[0][k]) for k in basis)
    # kill -9 inside stage 2, then resume: the stage-1 weights it restores are the orthonormalized ones
    kill_at_step(config(inputs, tmp_path / "b", **extra), 9)
    resumed = run(inputs, tmp_path / "b", resume=True, **extra)
    assert resumed["resumed"] == 1 and resumed["stages"] == full["stages"]
    assert resumed["forgetting"] == full["forgetting"]
    b = tensors(tmp_path / "b")
    assert saved.keys() == b.keys() and all(torch.equal(saved[k], b[k]) for k in saved)
    # basis_from: the given basis is orthonormalized as it is loaded, before any stage trains on it
    plain = run(inputs, tmp_path / "plain", epochs=1, **{**extra, "orthonormalize_basis": False})
    assert plain["orthonormalized_basis"] is None
    trained = tensors(tmp_path / "plain")
    assert not all(orthonormal(trained[k], "B") for k in basis if k.endswith("lora_B"))
    taken.clear()
    again = run(inputs, tmp_path / "given", basis_from=str(tmp_path / "plain"), epochs=1, seed=4, **extra)
    assert again["orthonormalized_basis"]["cores"] > 0
    assert all(orthonormal(state[k], "A" if k.endswith("lora_A") else "B") for state in taken for k in basis)
    assert again["forgetting"]["per_task"]["sent"] == 0.0
