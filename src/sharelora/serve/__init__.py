"""``sharelora serve``: an OpenAI-compatible server that batches requests across adapters.

One file per concern (the layout of llama-cpp-python's server): ``settings`` (flags),
``types`` (request / response bodies), ``errors`` (OpenAI-style errors), ``guard`` (the body-size
bound and the API key, before any route), ``model`` (the base model and the loaded adapters),
``adapters`` (adapters on demand: which are resident, loading, LRU eviction), ``scheduler``
(continuous batching across adapters, no HTTP), ``batch_cache`` (the batch's KV cache), ``logprobs``
(token log-probabilities), ``completions`` (a request's choices from the scheduler's events),
``app`` (the routes), ``cli`` (the command). See docs/SERVING.md.

Names are imported on first use, so ``sharelora --help`` (which imports ``sharelora.cli.serve``) stays fast.
"""

import importlib

from ..extras import require

require("serve", "the HTTP server (sharelora serve)")

_HOMES = {
    "AdapterPool": "adapters", "TokenLogprob": "logprobs",
    "AdapterInfo": "model", "ServedModel": "model", "resolve_adapter_dir": "model",
    "Completion": "scheduler", "Event": "scheduler", "GenerationRequest": "scheduler", "QueueFull": "scheduler",
    "SamplingParams": "scheduler", "Scheduler": "scheduler", "Settings": "settings", "create_app": "app",
}
__all__ = sorted(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(name)
