"""`sharelora train` and `sharelora eval` on the generation tasks, end to end.

A tiny random LLaMA and a word-level tokenizer are saved to a folder and the data are local files,
so the commands run as a user would run them, in seconds and without a download.
"""

import json

import pytest
from generation_tiny import tiny_e2e, tiny_instructions, tiny_llama, tiny_tokenizer

from sharelora.cli import build_parser, config_from_args, main
from sharelora.tasks.build import TASK_PRESETS
from sharelora.training.config import task_config


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A saved tiny causal LM, the tiny E2E splits as one JSON file and the instructions as JSONL rows."""
    root = tmp_path_factory.mktemp("generation-cli")
    model_dir = root / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer(chat_template=True).save_pretrained(model_dir)
    e2e = root / "e2e.json"
    e2e.write_text(json.dumps(tiny_e2e().splits))
    instructions = root / "instructions.jsonl"
    rows = [{**r, "split": s} for s, rs in tiny_instructions().splits.items() for r in rs]
    instructions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model": str(model_dir), "e2e": str(e2e), "instructions": str(instructions)}


def train_args(inputs, task, out, *extra):
    return ["train", "--task", task, "--model", inputs["model"], "--dataset", inputs[task], "--method", "sharea",
            "--max-steps", "2", "--batch-size", "2", "--max-length", "48", "--eval-batch-size", "4",
            "--output-dir", str(out), "--no-progress", *extra]


@pytest.fixture(scope="module")
def e2e_run(inputs):
    """A 2-step E2E run: test decoded with beam 2 and at most 4 new tokens, dev greedy."""
    out = inputs["root"] / "e2e-run"
    assert main(train_args(inputs, "e2e", out, "--num-beams", "2", "--max-new-tokens", "4")) == 0
    return out, json.loads((out / "results.json").read_text())


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_metrics(got, want):
    assert set(want) <= set(got)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


# --- eval of a generation adapter ----------------------------------------------------------------
def test_eval_of_an_e2e_adapter_scores_the_test_split_as_its_run_did(e2e_run, tmp_path):
    run, results = e2e_run
    assert results["test"]["num_beams"] == 2
    assert main(["eval", str(run), "--split", "test", "--batch-size", "4", "--json", str(tmp_path / "test.json")]) == 0
    metrics = json.loads((tmp_path / "test.json").read_text())
    assert metrics["task"] == "e2e" and metrics["split"] == "test" and metrics["examples"] == 3
    assert_same_metrics(metrics, results["test"])
    samples = tmp_path / "test-samples-test.jsonl"
    assert metrics["samples"] == str(samples)
    assert read_jsonl(samples) == read_jsonl(run / "samples-test.jsonl")


def test_eval_of_an_e2e_adapter_decodes_dev_as_the_run_did(e2e_run, tmp_path):
    run, results = e2e_run
    assert main(["eval", str(run / "adapter"), "--split", "dev", "--batch-size", "4",
                 "--json", str(tmp_path / "dev.json")]) == 0
    metrics = json.loads((tmp_path / "dev.json").read_text())
    assert metrics["num_beams"] == 1  # the run's dev_num_beams, not the test beam width
    assert_same_metrics(metrics, results["dev"])  # the kept (best) checkpoint's dev scores


def test_eval_num_beams_overrides_the_runs_beam_width(e2e_run, tmp_path, capsys):
    run, _ = e2e_run
    assert main(["eval", str(run), "--split", "test", "--num-beams", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["num_beams"] == 1


def test_eval_with_another_generation_task_is_an_error(e2e_run, capsys):
    run, _ = e2e_run
    assert main(["eval", str(run), "--task", "instructions"]) == 2
    assert "trained on task 'e2e'" in capsys.readouterr().err


def test_eval_of_an_instruction_adapter_trained_on_a_local_file(inputs, tmp_path):
    out = tmp_path / "run"
    assert main(train_args(inputs, "instructions", out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["dataset_options"] == {"task_type": "instruction"}
    assert main(["eval", str(out), "--batch-size", "4", "--json", str(tmp_path / "m.json")]) == 0
    assert_same_metrics(json.loads((tmp_path / "m.json").read_text()), results["test"])


@pytest.fixture(scope="module")
def capped_run(inputs):
    """A 2-step E2E run that evaluated 2 of the 3 test examples, in batches of 3."""
    out = inputs["root"] / "capped-run"
    assert main(train_args(inputs, "e2e", out, "--num-beams", "1", "--max-new-tokens", "4",
                           "--max-eval-examples", "2", "--eval-batch-size", "3")) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["examples"]["test"] == 2
    return out, results


@pytest.fixture
def eval_batch_sizes(monkeypatch):
    """The batch sizes E2ETask.evaluate is called with."""
    from sharelora.tasks.generation import E2ETask

    sizes, evaluate = [], E2ETask.evaluate

    def spy(self, model, split, batch_size=16, *args, **kwargs):
        sizes.append(batch_size)
        return evaluate(self, model, split, batch_size, *args, **kwargs)

    monkeypatch.setattr(E2ETask, "evaluate", spy)
    return sizes


def test_eval_of_a_run_uses_its_eval_batch_size_and_example_cap(capped_run, tmp_path, eval_batch_sizes):
    run, results = capped_run
    assert main(["eval", str(run), "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["examples"] == 2 and eval_batch_sizes == [3]
    assert_same_metrics(metrics, results["test"])


def test_eval_flags_override_the_runs_batch_size_and_example_cap(capped_run, capsys, eval_batch_sizes):
    run, _ = capped_run
    assert main(["eval", str(run), "--max-examples", "3", "--batch-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 3 and eval_batch_sizes == [2]


def test_eval_of_a_run_info_without_them_uses_batch_64_and_all_examples(capped_run, tmp_path, capsys,
                                                                         eval_batch_sizes):
    import shutil

    run, _ = capped_run
    old = tmp_path / "old-run"
    shutil.copytree(run / "adapter", old)
    info = json.loads((old / "run_info.json").read_text())
    assert (info["eval_batch_size"], info["max_eval_examples"]) == (3, 2)
    del info["eval_batch_size"], info["max_eval_examples"]  # as written before they were recorded
    (old / "run_info.json").write_text(json.dumps(info))
    assert main(["eval", str(old)]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 3 and eval_batch_sizes == [64]


# --- local files for the generation tasks ---------------------------------------------------------
@pytest.mark.parametrize("task,data_type", [("instructions", "instruction"), ("e2e", "generation")])
def test_a_local_file_takes_the_task_type_and_not_the_presets_dataset_options(task, data_type, tmp_path):
    args = build_parser().parse_args(["train", "--task", task, "--dataset", str(tmp_path / "mine.jsonl")])
    cfg = config_from_args(args)
    assert cfg.dataset_options == {"task_type": data_type}  # no natural-instructions "subtasks"
    builtin = config_from_args(build_parser().parse_args(["train", "--task", task]))
    assert builtin.dataset_options == TASK_PRESETS[task].get("dataset_options", {})  # the preset's own dataset


def test_task_config_gives_a_local_file_the_task_type(tmp_path):
    cfg = task_config("instructions", dataset=str(tmp_path / "mine.jsonl"), method="lora")
    assert cfg.dataset_options == {"task_type": "instruction"}


def test_options_given_for_a_local_file_are_kept(tmp_path):
    args = build_parser().parse_args(["train", "--task", "instructions", "--dataset", str(tmp_path / "mine.jsonl"),
                                      "--data-option", "dev_size=0.2", "--task-type", "instruction"])
    assert config_from_args(args).dataset_options == {"task_type": "instruction", "dev_size": 0.2}


def test_a_preset_option_given_for_a_local_file_names_the_allowed_ones(inputs, tmp_path, capsys):
    args = train_args(inputs, "instructions", tmp_path / "run", "--data-option", "subtasks=[1]")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) ['subtasks']" in err and "dev_size" in err


def test_a_local_file_without_the_tasks_fields_names_them(inputs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "say hi", "input": "", "output": "hi"}) + "\n"
                   + json.dumps({"prompt": "say hi", "response": "hi"}) + "\n")
    assert main(["train", "--task", "instructions", "--dataset", str(bad), "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "row 1 does not fit task_type 'instruction'" in err and "missing ['instruction', 'output']" in err
    assert "Each row must look like" in err


def test_a_jsonl_line_that_is_not_json_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"mr": "name: x", "target": "x ."}\n{"mr": "name: y", target}\n')
    assert main(["train", "--task", "e2e", "--dataset", str(bad), "--output-dir", str(tmp_path / "r")]) == 2
    assert "line 2 is not valid JSON" in capsys.readouterr().err
