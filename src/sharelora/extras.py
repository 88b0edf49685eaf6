"""Optional features and the pip extras that install them: one table, one check.

``pip install sharelora`` is the method alone (config, plan, layer, model, checkpoint format,
PEFT export / import) on torch, transformers and safetensors. Every other feature comes with an
extra of pyproject.toml, and the modules that need one call ``require`` first, so a missing extra
stops them with one line that names it (``pip install 'sharelora[serve]'``) instead of an
ImportError from deep inside::

    require("serve", "the HTTP server (sharelora serve)")

``EXTRAS`` lists, per extra, the modules (import names) that its packages provide and that this
project imports; tests/test_packaging.py checks it against pyproject.toml.
"""

from __future__ import annotations

import importlib.util

EXTRAS: dict[str, tuple[str, ...]] = {
    # the CLI's training, evaluation, studies and plots (sharelora.training, .runs, .tasks, .bench)
    "train": ("accelerate", "matplotlib", "numpy", "scipy", "sklearn", "sacrebleu", "rouge_score", "tqdm"),
    "serve": ("fastapi", "uvicorn", "pydantic"),  # sharelora serve
    "gguf": ("gguf",),  # models published as GGUF files (transformers reads them with gguf)
    "quantize": ("bitsandbytes",),  # --quantize 4bit | 8bit, QLoRA bases
    "peft": ("peft",),  # PEFT baselines (--method peft-vera | peft-vblora, sharelora bench), Trainer recognition
    "datasets": ("datasets",),  # --dataset hub:owner/name
    "tensorboard": ("tensorboard",),  # --report-to tensorboard
    "wandb": ("wandb",),  # --report-to wandb
    "mlflow": ("mlflow",),  # --report-to mlflow (the extra adds SQLite support, MLflow's default store)
}


class MissingExtraError(ImportError):
    """A feature's optional packages are not installed; the message names the extra to install."""

    def __init__(self, extra: str, feature: str, missing: list[str]):
        self.extra, self.feature, self.missing = extra, feature, missing
        super().__init__(f"{feature} needs {', '.join(missing)}, not installed here: "
                         f"pip install 'sharelora[{extra}]'")


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (a cheap look-up: nothing is imported)."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; the extras are {', '.join(EXTRAS)}")
    return [m for m in EXTRAS[extra] if not _installed(m)]


def require(extra: str, feature: str) -> None:
    """Raise ``MissingExtraError`` unless every module of ``extra`` is installed."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(extra, feature, missing)


def extra_providing(module: str) -> str | None:
    """The extra whose packages provide ``module`` (or a submodule of it), None if no extra does."""
    top = module.split(".")[0]
    return next((extra for extra, modules in EXTRAS.items() if top in modules), None)


def as_missing_extra(error: ModuleNotFoundError, feature: str) -> MissingExtraError | None:
    """The ``MissingExtraError`` that ``error`` (a failed import) stands for; None if no extra provides it."""
    extra = extra_providing(error.name or "")
    return MissingExtraError(extra, feature, [error.name.split(".")[0]]) if extra else None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent that fails to import; a module whose __spec__ is None
        return False
