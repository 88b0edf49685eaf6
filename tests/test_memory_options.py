"""Memory options of `sharelora train`: --bf16, --gradient-checkpointing, --quantize 4bit|8bit (issue 13)."""

import json

import pytest
import torch
from generation_tiny import TinyBundle, tiny_e2e, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file
from training_tiny import NEGATIVE, POSITIVE, FILLER, SPECIAL, tiny_data, tiny_tokenizer as bert_tokenizer, write_csv

from sharelora.cli import build_parser, config_from_args, main
from sharelora.training.config import task_config
from sharelora.training import train
from sharelora.training.config import TrainConfig
from sharelora.training.methods import prepare_model


# --- the options as configuration ------------------------------------------------------------------
def test_the_flags_set_the_config_fields():
    args = build_parser().parse_args(["train", "--bf16", "--gradient-checkpointing", "--quantize", "4bit",
                                      "--quantize-compute-dtype", "bfloat16"])
    cfg = config_from_args(args)
    assert (cfg.bf16, cfg.gradient_checkpointing, cfg.quantize, cfg.quantize_compute_dtype) == \
        (True, True, "4bit", "bfloat16")
    off = config_from_args(build_parser().parse_args(["train"]))
    assert (off.bf16, off.gradient_checkpointing, off.quantize, off.quantize_compute_dtype) == (False, False, None, None)


def test_the_4bit_compute_dtype_follows_bf16_unless_given():
    assert TrainConfig(quantize="4bit").resolved().quantize_compute_dtype == "float32"
    assert TrainConfig(quantize="4bit", bf16=True).resolved().quantize_compute_dtype == "bfloat16"
    assert TrainConfig(quantize="4bit", quantize_compute_dtype="float16").resolved().quantize_compute_dtype == "float16"
    assert TrainConfig(quantize="8bit").resolved().quantize_compute_dtype is None


@pytest.mark.parametrize("fields, message", [
    (dict(quantize="3bit"), "quantize must be one of 4bit, 8bit"),
    (dict(quantize="4bit", method="full"), "full fine-tuning cannot train it"),
    (dict(quantize_compute_dtype="bfloat16"), "needs --quantize 4bit"),
    (dict(quantize="8bit", quantize_compute_dtype="bfloat16"), "needs --quantize 4bit"),
    (dict(quantize="4bit", quantize_compute_dtype="int8"), "quantize_compute_dtype must be one of"),
    (dict(bf16="yes"), "bf16 must be true or false"),
])
def test_bad_memory_options_name_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields).validate()


def test_options_that_change_the_numbers_change_the_run_name_and_the_resume_key():
    base = TrainConfig()
    assert TrainConfig(quantize="4bit", bf16=True).name == base.name + "-nf4-bf16"
    assert TrainConfig(gradient_checkpointing=True).name == base.name  # exact: the same run
    assert TrainConfig(bf16=True).resume_key() != base.resume_key()
    assert TrainConfig(gradient_checkpointing=True).resume_key() == base.resume_key()
    # a checkpoint written before the options existed has none of their keys, and still resumes
    assert not {"bf16", "quantize", "quantize_compute_dtype", "gradient_checkpointing"} & set(base.resume_key())


def test_with_every_option_off_the_model_is_left_as_it_was(tmp_path):
    from training_tiny import tiny_bundle

    model = prepare_model(tiny_bundle(tmp_path).model, TrainConfig().resolved())
    assert "forward" not in vars(model)  # no autocast wrapper: no per-step work added
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


# --- gradient checkpointing ----------------------------------------------------------------------------
def e2e(tmp_path, name, **kw):
    values = dict(model="tiny-llama", method="sharea", max_steps=3, batch_size=4, log_every=1, max_length=48,
                  eval_batch_size=4, output_dir=str(tmp_path / name), task_options={"num_beams": 1, "max_new_tokens": 4})
    values.update(kw)
    return train(task_config("e2e", **values), bundle=TinyBundle(tiny_llama(), tiny_tokenizer()), data=tiny_e2e(),
                 progress=False)


def test_gradient_checkpointing_recomputes_every_block_in_backward():
    cfg = task_config("e2e", model="tiny-llama", method="sharea", gradient_checkpointing=True).resolved()
    cfg.targets = ["q_proj", "v_proj"]
    model = prepare_model(tiny_llama(), cfg)
    calls = []
    model.base_model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    ids = torch.tensor([[3, 10, 11, 12, 13]])
    loss = model(input_ids=ids, labels=ids).loss
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2  # the block ran again for its backward
    b = [p for k, p in model.sharelora_bank.items() if k.endswith("lora_B")]  # (A's is 0 while B is 0)
    assert b and all(p.grad.abs().sum() > 0 for p in b)  # and the adapter's gradients came through


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path):
    plain = e2e(tmp_path, "plain", dropout=0.1)
    ckpt = e2e(tmp_path, "ckpt", dropout=0.1, gradient_checkpointing=True)
    assert ckpt["config"]["gradient_checkpointing"] is True
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors")
    # the recomputation replays the same ops with the same dropout masks (the RNG state is restored)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ckpt["dev"] == plain["dev"]


# --- bf16 and quantized bases, end to end through the CLI ------------------------------------------------
def save_small_bert(directory):
    """A 2-layer BERT of hidden 64 with its tokenizer: bitsandbytes' 4-bit blocks hold 64 weights, and its
    CPU kernels want whole blocks along a row (training_tiny's hidden 32 is too narrow for them)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(SPECIAL + POSITIVE + NEGATIVE + FILLER), hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(directory)
    bert_tokenizer(directory).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def local_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    model_dir = save_small_bert(root / "small-bert")
    data_dir = root / "tiny-data"
    data_dir.mkdir()
    for split, rows in tiny_data(n_train=32, n_dev=16, n_test=16).splits.items():
        write_csv(data_dir / f"{split}.csv", rows)
    return model_dir, data_dir


def cli_run(local_inputs, out, *extra):
    model_dir, data_dir = local_inputs
    args = ["train", "--model", str(model_dir), "--dataset", str(data_dir), "--epochs", "1", "--batch-size", "8",
            "--lr", "1e-2", "--output-dir", str(out), "--no-progress", *extra]
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


def test_bf16_stores_the_base_in_bf16_and_trains_fp32_master_weights(local_inputs, tmp_path):
    from sharelora.training import load_trained_model

    r = cli_run(local_inputs, tmp_path / "run", "--bf16")
    assert r["model_info"]["dtype"] == "bfloat16" and r["config"]["bf16"] is True
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())  # adapter and head: fp32 master weights
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in saved.items())
    info = json.loads((tmp_path / "run" / "adapter" / "run_info.json").read_text())
    assert info["bf16"] is True and info["quantize"] is None
    model, _, _ = load_trained_model(tmp_path / "run")  # rebuilt as trained: bf16 base, bf16 autocast
    assert model.base_model.bert.encoder.layer[0].attention.self.key.weight.dtype == torch.bfloat16
    assert main(["eval", str(tmp_path / "run"), "--split", "test", "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["loss"] == r["test"]["loss"]  # the same computation


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_a_quantized_run_trains_on_the_quantized_base_and_eval_and_merge_rebuild_it(local_inputs, tmp_path, kind):
    pytest.importorskip("bitsandbytes")
    from sharelora.method.quantized import quantization_of
    from sharelora.training import load_trained_model

    out = tmp_path / "run"
    r = cli_run(local_inputs, out, "--quantize", kind)
    assert r["model_info"]["quantize"] == kind
    assert r["config"]["quantize_compute_dtype"] == ("float32" if kind == "4bit" else None)
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in saved.items())
    assert not any(k.endswith(".weight") and "classifier" not in k for k in saved)  # no base weight in the adapter
    model, _, _ = load_trained_model(out)
    assert quantization_of(model.base_model.bert.encoder.layer[0].attention.self.key) == kind  # not adapted, quantized
    assert quantization_of(model.base_model.classifier) is None  # the head stays float (it is trained)
    assert main(["eval", str(out), "--split", "test", "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["loss"] == r["test"]["loss"]
    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0  # into the dequantized weights
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert main(["eval", str(tmp_path / "merged"), "--split", "test", "--json", str(tmp_path / "merged.json")]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    if kind == "4bit":  # the 4-bit layers multiply by exactly the dequantized weights
        assert merged["accuracy"] == r["test"]["accuracy"]
        assert merged["loss"] == pytest.approx(r["test"]["loss"], rel=1e-4)
    else:  # LLM.int8() also rounds the activations, which the float model does not
        assert merged["loss"] == pytest.approx(r["test"]["loss"], rel=0.05)


def test_quantize_without_bitsandbytes_names_the_extra(monkeypatch, local_inputs):
    import sys

    from sharelora.sources import SourceError, load_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(SourceError, match=r"pip install 'sharelora\[quantize\]'"):
        load_model(str(local_inputs[0]), quantize="4bit")
