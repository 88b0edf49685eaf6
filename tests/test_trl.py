"""TRL's SFTTrainer trains a ShareLoraModel with its defaults, checkpoints the adapter only, resumes (issue 13)."""

import os

import pytest
import torch
from safetensors import safe_open

from sharelora import ShareLoraConfig, ShareLoraModel, get_sharelora_model

from generation_tiny import tiny_llama, tiny_tokenizer

pytest.importorskip("trl")

CONFIG = dict(rank=4, share="A", target_modules=["q_proj", "v_proj"])


def _model():
    return get_sharelora_model(tiny_llama(), ShareLoraConfig(**CONFIG))


def _dataset():
    from datasets import Dataset

    words = "translate to french hello world bonjour le monde the cheap pub near the river".split()
    return Dataset.from_list([{"text": " ".join(words[i:] + words[:i])} for i in range(12)])


def _sft(model, out, **kw):
    from trl import SFTConfig, SFTTrainer

    options = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                   report_to=[], use_cpu=True, save_steps=2, seed=0)
    options.update(kw)
    return SFTTrainer(model=model, args=SFTConfig(**options), train_dataset=_dataset(), processing_class=tiny_tokenizer())


@pytest.mark.parametrize("checkpointing", [True, False])
def test_sft_trainer_trains_the_adapter_with_trl_defaults(tmp_path, checkpointing):
    model = _model()
    before = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    frozen = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if not p.requires_grad}
    result = _sft(model, tmp_path, max_steps=2, save_strategy="no", gradient_checkpointing=checkpointing).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [k for k, v in model.adapter_state_dict().items() if not torch.equal(before[k], v)]
    assert changed and all(k.endswith("lora_B") or k.endswith("lora_A") for k in changed)
    assert all(torch.equal(p, frozen[n]) for n, p in model.base_model.named_parameters() if n in frozen)
    # the fused LM-head forward TRL installs went to the wrapped transformers model
    assert "fused_lm_head" in str(vars(model.base_model)["forward"].__code__.co_varnames)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.base_model.modules()) == checkpointing


def test_sft_trainer_checkpoints_hold_the_adapter_only(tmp_path):
    model = _model()
    _sft(model, tmp_path).train()
    ckpt = tmp_path / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.adapter_state_dict())  # no frozen base weight in it


def test_sft_trainer_checkpoint_loads_with_from_pretrained(tmp_path):
    model = _model()
    _sft(model, tmp_path).train()
    reloaded = ShareLoraModel.from_pretrained(tiny_llama(), tmp_path / "checkpoint-4")
    trained = model.adapter_state_dict()
    for k, v in reloaded.adapter_state_dict().items():
        # TRL trains under bf16 autocast (its default), but saves the adapter's fp32 master weights
        assert v.dtype == torch.float32 and torch.equal(v, trained[k].float()), k
    assert reloaded.sharelora_config.to_dict() == model.sharelora_config.to_dict()


def test_sft_trainer_resumes_from_its_checkpoint(tmp_path):
    straight = _model()
    _sft(straight, tmp_path / "a").train()
    resumed = _model()
    _sft(resumed, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    init = _model().adapter_state_dict()
    assert all(not torch.equal(v, init[k]) for k, v in resumed.adapter_state_dict().items())
    for k, v in straight.adapter_state_dict().items():  # the same steps 3-4 from the restored state
        torch.testing.assert_close(resumed.adapter_state_dict()[k], v, rtol=0, atol=0, msg=k)
