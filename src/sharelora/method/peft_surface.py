"""What transformers' ``Trainer`` and TRL see: a ShareLoraModel they treat as an adapter model.

Both recognise an adapter model only by ``isinstance(model, peft.PeftModel)`` (transformers'
``_is_peft_model``, accelerate's and TRL's ``is_peft_model``). A recognised model is checkpointed
as its adapter (``save_pretrained``), resumed and reloaded as best model with
``load_adapter(dir, name, is_trainable=...)``, has its dataset columns and label names read from
``get_base_model().forward``, and may sit on a quantized base. An unrecognised one is
checkpointed as its whole state dict, frozen base included, and cannot resume from an adapter.

So a ShareLoraModel around a transformers model is created as a ``ShareLoraPeftModel``, a
subclass of both ShareLoraModel and ``peft.PeftModel`` (``ShareLoraModel.__new__`` chooses the
class; without peft installed it stays a plain ShareLoraModel). One exception: ``import peft``
imports bitsandbytes whenever it is installed (slow, and on CPU it prints kernel warnings), so on
a float base the class is chosen without importing peft: it is the PeftModel one if peft is
imported already (importing ``transformers.Trainer`` or TRL does that, as does ``import peft``),
or if bitsandbytes is not installed or already imported (a quantized base), i.e. whenever
importing peft costs nothing the caller did not ask for. ``ShareLoraTrainer`` needs neither.
It is a PeftModel in name only:
``PeftModel.__init__`` never runs (no PEFT tuner is built), ShareLoraModel comes first in the
MRO and its own methods already speak PEFT's interface (``save_pretrained``, ``from_pretrained``,
``load_adapter``, ``add_adapter`` / ``set_adapter`` / ``delete_adapter``, ``active_adapters``,
``peft_config``, ``disable_adapter``, ``get_base_model``, ``forward``, ``generate``,
``print_trainable_parameters``), the few properties PEFT adds are answered below, and every other
member PeftModel defines (its tuner and prompt-learning internals) raises a ``ShareLoraError``
that says so, instead of running PEFT code on a model it does not know.
"""

from __future__ import annotations

import importlib.util
import sys

from torch import nn

from .errors import ShareLoraError

_CLASSES: dict[type, type] = {}


def trainer_facing_class(cls: type, base_model: nn.Module) -> type:
    """The class a ``cls`` (ShareLoraModel or a subclass) instance around ``base_model`` gets."""
    if getattr(cls, "_is_peft_surface", False):
        return cls
    modeling = sys.modules.get("transformers.modeling_utils")  # not loaded: base_model cannot be one of its models
    if modeling is None or not isinstance(base_model, modeling.PreTrainedModel):
        return cls
    if not _peft_import_is_free():
        return cls
    try:
        return peft_facing(cls)
    except ImportError:  # peft is optional for the method
        return cls


def _peft_import_is_free() -> bool:
    """Whether ``import peft`` now imports nothing the caller has not: peft itself, or bitsandbytes
    (which peft imports whenever it is installed) is imported already or not installed."""
    if "peft" in sys.modules or "bitsandbytes" in sys.modules:
        return True
    return importlib.util.find_spec("bitsandbytes") is None


def peft_facing(cls: type) -> type:
    """``cls`` made a ``peft.PeftModel`` too (cached; ShareLoraModel's is ``ShareLoraPeftModel``)."""
    if cls in _CLASSES:
        return _CLASSES[cls]
    from peft import PeftModel

    namespace = dict(_SURFACE)
    # The class lives, by name, in the module of the class it extends (model.py makes ShareLoraPeftModel
    # on first lookup), so pickle finds it there.
    namespace.update({"__module__": cls.__module__, "__doc__": cls.__doc__, "_is_peft_surface": True})
    own = {name for klass in cls.__mro__ if not issubclass(PeftModel, klass) for name in vars(klass)}
    for name, value in vars(PeftModel).items():
        if name.startswith("__") or name in own or name in namespace:
            continue
        namespace[name] = _not_a_tuner(name, isinstance(value, property))
    first = cls.__name__ == "ShareLoraModel" and cls.__module__ == "sharelora.method.model"
    name = "ShareLoraPeftModel" if first else f"{cls.__name__}PeftModel"
    made = type(name, (cls, PeftModel), namespace)
    made.__qualname__ = name
    _CLASSES[cls] = made
    return made


class NotATunerError(ShareLoraError, AttributeError):
    """A member of peft.PeftModel's own machinery was used on a ShareLoraModel.

    An AttributeError too, so that ``hasattr(model, name)`` (how trainers probe for features) is
    False for PEFT's properties instead of raising.
    """


def _not_a_tuner(name: str, is_property: bool = False):
    def stub(self, *args, **kwargs):
        raise NotATunerError(
            f"{name} belongs to peft.PeftModel's own machinery (its tuners and prompt learning), which a "
            "ShareLoraModel does not have: it is a PeftModel only so that transformers' Trainer and TRL treat it as "
            "an adapter model. Use ShareLoraModel's own API (docs/ARCHITECTURE.md)"
        )

    stub.__name__ = name
    return property(stub) if is_property else stub


def _get_name(self) -> str:
    return "ShareLoraModel"  # the repr's name, whichever trainer-facing class the instance has


def _has_active_enabled_adapter(self) -> bool:
    return bool(self.active_adapters) and not all(layer.disabled for _, layer in self.sharelora_layers())


def _base_model_torch_dtype(self):
    return getattr(self.base_model, "dtype", None)


def _modules_to_save(self) -> set[str] | None:
    names = {n for a in self.adapter_names for n in self.saved_module_names(a)}
    return names or None


def get_nb_trainable_parameters(self) -> tuple[int, int]:
    """(trainable parameters, all parameters), each shared tensor once."""
    r = self.parameter_report()
    return r["trainable_parameters"], r["all_parameters"]


def create_or_update_model_card(self, output_dir: str) -> None:
    """Nothing: the trainer writes the model card itself (PEFT's adds its own fields to it)."""


_SURFACE = {
    "_get_name": _get_name,
    "has_active_enabled_adapter": property(_has_active_enabled_adapter),
    "active_peft_config": property(lambda self: self.sharelora_config),
    "base_model_torch_dtype": property(_base_model_torch_dtype),
    "modules_to_save": property(_modules_to_save),
    "get_nb_trainable_parameters": get_nb_trainable_parameters,
    "create_or_update_model_card": create_or_update_model_card,
    "supports_lora_conversion": lambda self, adapter_name="default": False,
    "_get_peft_specific_model_tags": lambda self: [],
}
