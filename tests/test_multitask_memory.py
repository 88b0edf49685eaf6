"""Memory options of `sharelora multitask`: --gradient-checkpointing, --bf16, --quantize 4bit (issue 13).

A 2-layer BERT of hidden 64 (bitsandbytes' 4-bit blocks hold 64 weights) without a head, so each run
builds its classifier for the tasks' labels; the tasks are test_multitask's (2 and 3 labels).
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_multitask import inputs, three_way  # noqa: F401 (the module fixture and its data)
from training_tiny import FILLER, NEGATIVE, POSITIVE, SPECIAL, tiny_tokenizer

from sharelora.cli import main


@pytest.fixture(scope="module")
def small(inputs, tmp_path_factory):  # noqa: F811
    from transformers import BertConfig, BertModel

    _, tasks = inputs
    directory = tmp_path_factory.mktemp("mt-memory") / "small-bert"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(SPECIAL + POSITIVE + NEGATIVE + FILLER), hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(directory)
    tiny_tokenizer(directory).save_pretrained(directory)
    return directory, tasks


def multitask(small, out, *extra):
    model_dir, tasks = small
    assert main(["multitask", "--model", str(model_dir), "--tasks", ",".join(f"{n}={d}" for n, d in tasks.items()),
                 "--method", "sharea", "--rank", "2", "--epochs", "2", "--batch-size", "8", "--lr", "1e-2",
                 "--dropout", "0.1", "--output-dir", str(out), "--no-progress", *extra]) == 0
    return json.loads((out / "results.json").read_text())


def rescored(out, tmp_path):
    """Each task's test metrics from the saved adapter directory, rebuilt as it was trained."""
    target = tmp_path / f"{out.name}-eval.json"
    assert main(["eval", str(out), "--json", str(target)]) == 0
    return json.loads(target.read_text())["tasks"]


def test_gradient_checkpointing_trains_the_same_adapters(small, tmp_path):
    plain = multitask(small, tmp_path / "plain")
    ckpt = multitask(small, tmp_path / "ckpt", "--gradient-checkpointing")
    assert ckpt["config"]["gradient_checkpointing"] is True
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors")
    # Mixed-task batches: the recomputation in backward routes each row to its task's adapter again, with
    # the same dropout masks (the RNG state is restored), so the adapters are equal, not merely close.
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {n: t["test"] for n, t in ckpt["tasks"].items()} == {n: t["test"] for n, t in plain["tasks"].items()}


def test_bf16_keeps_fp32_adapters_and_heads_and_continual_forgets_nothing(small, tmp_path):
    out = tmp_path / "bf16"
    r = multitask(small, out, "--bf16", "--continual")
    assert r["model_info"]["dtype"] == "bfloat16" and r["config"]["bf16"] is True
    assert r["name"].endswith("-bf16")  # not the fp32 run's default directory
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    # fp32 master weights for every task's adapter and head, the later tasks' included
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    assert any("modules_to_save" in k and "kind" in k for k in saved)
    assert all(v == 0.0 for v in r["forgetting"]["per_task"].values())  # frozen shared A, own B's: exactly zero
    info = json.loads((out / "adapter" / "run_info.json").read_text())
    assert info["bf16"] is True and info["quantize"] is None
    got = rescored(out, tmp_path)  # rebuilt with a bf16 base under bf16 autocast: what the run scored
    for task, t in r["tasks"].items():
        assert got[task]["accuracy"] == t["test"]["accuracy"], task
        assert got[task]["loss"] == pytest.approx(t["test"]["loss"], rel=1e-5), task


def test_a_4bit_base_trains_the_adapters_and_eval_rebuilds_it(small, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "nf4"
    r = multitask(small, out, "--quantize", "4bit")
    assert r["model_info"]["quantize"] == "4bit" and r["config"]["quantize_compute_dtype"] == "float32"
    info = json.loads((out / "adapter" / "run_info.json").read_text())
    assert info["quantize"] == "4bit"
    got = rescored(out, tmp_path)
    for task, t in r["tasks"].items():
        assert got[task]["accuracy"] == t["test"]["accuracy"], task
        assert got[task]["loss"] == pytest.approx(t["test"]["loss"], rel=1e-5), task


def test_fsdp_is_refused_with_what_works_instead(small, tmp_path, capsys):
    model_dir, tasks = small
    assert main(["multitask", "--model", str(model_dir), "--tasks", ",".join(f"{n}={d}" for n, d in tasks.items()),
                 "--fsdp", "--output-dir", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--fsdp" in capsys.readouterr().err
