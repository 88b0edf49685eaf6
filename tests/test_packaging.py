"""What an installed sharelora imports and prints: optional packages only when their feature runs."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training_tiny import save_tiny_model_dir, tiny_data, write_csv

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent


def run_python(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with this checkout's sources first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes is not installed: nothing could import it")
def test_a_plain_training_run_never_imports_bitsandbytes(tmp_path):
    # `import peft` imports bitsandbytes whenever it is installed, which on CPU prints
    # "Failed to load CPU gemm_4bit_forward ..." (issue 23): a float model must not cause that.
    model_dir = save_tiny_model_dir(tmp_path / "tiny-bert")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for split, rows in tiny_data(n_train=8, n_dev=8, n_test=8).splits.items():
        write_csv(data_dir / f"{split}.csv", rows, text="review", label="stars")
    args = ["train", "--model", str(model_dir), "--dataset", str(data_dir), "--text-column", "review",
            "--label-column", "stars", "--max-steps", "1", "--batch-size", "8", "--output-dir",
            str(tmp_path / "run"), "--no-progress", "--device", "cpu"]
    code = (f"import sys\nfrom sharelora.cli import main\nstatus = main({args!r})\n"
            "print('IMPORTED', sorted(m for m in ('bitsandbytes', 'peft') if m in sys.modules))\n"
            "sys.exit(status)\n")
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "IMPORTED []" in done.stdout, done.stdout[-2000:]
    assert "gemm_4bit" not in done.stderr and "bitsandbytes" not in done.stderr, done.stderr[-2000:]


def test_a_model_made_after_peft_is_imported_is_a_peft_model():
    # what transformers' Trainer and TRL recognise adapter models by (peft_surface.py)
    peft = pytest.importorskip("peft")
    from conftest import tiny_bert

    from sharelora import ShareLoraConfig, get_sharelora_model

    model = get_sharelora_model(tiny_bert(), ShareLoraConfig(rank=2, target_modules=["query"]))
    assert isinstance(model, peft.PeftModel)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None or importlib.util.find_spec("peft") is None,
                    reason="needs bitsandbytes and peft installed")
def test_making_a_float_model_imports_neither_peft_nor_bitsandbytes(tmp_path):
    code = ("import sys\nfrom conftest import tiny_bert\nfrom sharelora import ShareLoraConfig, get_sharelora_model\n"
            "m = get_sharelora_model(tiny_bert(), ShareLoraConfig(rank=2, target_modules=['query']))\n"
            "print('IMPORTED', sorted(x for x in ('bitsandbytes', 'peft') if x in sys.modules))\n"
            "import peft\nm2 = get_sharelora_model(tiny_bert(), ShareLoraConfig(rank=2, target_modules=['query']))\n"
            "print('PEFT_MODEL', isinstance(m, peft.PeftModel), isinstance(m2, peft.PeftModel))\n")
    done = run_python(code, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "IMPORTED []" in done.stdout and "PEFT_MODEL False True" in done.stdout, done.stdout


def test_building_the_package_metadata_prints_no_deprecation(tmp_path):
    # setuptools deprecates `license = { text = ... }` (issue 23): the SPDX form, with license-files
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates SPDX license expressions (77)")
    root = SRC.parent
    code = ("import sys\nfrom setuptools import build_meta\n"
            f"print('DIST', build_meta.prepare_metadata_for_build_wheel({str(tmp_path)!r}))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Deprecat" not in done.stderr, done.stderr[-3000:]
    dist = tmp_path / done.stdout.split("DIST ")[1].strip()
    metadata = (dist / "METADATA").read_text(encoding="utf-8")
    assert "License-Expression: Apache-2.0" in metadata
    assert (dist / "licenses" / "LICENSE").is_file()


# --- extras: one table, one line naming the extra -----------------------------------------------------------
def pyproject():
    import tomllib

    return tomllib.loads((SRC.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def requirement_names(requirements):
    import re

    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_the_core_is_torch_transformers_and_safetensors():
    assert requirement_names(pyproject()["dependencies"]) == {"torch", "transformers", "safetensors"}


def test_every_module_of_an_extra_comes_from_a_package_of_that_extra():
    from importlib.metadata import packages_distributions

    from sharelora.extras import EXTRAS

    optional = pyproject()["optional-dependencies"]
    assert set(EXTRAS) <= set(optional)
    provided = packages_distributions()
    for extra, modules in EXTRAS.items():
        names = requirement_names(optional[extra])
        for module in modules:
            if module not in provided:
                pytest.skip(f"{module} is not installed here, so its distribution is unknown")
            dists = {d.lower().replace("_", "-") for d in provided[module]}
            assert dists & names, f"extra {extra!r}: module {module} comes from {dists}, not from {sorted(names)}"


def test_all_holds_every_feature_and_test_holds_all():
    optional = pyproject()["optional-dependencies"]
    assert optional["all"] == ["sharelora[train,serve,gguf,quantize,peft,datasets,tensorboard]"]
    assert "sharelora[all,wandb,mlflow]" in optional["test"]
    assert set(optional) - {"all", "test"} == {"train", "serve", "gguf", "quantize", "peft", "datasets",
                                                "tensorboard", "wandb", "mlflow"}


def test_py_typed_is_shipped_and_the_version_is_the_package_metadata():
    from importlib.metadata import PackageNotFoundError, version

    import sharelora

    assert (SRC / "sharelora" / "py.typed").is_file()
    import tomllib

    tool = tomllib.loads((SRC.parent / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    assert "py.typed" in tool["setuptools"]["package-data"]["sharelora"]
    assert pyproject()["version"] not in (SRC / "sharelora" / "__init__.py").read_text(encoding="utf-8")  # written once
    try:
        assert sharelora.__version__ == version("sharelora")
    except PackageNotFoundError:
        assert sharelora.__version__ == "0+unknown"


def test_version_flag_prints_the_version(capsys):
    import sharelora
    from sharelora.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"sharelora {sharelora.__version__}"


PRETEND_MISSING = ("import sys\nimport sharelora.extras as extras\n"
                   "extras._installed = lambda module: module not in {MISSING!r}\n"
                   "from sharelora.cli import main\nsys.exit(main({ARGV!r}))\n")


@pytest.mark.parametrize("argv,missing,extra", [
    (["serve", "--help"], {"fastapi"}, "serve"),  # its flags need the extra: before parsing
    (["serve", "--model", "x", "--port", "1"], {"uvicorn"}, "serve"),
    (["train", "--max-steps", "1"], {"matplotlib"}, "train"),
    (["multitask", "--help"], {"sacrebleu"}, "train"),
    (["export-peft", "no/such/run", "out"], {"scipy"}, "train"),  # its run imports the extra
])
def test_a_command_whose_extra_is_missing_stops_with_one_line_naming_it(tmp_path, argv, missing, extra):
    done = run_python(PRETEND_MISSING.format(MISSING=missing, ARGV=argv), tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sharelora {argv[0]}: error: "), done.stderr[-2000:]
    assert f"pip install 'sharelora[{extra}]'" in lines[0] and sorted(missing)[0] in lines[0]


def test_top_level_help_lists_the_commands_whose_extra_is_missing(tmp_path):
    done = run_python(PRETEND_MISSING.format(MISSING={"fastapi"}, ARGV=["--help"]), tmp_path)
    assert done.returncode == 0 and "  serve: pip install 'sharelora[serve]'" in done.stdout, done.stdout


def test_an_import_of_an_extra_inside_a_run_becomes_one_line(monkeypatch, capsys):
    import sharelora.cli as cli

    def needs_peft(args):
        import peft  # noqa: F401

    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ModuleNotFoundError
    cli.register_command("needs-peft", "imports peft", lambda p: None, needs_peft)
    assert cli.main(["needs-peft"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sharelora needs-peft: error: sharelora needs-peft needs peft, not installed here: "
                   "pip install 'sharelora[peft]'"]


@pytest.mark.parametrize("options,extra", [(dict(method="peft-vera"), "peft"), (dict(quantize="4bit"), "quantize"),
                                           (dict(report_to=["mlflow"]), "mlflow")])
def test_a_run_whose_options_need_a_missing_extra_fails_before_loading_anything(monkeypatch, options, extra):
    import sharelora.extras as extras
    from sharelora.training import TrainConfig

    monkeypatch.setattr(extras, "_installed", lambda module: module not in extras.EXTRAS[extra])
    with pytest.raises(extras.MissingExtraError, match=rf"pip install 'sharelora\[{extra}\]'"):
        TrainConfig(**options).validate()
