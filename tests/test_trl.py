"""TRL's SFTTrainer and transformers' Trainer train a ShareLoraModel with their defaults (issue 13, part 4)."""

import pytest
import torch

from sharelora import ShareLoraConfig, get_sharelora_model

from generation_tiny import tiny_llama, tiny_tokenizer

pytest.importorskip("trl")


def _model():
    return get_sharelora_model(tiny_llama(), ShareLoraConfig(rank=4, share="A", target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("checkpointing", [True, False])
def test_sft_trainer_trains_the_adapter_with_trl_defaults(tmp_path, checkpointing):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = _model()
    before = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    frozen = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if not p.requires_grad}
    ds = Dataset.from_list([{"text": "translate to french hello world bonjour le monde"}] * 8)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], use_cpu=True, save_strategy="no", gradient_checkpointing=checkpointing)
    result = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tiny_tokenizer()).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [k for k, v in model.adapter_state_dict().items() if not torch.equal(before[k], v)]
    assert changed and all(k.endswith("lora_B") or k.endswith("lora_A") for k in changed)
    assert all(torch.equal(p, frozen[n]) for n, p in model.base_model.named_parameters() if n in frozen)
    # the fused LM-head forward TRL installs went to the wrapped transformers model
    assert "fused_lm_head" in str(vars(model.base_model)["forward"].__code__.co_varnames)
