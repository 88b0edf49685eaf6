"""``sharelora compress`` end to end: two tiny runs (2 and 3 labels) -> one multi-task adapter with a shared A."""

import json

import pytest
from test_multitask import inputs, three_way  # noqa: F401 (the module fixture and its data)

from sharelora.cli import main


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):  # noqa: F811
    """{task: run dir}: 'sent' a LoRA r=2 run, 'kind' a ShareA r=2 run, each with its own head."""
    model_dir, tasks = inputs
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for (name, data), method in zip(tasks.items(), ("lora", "sharea")):
        out[name] = root / name
        assert main(["train", "--model", str(model_dir), "--dataset", str(data), "--method", method, "--rank", "2",
                     "--epochs", "2", "--batch-size", "8", "--lr", "1e-2", "--output-dir", str(out[name]),
                     "--no-progress"]) == 0
    return out


def compress(runs, out, *extra):
    return main(["compress", str(out), *[f"{n}={d}" for n, d in runs.items()], *extra])


def test_full_rank_compression_is_exact_and_scores_as_the_runs(runs, tmp_path, capsys):
    out = tmp_path / "c"
    # The stack of one module type: 2 tasks x 2 layers x rank 2 = rank <= 8, so k = 8 spans it.
    assert compress(runs, out, "--rank", "8") == 0
    printed = capsys.readouterr().out
    assert "sent" in printed and "kind" in printed and "update error" in printed
    report = json.loads((out / "compression.json").read_text())
    for task in ("sent", "kind"):
        assert report["tasks"][task]["max_error"] < 1e-5
    info = json.loads((out / "adapter" / "run_info.json").read_text())
    assert info["num_labels"] == 3 and info["tasks"]["sent"]["logits"] == [0, 2]
    assert main(["eval", str(out), "--json", str(tmp_path / "c.json")]) == 0
    scored = json.loads((tmp_path / "c.json").read_text())["tasks"]
    for task, run in runs.items():  # the compressed task predicts what its own run predicted
        own = json.loads((run / "results.json").read_text())
        assert scored[task]["accuracy"] == own["test"]["accuracy"], task
        assert scored[task]["loss"] == pytest.approx(own["test"]["loss"], rel=1e-5), task  # fp32 rounding only
    # One task exported as standard PEFT LoRA, its head cut to its own labels.
    assert main(["export-peft", str(out), str(tmp_path / "peft"), "--adapter", "kind"]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()


def test_low_rank_compression_reports_its_error_and_saves_parameters(runs, tmp_path):
    out = tmp_path / "low"
    assert compress(runs, out, "--rank", "1") == 0
    report = json.loads((out / "compression.json").read_text())
    assert all(0 < t["mean_error"] <= 1 for t in report["tasks"].values())
    assert report["parameters"] < report["source_parameters"]
    # The output is not replaced silently.
    assert compress(runs, out, "--rank", "1") == 2
    assert compress(runs, out, "--rank", "2", "--overwrite") == 0
    assert json.loads((out / "compression.json").read_text())["rank"] == 2


def test_share_ab_compresses_and_loads(runs, tmp_path):
    out = tmp_path / "ab"
    assert compress(runs, out, "--rank", "4", "--share", "AB") == 0
    assert main(["eval", str(out), "--adapter", "sent", "--json", str(tmp_path / "ab.json")]) == 0
    assert set(json.loads((tmp_path / "ab.json").read_text())["tasks"]) == {"sent"}


def test_bad_inputs_name_the_problem(runs, tmp_path, capsys):
    assert main(["compress", str(tmp_path / "x"), f"a={tmp_path / 'missing'}", "--rank", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "x"), f"a={tmp_path}", "--rank", "2"]) == 2
    assert "neither a sharelora run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", str(tmp_path / "x"), "no-equals-sign", "--rank", "2"])
    assert "NAME=DIR" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "x"), f"a b={runs['sent']}", "--rank", "2"]) == 2
    assert "letters, digits" in capsys.readouterr().err


def test_a_peft_lora_directory_is_an_input_too(runs, inputs, tmp_path, capsys):  # noqa: F811
    model_dir, tasks = inputs
    peft_dir = tmp_path / "sent-peft"
    assert main(["export-peft", str(runs["sent"]), str(peft_dir)]) == 0
    out = tmp_path / "mixed"
    assert main(["compress", str(out), f"sent={peft_dir}", f"kind={runs['kind']}", "--rank", "8",
                 "--model", str(model_dir)]) == 0
    report = json.loads((out / "compression.json").read_text())
    assert report["tasks"]["sent"]["max_error"] < 1e-5
    # A PEFT directory names no data set: scoring its task asks for one, then matches the run.
    assert main(["eval", str(out), "--adapter", "sent"]) == 2
    assert "--dataset" in capsys.readouterr().err
    assert main(["eval", str(out), "--adapter", "sent", "--dataset", str(tasks["sent"]),
                 "--json", str(tmp_path / "s.json")]) == 0
    own = json.loads((runs["sent"] / "results.json").read_text())
    scored = json.loads((tmp_path / "s.json").read_text())["tasks"]["sent"]
    assert scored["accuracy"] == own["test"]["accuracy"]
    assert scored["loss"] == pytest.approx(own["test"]["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def joint(inputs, tmp_path_factory):  # noqa: F811
    """A joint multi-task ShareA run (A shared by both tasks, r=2) and a one-adapter run over the same tasks."""
    model_dir, tasks = inputs
    root = tmp_path_factory.mktemp("mt-runs")
    common = ["--model", str(model_dir), "--tasks", ",".join(f"{n}={d}" for n, d in tasks.items()), "--method",
              "sharea", "--rank", "2", "--epochs", "2", "--batch-size", "8", "--lr", "1e-2", "--no-progress"]
    assert main(["multitask", *common, "--task-share", "A", "--output-dir", str(root / "joint")]) == 0
    assert main(["multitask", *common, "--one-adapter", "--output-dir", str(root / "one")]) == 0
    return root / "joint", root / "one"


def test_tasks_of_multitask_directories_compress_exactly(joint, runs, tmp_path):
    per_task, one = joint
    scores = {}
    for d in (per_task, one):
        assert main(["eval", str(d), "--json", str(tmp_path / f"{d.name}.json")]) == 0
        scores[d.name] = json.loads((tmp_path / f"{d.name}.json").read_text())["tasks"]
    # A shared rank-2 A spans every task's update of a module type: k = 2 is exact for the per-task run.
    out = tmp_path / "c"
    assert main(["compress", str(out), f"sent={per_task}:sent", f"kind={per_task}:kind", "--rank", "2"]) == 0
    report = json.loads((out / "compression.json").read_text())
    assert all(t["max_error"] < 1e-5 for t in report["tasks"].values())
    assert report["sources"]["kind"].endswith(":kind")
    assert main(["eval", str(out), "--json", str(tmp_path / "c.json")]) == 0
    got = json.loads((tmp_path / "c.json").read_text())["tasks"]
    for task in ("sent", "kind"):
        assert got[task]["accuracy"] == scores["joint"][task]["accuracy"], task
        assert got[task]["loss"] == pytest.approx(scores["joint"][task]["loss"], rel=1e-5), task
    # One-adapter layout: 'kind' reads outputs 2..4 of a 5-wide head; mixed with a single-task run.
    out = tmp_path / "mixed"
    assert main(["compress", str(out), f"kind={one}:kind", f"sent={runs['sent']}", "--rank", "8"]) == 0
    info = json.loads((out / "adapter" / "run_info.json").read_text())
    assert info["num_labels"] == 3 and info["tasks"]["kind"]["logits"] == [0, 3]
    assert main(["eval", str(out), "--adapter", "kind", "--json", str(tmp_path / "m.json")]) == 0
    got = json.loads((tmp_path / "m.json").read_text())["tasks"]["kind"]
    assert got["accuracy"] == scores["one"]["kind"]["accuracy"]
    assert got["loss"] == pytest.approx(scores["one"]["kind"]["loss"], rel=1e-5)


def test_multitask_inputs_name_their_task(joint, runs, tmp_path, capsys):
    per_task, _ = joint
    assert main(["compress", str(tmp_path / "x"), f"a={per_task}", "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert "DIR:TASK" in err and "sent, kind" in err
    assert main(["compress", str(tmp_path / "x"), f"a={per_task}:nope", "--rank", "2"]) == 2
    assert "has no task 'nope'" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "x"), f"a={runs['sent']}:sent", "--rank", "2"]) == 2
    assert "single-task run" in capsys.readouterr().err


def test_task_cores_compress_exactly_and_score_as_the_runs(runs, tmp_path, capsys):
    out = tmp_path / "cores"
    # --share A: A per module type (rows: sent 3 layers x 2 + kind 2 = 8), B per layer (columns: 2 + 2 = 4)
    assert compress(runs, out, "--rank", "8", "--task-core", "matrix") == 0
    printed = capsys.readouterr().out
    assert "matrix task cores" in printed and "each task's cores" in printed
    report = json.loads((out / "compression.json").read_text())
    assert report["task_core"] == "matrix" and all(t["max_error"] < 1e-5 for t in report["tasks"].values())
    info = json.loads((out / "adapter" / "run_info.json").read_text())
    assert info["compression"]["task_core"] == "matrix"
    assert main(["eval", str(out), "--json", str(tmp_path / "cores.json")]) == 0
    scored = json.loads((tmp_path / "cores.json").read_text())["tasks"]
    for task, run in runs.items():
        own = json.loads((run / "results.json").read_text())
        assert scored[task]["accuracy"] == own["test"]["accuracy"], task
        assert scored[task]["loss"] == pytest.approx(own["test"]["loss"], rel=1e-5), task
    assert main(["export-peft", str(out), str(tmp_path / "peft"), "--adapter", "kind"]) == 0
