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
