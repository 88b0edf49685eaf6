"""Files the project writes record a sha256 of their tensor data; a load refuses bytes that changed.

And an adapter directory's two files are one save: the weights carry their config, so a config
from another save is recognised (an interrupted save) or refused (an edit, a copy).
"""

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sharelora import ShareLoraConfig, ShareLoraError, ShareLoraModel, get_sharelora_model
from sharelora.method import checkpoint
from sharelora.training.state import load_checkpoint, load_weights, save_checkpoint, save_weights

from conftest import tiny_bert, tiny_plain

DIGEST = checkpoint.DATA_SHA256_KEY


def adapter(alpha=8.0, shift=0.0):
    cfg = ShareLoraConfig(rank=4, alpha=alpha, share="A", target_modules=["q", "v"], init_lora_weights=False)
    model = get_sharelora_model(tiny_plain(), cfg)
    with torch.no_grad():
        for p in model.sharelora_bank.values():
            p.add_(shift)
    return model


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def flip_a_data_byte(path: Path) -> None:
    """Change one bit in the middle of the tensor data (after the header): safetensors still reads it."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + (len(raw) - start) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- the recorded sha256 ---------------------------------------------------------------------

def test_every_written_safetensors_file_records_the_sha256_of_its_data(tmp_path):
    adapter().save_pretrained(tmp_path / "a")
    cfg = ShareLoraConfig(rank=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    get_sharelora_model(tiny_bert(), cfg).export_peft(tmp_path / "peft")
    net = tiny_plain()
    save_checkpoint(tmp_path / "ckpt.safetensors", net, torch.optim.AdamW(net.parameters()), {"step": 1})
    save_weights(tmp_path / "best.safetensors", net)
    for f in [tmp_path / "a" / checkpoint.WEIGHTS_NAME, tmp_path / "peft" / "adapter_model.safetensors",
              tmp_path / "ckpt.safetensors", tmp_path / "best.safetensors"]:
        raw = f.read_bytes()
        start = 8 + int.from_bytes(raw[:8], "little")
        assert metadata(f)[DIGEST] == hashlib.sha256(raw[start:]).hexdigest(), f.name
        assert start % 8 == 0  # the data stays 8-byte aligned, as safetensors writes it


def test_a_flipped_byte_in_an_adapter_is_refused_naming_the_file(tmp_path):
    adapter().save_pretrained(tmp_path)
    flip_a_data_byte(tmp_path / checkpoint.WEIGHTS_NAME)
    with pytest.raises(ShareLoraError, match=r"adapter_model\.safetensors is corrupted: .*restore it"):
        ShareLoraModel.from_pretrained(tiny_plain(), tmp_path)


def test_a_flipped_byte_in_a_training_checkpoint_is_refused(tmp_path):
    net = tiny_plain()
    opt = torch.optim.AdamW(net.parameters())
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, net, opt, {"step": 3})
    flip_a_data_byte(path)
    with pytest.raises(ShareLoraError, match=r"checkpoint\.safetensors is corrupted"):
        load_checkpoint(path, net, opt)


def test_a_flipped_byte_in_the_best_weights_is_refused(tmp_path):
    net = tiny_plain()
    save_weights(tmp_path / "best.safetensors", net)
    flip_a_data_byte(tmp_path / "best.safetensors")
    with pytest.raises(ShareLoraError, match=r"best\.safetensors is corrupted"):
        load_weights(tmp_path / "best.safetensors", net)


def test_an_adapter_of_an_older_sharelora_without_the_sha256_loads_unchecked(tmp_path):
    model = adapter()
    save_file({k: v.detach().contiguous() for k, v in model.adapter_state_dict().items()},
              str(tmp_path / checkpoint.WEIGHTS_NAME), metadata={"format": "pt", "sharelora_format_version": "1"})
    (tmp_path / "adapter_config.json").write_text(model.sharelora_config.to_json_string())
    flip_a_data_byte(tmp_path / checkpoint.WEIGHTS_NAME)
    loaded = ShareLoraModel.from_pretrained(tiny_plain(), tmp_path)  # no record, no check
    assert not same(loaded.adapter_state_dict(), model.adapter_state_dict())


def test_a_peft_saved_adapter_loads_with_no_check(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    lora.save_pretrained(tmp_path)
    assert DIGEST not in metadata(tmp_path / "adapter_model.safetensors")
    ShareLoraModel.from_peft(tiny_bert(), tmp_path)


def test_peft_loads_an_export_that_records_the_sha256(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = ShareLoraConfig(rank=4, alpha=8, share="A", target_modules=["query", "value"], modules_to_save=["classifier"],
                          init_lora_weights=False)
    get_sharelora_model(tiny_bert(), cfg).export_peft(tmp_path)
    assert DIGEST in metadata(tmp_path / "adapter_model.safetensors")
    peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path))  # PEFT ignores metadata keys it does not know


def test_a_truncated_file_is_still_reported_as_truncated(tmp_path):
    adapter().save_pretrained(tmp_path)
    f = tmp_path / checkpoint.WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(ShareLoraError, match="truncated or corrupted"):
        checkpoint.load_adapter(tmp_path)


def test_sealing_a_file_of_another_writer_keeps_its_tensors(tmp_path):
    f = tmp_path / "model.safetensors"
    tensors = {"w": torch.randn(5, 3), "b": torch.arange(7, dtype=torch.int64)}
    save_file(tensors, str(f), metadata={"format": "pt"})
    assert checkpoint.verify_safetensors(f) is False  # nothing recorded yet
    checkpoint.seal_safetensors(f)
    assert checkpoint.verify_safetensors(f) is True
    assert same(checkpoint.load_tensors(f), tensors) and metadata(f)["format"] == "pt"
    flip_a_data_byte(f)
    with pytest.raises(ShareLoraError, match="model.safetensors is corrupted"):
        checkpoint.verify_safetensors(f)


# ---- one save, two files -----------------------------------------------------------------------

def test_weights_next_to_the_config_their_save_replaced_load_as_the_new_adapter(tmp_path, monkeypatch):
    adapter(alpha=8.0).save_pretrained(tmp_path)
    new = adapter(alpha=16.0, shift=1.0)
    real_commit, commits = checkpoint._commit, []

    def crash_before_the_config(tmp, path):  # the process dies between the two renames
        if commits:
            raise KeyboardInterrupt
        commits.append(path)
        real_commit(tmp, path)

    monkeypatch.setattr(checkpoint, "_commit", crash_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["alpha"] == 8.0  # the old config
    with pytest.warns(UserWarning, match="the last save was interrupted"):
        config, tensors = checkpoint.load_adapter(tmp_path)
    assert config.alpha == 16.0 and same(tensors, new.adapter_state_dict())


def test_a_config_edited_or_copied_from_another_adapter_is_refused(tmp_path):
    adapter(alpha=8.0).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    edited = json.loads(path.read_text())
    edited["alpha"] = 32.0
    path.write_text(json.dumps(edited))
    with pytest.raises(ShareLoraError, match=r"does not belong to .*adapter_model\.safetensors.*\['alpha'\].*delete"):
        ShareLoraModel.from_pretrained(tiny_plain(), tmp_path)


def test_deleting_the_config_loads_the_one_saved_with_the_weights(tmp_path):
    adapter(alpha=12.0).save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.warns(UserWarning, match="is missing"):
        config, _ = checkpoint.load_adapter(tmp_path)
    assert config.alpha == 12.0


def test_a_config_only_written_differently_loads(tmp_path):
    adapter().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text())))  # re-indented by another tool
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ShareLoraModel.from_pretrained(tiny_plain(), tmp_path)


# ---- the GGUF conversion cache -----------------------------------------------------------------

from test_sources import fake, write_tiny_llama_gguf  # noqa: E402,F401 (a tiny GGUF file and fake registry)

from sharelora.sources import load_model  # noqa: E402
from sharelora.sources import models as models_mod  # noqa: E402


def _logits(bundle):
    with torch.no_grad():
        return bundle.model(torch.tensor([[1, 5, 9, 200]])).logits


def test_a_corrupted_cached_gguf_conversion_is_converted_again(fake, capsys):
    first = load_model("fake-llama", task="causal-lm")
    weights = Path(first.info["path"]) / "model.safetensors"
    assert DIGEST in metadata(weights)
    flip_a_data_byte(weights)
    capsys.readouterr()
    second = load_model("fake-llama", task="causal-lm")
    err = capsys.readouterr().err
    assert "model.safetensors is corrupted" in err and "converting" in err
    assert torch.equal(_logits(first), _logits(second))
    assert checkpoint.verify_safetensors(weights)


def test_a_corrupted_conversion_of_a_local_gguf_file_is_converted_again(tmp_path, capsys, monkeypatch):
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    first = load_model(gguf, task="causal-lm", cache_dir=tmp_path / "cache")
    weights = Path(first.info["path"]) / "model.safetensors"
    flip_a_data_byte(weights)
    second = load_model(gguf, task="causal-lm", cache_dir=tmp_path / "cache")
    assert "is corrupted" in capsys.readouterr().err
    assert torch.equal(_logits(first), _logits(second))
    monkeypatch.setattr(models_mod, "convert_gguf", lambda *a, **k: pytest.fail("an intact cache converted again"))
    load_model(gguf, task="causal-lm", cache_dir=tmp_path / "cache")


def test_a_conversion_cached_before_the_sha256_was_recorded_loads_unchecked(tmp_path, monkeypatch):
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    first = load_model(gguf, task="causal-lm", cache_dir=tmp_path / "cache")
    weights = Path(first.info["path"]) / "model.safetensors"
    save_file(checkpoint.load_tensors(weights), str(weights), metadata={"format": "pt"})  # as transformers wrote it
    monkeypatch.setattr(models_mod, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    again = load_model(gguf, task="causal-lm", cache_dir=tmp_path / "cache")
    assert torch.equal(_logits(first), _logits(again))
