"""The command line: help, argument errors that name the fix, and a tiny end-to-end run."""

import json

import pytest
from training_tiny import save_tiny_model_dir, tiny_data, write_csv

from sharelora.cli import COMMANDS, build_parser, main


def sources_ready():
    try:
        from sharelora.sources import load_dataset, load_model  # noqa: F401
    except ImportError:
        return False
    return True


needs_sources = pytest.mark.skipif(not sources_ready(), reason="sharelora.sources.load_model is not there yet")


@pytest.mark.parametrize("command", ["train", "compare", "eval", "export-peft", "merge"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: sharelora " + command in capsys.readouterr().out


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_method_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "loraa"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'loraa'" in capsys.readouterr().err


def test_non_positive_rank_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--rank", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_batch_size_that_does_not_split_names_the_fix(capsys, tmp_path):
    assert main(["train", "--batch-size", "10", "--grad-accum", "3", "--output-dir", str(tmp_path / "r")]) == 2
    assert "multiple of 3" in capsys.readouterr().err


def test_compare_rejects_an_unknown_method(capsys, tmp_path):
    assert main(["compare", "--methods", "lora,shareq", "--output-dir", str(tmp_path)]) == 2
    assert "unknown method(s) shareq" in capsys.readouterr().err


def test_config_file_values_are_overridden_by_flags(tmp_path):
    from sharelora.cli import config_from_args

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"method": "lora", "rank": 4, "epochs": 7}))
    args = build_parser().parse_args(["train", "--config", str(path), "--rank", "16", "--label-column", "y"])
    cfg = config_from_args(args)
    assert (cfg.method, cfg.rank, cfg.epochs) == ("lora", 16, 7)
    assert cfg.dataset_options == {"label_column": "y"}


def test_config_file_with_an_unknown_field_is_an_error(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"rnak": 4}))
    assert main(["train", "--config", str(path)]) == 2
    assert "unknown fields ['rnak']" in capsys.readouterr().err


def test_a_command_can_be_registered(monkeypatch, capsys):
    from sharelora import cli

    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    cli.register_command("hello", "say hello", lambda p: p.add_argument("--name", default="world"),
                         lambda args: print(f"hello {args.name}"))
    assert cli.main(["hello", "--name", "sharelora"]) == 0
    assert capsys.readouterr().out.strip() == "hello sharelora"


# --- end to end on a local tiny model and a local CSV ----------------------------------------------
@pytest.fixture(scope="module")
def local_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny_model_dir(root / "tiny-bert")
    data = tiny_data(n_train=32, n_dev=16, n_test=16)
    data_dir = root / "tiny-data"
    data_dir.mkdir()
    for split, rows in data.splits.items():
        write_csv(data_dir / f"{split}.csv", rows, text="review", label="stars")
    return model_dir, data_dir


def tiny_run_args(local_inputs, out, *extra):
    model_dir, data_dir = local_inputs
    return ["train", "--model", str(model_dir), "--dataset", str(data_dir), "--text-column", "review",
            "--label-column", "stars", "--epochs", "1", "--batch-size", "8", "--output-dir", str(out),
            "--no-progress", *extra]


@needs_sources
def test_tiny_cli_run_then_eval_export_and_merge(local_inputs, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_run_args(local_inputs, out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["examples"] == {"train": 32, "dev": 16, "test": 16}
    assert "test accuracy" in capsys.readouterr().out

    assert main(["eval", str(out), "--split", "test", "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == results["test"]["accuracy"]

    assert main(["export-peft", str(out / "adapter"), str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()

    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert main(["eval", str(tmp_path / "merged"), "--json", str(tmp_path / "merged.json")]) == 0
    assert json.loads((tmp_path / "merged.json").read_text())["accuracy"] == results["test"]["accuracy"]


@needs_sources
def test_cli_run_in_an_existing_directory_asks_for_resume(local_inputs, tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert main(tiny_run_args(local_inputs, out, "--max-steps", "1", "--threads", "1")) == 0
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "results.json").read_text())["environment"]["torch_threads"] == 1
    assert main(tiny_run_args(local_inputs, out, "--max-steps", "1")) == 2
    assert "pass --resume" in capsys.readouterr().err


@needs_sources
def test_bad_column_names_the_columns(local_inputs, tmp_path, capsys):
    args = tiny_run_args(local_inputs, tmp_path / "run")
    args[args.index("stars")] = "rating"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "'rating' not found" in err and "stars" in err


@needs_sources
def test_unknown_dataset_is_an_error_listing_the_known_ones(tmp_path, capsys):
    assert main(["train", "--dataset", "rotten-potatoes", "--output-dir", str(tmp_path / "r")]) == 2
    assert "rotten-tomatoes" in capsys.readouterr().err


# --- config files ----------------------------------------------------------------------------------------
@needs_sources
def test_a_run_directory_config_yaml_reproduces_the_run(local_inputs, tmp_path):
    from safetensors.torch import load_file

    from sharelora.training import TrainConfig

    first = tmp_path / "first"
    assert main(tiny_run_args(local_inputs, first, "--method", "lora", "--share-block-size", "1", "--seed", "4")) == 0
    results = json.loads((first / "results.json").read_text())
    assert TrainConfig.from_file(first / "config.yaml").to_dict() == results["config"]  # the resolved config, whole
    again = tmp_path / "again"  # the file's values, the output directory overridden on the command line
    assert main(["train", "--config", str(first / "config.yaml"), "--output-dir", str(again), "--no-progress"]) == 0
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (first, again))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert json.loads((again / "results.json").read_text())["test"] == results["test"]


def test_yaml_and_json_config_files_are_overridden_by_flags(tmp_path):
    from sharelora.cli import config_from_args

    (tmp_path / "run.yaml").write_text("method: shareb\nrank: 4\nepochs: 3\ntargets: all-linear\n"
                                       "method_options: {share_block_size: 2}\n")
    (tmp_path / "run.json").write_text(json.dumps({"method": "shareb", "rank": 4, "epochs": 3}))
    for name in ("run.yaml", "run.json"):
        cfg = config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / name), "--rank", "8",
                                                          "--dropout-mask", "module"]))
        assert (cfg.method, cfg.rank, cfg.epochs) == ("shareb", 8, 3)
    assert cfg.method_options == {"dropout_mask": "module"}
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml")]))
    assert cfg.targets == "all-linear" and cfg.method_options == {"share_block_size": 2}


def test_a_config_file_that_is_not_a_mapping_names_the_problem(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("- rank\n- 8\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "must hold a mapping of field: value" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err


def test_compare_and_multitask_take_their_own_options_from_a_config_file(tmp_path, monkeypatch):
    from sharelora.cli.multitask import config_from_multitask_args
    from sharelora.training import compare as compare_module

    (tmp_path / "mt.yaml").write_text("tasks: [a=x.csv, b=y.csv]\ncontinual: true\ntask_share: none\nrank: 4\n")
    cfg = config_from_multitask_args(build_parser().parse_args(["multitask", "--config", str(tmp_path / "mt.yaml"),
                                                                "--task-share", "B"]))
    assert (cfg.tasks, cfg.continual, cfg.task_share, cfg.rank) == (["a=x.csv", "b=y.csv"], True, "B", 4)

    seen = {}
    monkeypatch.setattr(compare_module, "compare", lambda base, specs, seeds, out, **kw: seen.update(
        methods=[s.label for s in specs], seeds=seeds, out=out, rank=base.rank, jobs=kw["jobs"]) or {"runs": []})
    monkeypatch.setattr("sharelora.cli.compare._report", lambda out, summary: None)
    (tmp_path / "cmp.yaml").write_text(f"methods: [lora, sharea@r=2]\nseeds: 2\nrank: 4\njobs: 2\n"
                                       f"output_dir: {tmp_path / 'c'}\n")
    assert main(["compare", "--config", str(tmp_path / "cmp.yaml"), "--jobs", "1"]) == 0
    assert seen == {"methods": ["lora", "sharea@r=2"], "seeds": [0, 1], "out": str(tmp_path / "c"), "rank": 4, "jobs": 1}


@needs_sources
def test_compare_trains_each_run_in_a_process_of_its_own(local_inputs, tmp_path):
    model_dir, data_dir = local_inputs
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(model_dir), "--dataset", str(data_dir), "--text-column", "review",
                 "--label-column", "stars", "--methods", "lora", "--seeds", "1", "--epochs", "1", "--batch-size", "8",
                 "--threads", "1", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in summary["runs"]] == ["lora"]
    run = json.loads((out / "lora-s0" / "results.json").read_text())
    assert run["environment"]["torch_threads"] == 1 and (out / "lora-s0" / "config.yaml").is_file()
    assert run["status"] == "finished"


@needs_sources
def test_evaluate_run_is_what_eval_prints(local_inputs, tmp_path, capsys):
    from sharelora import evaluate_run

    out = tmp_path / "run"
    assert main(tiny_run_args(local_inputs, out)) == 0
    results = json.loads((out / "results.json").read_text())
    scored = evaluate_run(out, split="dev")
    assert scored["accuracy"] == results["dev"]["accuracy"] and scored["examples"] == 16
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "dev"]) == 0
    assert json.loads(capsys.readouterr().out) == scored
    with pytest.raises(ValueError, match="was trained on task 'classification', not 'e2e'"):
        evaluate_run(out, task="e2e")
