"""The adapter directory: compact, exact, validated, atomically written."""

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open

from sharelora import ShareLoraConfig, ShareLoraError, ShareLoraModel, get_sharelora_model

from conftest import BUILDERS, example_input, run, tiny_bert, tiny_llama


def trained(arch="bert", share="A", **kw):
    build, targets = BUILDERS[arch]
    cfg = ShareLoraConfig(rank=4, alpha=8, share=share, target_modules=targets, init_lora_weights=False, **kw)
    model = get_sharelora_model(build(), cfg)
    return model


@pytest.mark.parametrize("share", ["none", "A", "B", "AB"])
def test_round_trip_is_exact(arch, share, tmp_path):
    model = trained(arch, share)
    model.save_pretrained(tmp_path)
    loaded = ShareLoraModel.from_pretrained(BUILDERS[arch][0](), tmp_path)
    x = example_input(arch)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, arch, x), run(model, arch, x), rtol=0, atol=0)
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[k], v)


def test_each_shared_tensor_is_stored_once_and_file_size_is_params_times_bytes(tmp_path):
    model = trained("bert", "AB")
    model.save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    with safe_open(str(f), "pt") as sf:
        keys = list(sf.keys())
    assert sorted(keys) == sorted(model.plan.tensors)
    payload = model.plan.num_parameters() * 4
    header = int.from_bytes(f.read_bytes()[:8], "little")
    assert f.stat().st_size == 8 + header + payload


def test_modules_to_save_are_saved_and_restored(tmp_path):
    model = trained("bert", "A", modules_to_save=["classifier"])
    with torch.no_grad():
        model.base_model.classifier.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    loaded = ShareLoraModel.from_pretrained(tiny_bert(), tmp_path)
    assert torch.equal(loaded.base_model.classifier.weight, model.base_model.classifier.weight)


def test_from_pretrained_is_frozen_unless_trainable(tmp_path):
    trained("bert").save_pretrained(tmp_path)
    assert not any(p.requires_grad for p in ShareLoraModel.from_pretrained(tiny_bert(), tmp_path).parameters())
    again = ShareLoraModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in again.sharelora_bank.values())


def test_loading_into_a_base_of_other_shape_names_the_mismatch(tmp_path):
    trained("bert").save_pretrained(tmp_path)
    from transformers import BertConfig, BertForSequenceClassification

    other = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                                     intermediate_size=48, vocab_size=97, num_labels=3))
    with pytest.raises(ShareLoraError, match=r"saved shape \(4, 32\), this model needs \(4, 64\)"):
        ShareLoraModel.from_pretrained(other, tmp_path)


def test_loading_into_a_base_without_the_modules_is_a_clear_error(tmp_path):
    trained("bert").save_pretrained(tmp_path)
    with pytest.raises(ShareLoraError, match="matched no linear module"):
        ShareLoraModel.from_pretrained(tiny_llama(), tmp_path)


def test_missing_directory_and_missing_weights(tmp_path):
    with pytest.raises(ShareLoraError, match="does not exist"):
        ShareLoraModel.from_pretrained(tiny_bert(), tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text(ShareLoraConfig().to_json_string())
    with pytest.raises(ShareLoraError, match="no adapter_model.safetensors"):
        ShareLoraModel.from_pretrained(tiny_bert(), tmp_path)


def test_truncated_weights_are_a_clear_error(tmp_path):
    trained("bert").save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ShareLoraError, match="truncated or corrupted"):
        ShareLoraModel.from_pretrained(tiny_bert(), tmp_path)


def test_corrupted_config_is_a_clear_error(tmp_path):
    trained("bert").save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"rank": 4, ')
    with pytest.raises(ShareLoraError, match="not valid JSON"):
        ShareLoraModel.from_pretrained(tiny_bert(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"rank": 4, "bogus": 1}))
    with pytest.raises(ShareLoraError, match=r"unknown fields \['bogus'\]"):
        ShareLoraModel.from_pretrained(tiny_bert(), tmp_path)


def test_pickle_only_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(ShareLoraConfig().to_json_string())
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ShareLoraError, match="pickles are not loaded"):
        ShareLoraModel.from_pretrained(tiny_bert(), tmp_path)


def test_a_failed_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    first = trained("bert")
    first.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    second = trained("bert")
    with torch.no_grad():
        for p in second.sharelora_bank.values():
            p.add_(1.0)

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        second.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    ShareLoraModel.from_pretrained(tiny_bert(), tmp_path)
