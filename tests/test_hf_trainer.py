"""transformers.Trainer: training works and checkpoints hold the adapter, not the model."""

import os

import pytest
import torch

from sharelora import ShareLoraConfig, ShareLoraModel, ShareLoraTrainer, get_sharelora_model

from conftest import tiny_bert


class Toy(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 97, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] % 3).tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.labels[i]}


def _args(out, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2,
                             save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, **kw)


def test_trainer_checkpoints_contain_the_adapter_only(tmp_path):
    model = get_sharelora_model(tiny_bert(), ShareLoraConfig(rank=4, share="A", target_modules=["query", "value"],
                                                             modules_to_save=["classifier"]))
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    trainer = ShareLoraTrainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=Toy())
    result = trainer.train()
    assert result.training_loss > 0
    assert any(not torch.equal(before[k], v) for k, v in model.adapter_state_dict().items())
    ckpt = tmp_path / "checkpoint-2"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files and "pytorch_model.bin" not in files
    reloaded = ShareLoraModel.from_pretrained(tiny_bert(), tmp_path / "checkpoint-4")
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(reloaded.adapter_state_dict()[k], v)


def test_trainer_resumes_from_an_adapter_checkpoint(tmp_path):
    def fresh():
        return get_sharelora_model(tiny_bert(), ShareLoraConfig(rank=4, share="A", target_modules=["query", "value"],
                                                                modules_to_save=["classifier"]))

    full = fresh()
    ShareLoraTrainer(model=full, args=_args(tmp_path / "a", max_steps=4), train_dataset=Toy()).train()
    part = fresh()
    ShareLoraTrainer(model=part, args=_args(tmp_path / "b", max_steps=4), train_dataset=Toy()).train()
    resumed = fresh()
    ShareLoraTrainer(model=resumed, args=_args(tmp_path / "b", max_steps=4), train_dataset=Toy()).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for k, v in full.adapter_state_dict().items():  # the same steps on the restored state: equal, not close
        torch.testing.assert_close(resumed.adapter_state_dict()[k], v, rtol=0, atol=0)


def test_trainer_refuses_a_model_that_is_not_wrapped(tmp_path):
    with pytest.raises(TypeError, match="get_sharelora_model"):
        ShareLoraTrainer(model=tiny_bert(), args=_args(tmp_path))


# --- the stock transformers.Trainer -------------------------------------------------------------------
def _bert_model():
    return get_sharelora_model(tiny_bert(), ShareLoraConfig(rank=4, share="A", target_modules=["query", "value"],
                                                            modules_to_save=["classifier"]))


def test_stock_trainer_with_gradient_checkpointing_checkpoints_the_adapter_only(tmp_path):
    from safetensors import safe_open
    from transformers import Trainer

    model = _bert_model()
    before = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    Trainer(model=model, args=_args(tmp_path, max_steps=4, gradient_checkpointing=True), train_dataset=Toy()).train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.base_model.modules())  # the blocks'
    assert all(not torch.equal(before[k], v) for k, v in model.adapter_state_dict().items())
    files = set(os.listdir(tmp_path / "checkpoint-2"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    with safe_open(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.adapter_state_dict())
    reloaded = ShareLoraModel.from_pretrained(tiny_bert(), tmp_path / "checkpoint-4")
    for k, v in model.adapter_state_dict().items():
        assert torch.equal(reloaded.adapter_state_dict()[k], v), k


def test_stock_trainer_resumes_from_an_adapter_checkpoint_with_gradient_checkpointing(tmp_path):
    from transformers import Trainer

    def run(out, resume=None):
        model = _bert_model()
        Trainer(model=model, args=_args(out, max_steps=4, gradient_checkpointing=True),
                train_dataset=Toy()).train(resume_from_checkpoint=resume)
        return model.adapter_state_dict()

    straight = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    for k, v in straight.items():  # the same steps on the restored state: equal, not close
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0, msg=k)


def test_stock_trainer_keeps_the_columns_and_labels_of_the_base_model(tmp_path):
    from transformers import Trainer

    trainer = Trainer(model=_bert_model(), args=_args(tmp_path, max_steps=1), train_dataset=Toy())
    assert trainer.label_names == ["labels"]  # read from BertForSequenceClassification.forward, not ours
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)
