"""sharelora: LoRA whose low-rank matrices are shared across layers (ShareLoRA, arXiv 2406.10785).

``pip install sharelora`` gives this method (torch, transformers, safetensors); the CLI's training,
the server and the rest come with extras (``sharelora[train]``, ``[serve]``, ``[all]``: extras.py).

    from sharelora import ShareLoraConfig, get_sharelora_model
    model = get_sharelora_model(base_model, ShareLoraConfig(rank=8, alpha=16, share="A",
                                                            target_modules=["query", "value"]))
"""

from importlib import metadata as _metadata

from .method import (
    BASE_ADAPTER,
    SCOPES,
    SHARE_MODES,
    TASK_SHARE_MODES,
    ShareLoraConfig,
    ShareLoraError,
    ShareLoraLayer,
    ShareLoraModel,
    SharingPlan,
    build_plan,
    compress_adapters,
    get_sharelora_model,
)

try:  # the one version: pyproject.toml's, as installed
    __version__ = _metadata.version("sharelora")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BASE_ADAPTER", "SCOPES", "SHARE_MODES", "TASK_SHARE_MODES", "ShareLoraConfig", "ShareLoraError",
    "ShareLoraLayer", "ShareLoraModel", "SharingPlan", "build_plan", "compress_adapters", "get_sharelora_model",
    "ShareLoraTrainer", "evaluate_run", "__version__",
]


def __getattr__(name):
    if name == "ShareLoraTrainer":
        from .method.hf import ShareLoraTrainer

        return ShareLoraTrainer
    if name == "evaluate_run":  # what `sharelora eval RUN` does (runs/evaluate.py)
        from .runs.evaluate import evaluate_run

        return evaluate_run
    raise AttributeError(name)
