"""Convert a GGUF LLaMA-family checkpoint into a plain safetensors Hugging Face folder.

transformers can load a GGUF file (``from_pretrained(dir, gguf_file=f)``; quantised tensors are
de-quantised to float), but a model loaded that way refuses ``save_pretrained`` and each load
de-quantises again (~15 s for SmolLM2-135M). Converting once gives a folder that reloads in
under a second with identical logits: build the same architecture from a config without
``quantization_config``, load the de-quantised state dict into it, save it as safetensors.

The saved ``*.safetensors`` files record the sha256 of their tensor data in their metadata
(:func:`sharelora.method.checkpoint.seal_safetensors`), so a later load can tell a cached
conversion whose bytes changed on disk from a good one (see :mod:`.models`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..method.checkpoint import seal_safetensors
from .errors import SourceError
from .cache import sha256_file

CONVERSION_INFO = "sharelora_gguf.json"


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
                 tokenizer: bool = True) -> Path:
    """Write ``out_dir`` = ``config.json`` + ``model.safetensors`` (+ tokenizer) from ``gguf_file``.

    The folder is written under a temporary name next to ``out_dir`` and renamed into place,
    so ``out_dir`` is either absent or complete.

    Args:
        gguf_file: a ``.gguf`` file of an architecture transformers reads from GGUF (llama,
            mistral, qwen2, ...).
        out_dir: the folder to create; it must not exist unless ``overwrite``.
        overwrite: replace an existing ``out_dir``.
        tokenizer: also convert the tokenizer stored in the GGUF file; if the file has none,
            the folder is written without one and ``sharelora_gguf.json`` says so.

    Returns:
        ``out_dir``, loadable with ``AutoModelForCausalLM.from_pretrained(out_dir)``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..extras import require

    require("gguf", f"reading the GGUF model {Path(gguf_file).name}")
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise SourceError(f"GGUF file {gguf_file} does not exist")
    if out_dir.exists() and not overwrite:
        raise SourceError(f"{out_dir} already exists; pass overwrite=True to replace it, or load it directly")
    t0 = time.perf_counter()
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for unreadable GGUF
        raise SourceError(f"transformers could not read {gguf_file} as a GGUF model ({type(e).__name__}: {e}); "
                          f"is `gguf` installed (pip install gguf) and is the architecture supported?") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = quantised.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise SourceError(f"{gguf_file}: the de-quantised weights do not fit {type(model).__name__} "
                          f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    del quantised, state

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for weights in sorted(tmp.glob("*.safetensors")):  # inside tmp: the folder rename below publishes them
            seal_safetensors(weights)
        tok_note = None
        if tokenizer:
            try:
                AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
            except Exception as e:  # noqa: BLE001 - a GGUF file without tokenizer metadata
                tok_note = f"no tokenizer converted ({type(e).__name__}: {e})"
        info = {"gguf_file": str(gguf_file), "gguf_sha256": sha256_file(gguf_file),
                "architecture": type(model).__name__, "tokenizer": tokenizer and tok_note is None,
                "note": tok_note, "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / CONVERSION_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
        if out_dir.exists():
            trash = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}-{time.monotonic_ns()}")
            os.rename(out_dir, trash)
            os.rename(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
