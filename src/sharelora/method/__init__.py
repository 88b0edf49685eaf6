"""The ShareLoRA method: config, sharing plan, layer, model, checkpoint format, PEFT interop.

Nothing here imports the applications (sources, tasks, training, bench, cli).
"""

from .compress import compress_adapters
from .config import SCOPES, SHARE_MODES, TASK_CORES, TASK_SHARE_MODES, ShareLoraConfig
from .errors import ShareLoraError
from .layers import ShareLoraLayer
from .model import ShareLoraModel, get_sharelora_model
from .modules_to_save import ModulesToSave
from .plan import BASE_ADAPTER, DEFAULT_ADAPTER, SharingPlan, Target, TensorSpec, build_plan

__all__ = [
    "BASE_ADAPTER", "DEFAULT_ADAPTER", "ModulesToSave", "SCOPES", "SHARE_MODES", "TASK_CORES", "TASK_SHARE_MODES",
    "ShareLoraConfig", "ShareLoraError", "ShareLoraLayer", "ShareLoraModel", "SharingPlan", "Target", "TensorSpec",
    "build_plan", "compress_adapters", "get_sharelora_model", "ShareLoraTrainer",
]


def __getattr__(name):
    # transformers.Trainer is heavy to import; load the integration only when asked for.
    if name == "ShareLoraTrainer":
        from .hf import ShareLoraTrainer

        return ShareLoraTrainer
    raise AttributeError(name)
