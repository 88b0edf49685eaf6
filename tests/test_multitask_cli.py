"""``sharelora multitask`` end to end on a tiny local BERT and two local CSV tasks (2 and 3 labels)."""

import json

import pytest
from test_multitask import inputs, three_way  # noqa: F401 (the module fixture and its data)

from sharelora.cli import main


def args(inputs, out, *extra):  # noqa: F811
    model_dir, tasks = inputs
    return ["multitask", "--model", str(model_dir), "--tasks", ",".join(f"{n}={d}" for n, d in tasks.items()),
            "--epochs", "1", "--batch-size", "8", "--lr", "1e-2", "--output-dir", str(out), "--no-progress", *extra]


def test_joint_sharea_run_reports_every_task(inputs, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "joint"
    assert main(args(inputs, out, "--method", "sharea", "--task-share", "A")) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"sent", "kind"} and results["layout"] == "per-task"
    assert [results["tasks"][t]["num_labels"] for t in ("sent", "kind")] == [2, 3]
    assert (out / "curves.png").is_file() and (out / "adapter").is_dir()
    printed = capsys.readouterr().out
    assert "sent: dev accuracy" in printed and "kind: dev accuracy" in printed
    # A finished run given --resume is returned as it is.
    assert main(args(inputs, out, "--method", "sharea", "--resume")) == 0


def test_continual_run_prints_zero_forgetting_for_frozen_shared_tensors(inputs, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "continual"
    assert main(args(inputs, out, "--method", "sharea", "--continual")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["forgetting"]["per_task"]["sent"] == 0.0


def test_task_cores_from_the_command_line_add_a_core_per_task_and_forget_nothing(inputs, tmp_path):  # noqa: F811
    out = tmp_path / "cores"
    assert main(args(inputs, out, "--method", "sharea", "--task-share", "AB", "--task-core", "diagonal",
                     "--continual")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task_share"] == "AB" and results["task_core"] == "diagonal" and results["basis_tasks"] == 1
    assert results["forgetting"]["per_task"]["sent"] == 0.0
    config = (out / "config.yaml").read_text()
    assert "task_core: diagonal" in config and "basis_tasks: 1" in config
    report = results["parameters"]["report"]["adapters"]["kind"]
    assert results["parameters"]["added_per_task"] == report["own_parameters"] > 0


def test_orthonormalize_basis_from_the_command_line_is_recorded(inputs, tmp_path):  # noqa: F811
    out = tmp_path / "ortho"
    assert main(args(inputs, out, "--method", "sharea", "--task-share", "AB", "--task-core", "matrix", "--continual",
                     "--orthonormalize-basis")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["orthonormalize_basis"] is True and results["orthonormalized_basis"]["cores"] > 0
    assert results["forgetting"]["per_task"]["sent"] == 0.0
    assert "orthonormalize_basis: true" in (out / "config.yaml").read_text()


def test_method_hydra_trains_routed_heads(inputs, tmp_path):  # noqa: F811
    out = tmp_path / "hydra"
    assert main(args(inputs, out, "--method", "hydra", "--heads", "2")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["heads"] == 2 and results["layout"] == "one-adapter"


@pytest.mark.parametrize("extra,message", [
    (["--method", "hydra"], "--heads K"),
    (["--method", "full"], "adapter method"),
    (["--continual-train-shared"], "--continual"),
    (["--task-share", "AB"], "--task-core matrix"),
    (["--task-core", "matrix"], "needs --task-share AB"),
    (["--basis-tasks", "2"], "add --continual"),
    (["--orthonormalize-basis", "--continual"], "needs --task-share AB --task-core matrix"),
])
def test_bad_options_name_the_fix(inputs, tmp_path, capsys, extra, message):  # noqa: F811
    assert main(args(inputs, tmp_path / "bad", *extra)) == 2
    assert message in capsys.readouterr().err



def test_eval_and_export_peft_read_a_multi_task_directory(inputs, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "joint"
    assert main(args(inputs, out, "--method", "sharea", "--keep-state")) == 0
    results = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out), "--json", str(tmp_path / "all.json")]) == 0
    scored = json.loads((tmp_path / "all.json").read_text())["tasks"]
    assert set(scored) == {"sent", "kind"}
    for name in scored:  # the run's own test evaluation, reproduced from the saved directory
        assert scored[name]["accuracy"] == results["tasks"][name]["test"]["accuracy"]
    assert main(["eval", str(out), "--adapter", "kind", "--split", "dev", "--json", str(tmp_path / "k.json")]) == 0
    assert set(json.loads((tmp_path / "k.json").read_text())["tasks"]) == {"kind"}
    assert main(["export-peft", str(out), str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "sent" / "adapter_config.json").is_file()
    assert (tmp_path / "peft" / "kind" / "adapter_config.json").is_file()
    assert main(["export-peft", str(out), str(tmp_path / "one"), "--adapter", "kind"]) == 0
    assert (tmp_path / "one" / "adapter_config.json").is_file()
    assert main(["eval", str(out), "--adapter", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_a_multitask_config_yaml_reproduces_the_run(inputs, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    first, again = tmp_path / "first", tmp_path / "again"
    assert main(args(inputs, first, "--method", "sharea", "--continual")) == 0
    assert main(["multitask", "--config", str(first / "config.yaml"), "--output-dir", str(again), "--no-progress"]) == 0
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (first, again))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (first, again))
    assert r2["continual"] and r2["forgetting"] == r1["forgetting"]
