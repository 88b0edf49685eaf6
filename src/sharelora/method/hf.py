"""transformers.Trainer integration: checkpoints hold the adapter, not the whole model."""

from __future__ import annotations

import inspect
import os

from transformers import Trainer

from .model import ShareLoraModel


class ShareLoraTrainer(Trainer):
    """A ``transformers.Trainer`` for a ``ShareLoraModel``.

    Differences from the stock Trainer, all because the model is a wrapper Trainer does not know:
    checkpoints (and ``save_model``) write the adapter directory (``save_pretrained``) instead of a
    full state dict; ``load_best_model_at_end`` / ``resume_from_checkpoint`` load it back; the
    dataset columns kept and the label names are those of the base model's ``forward``.

    With peft installed, a ShareLoraModel around a transformers model is recognised by the stock
    ``Trainer`` (and TRL's trainers) as an adapter model and gets all of this from them
    (``peft_surface.py``); this class gives it without peft, or for a model of another kind.
    """

    def __init__(self, model: ShareLoraModel = None, args=None, *a, **kw):
        if not isinstance(model, ShareLoraModel):
            raise TypeError(f"ShareLoraTrainer trains a ShareLoraModel, got {type(model).__name__}; "
                            "wrap it with get_sharelora_model first (or use transformers.Trainer)")
        super().__init__(model, args, *a, **kw)
        if self.args.label_names is None:
            base_cls = type(model.get_base_model())
            params = inspect.signature(base_cls.forward).parameters
            self.label_names = [n for n in ("labels", "start_positions", "end_positions") if n in params]
            self.can_return_loss = "return_loss" in params or bool(self.label_names)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            params = inspect.signature(self.model.get_base_model().forward).parameters
            self._signature_columns = list(params) + ["label", "label_ids"] + list(self.label_names)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.accelerator.unwrap_model(self.model, keep_torch_compile=False).save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from .checkpoint import load_adapter

        model = self.accelerator.unwrap_model(model or self.model, keep_torch_compile=False)
        _, tensors = load_adapter(resume_from_checkpoint)
        model.load_adapter_state_dict(tensors)

    def _load_best_model(self):
        self._load_from_checkpoint(self.state.best_model_checkpoint)
