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
