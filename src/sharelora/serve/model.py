"""What the server has loaded: the base model, its tokenizer and the adapters, and how to reach them.

``ServedModel`` holds one copy of the base model and, once an adapter is loaded, the
``ShareLoraModel`` that injects every adapter into it; a request names an adapter (or the base
model) and its rows are routed with ``adapter_names``. It implements the scheduler's ``Engine``
(``forward``, ``decode``, ``eos_token_ids``) and the adapter verbs of the server:

* ``read_adapter(path, name)`` reads a directory (no model change, any thread): a sharelora
  directory (single or multi-adapter) or a standard PEFT LoRA directory, safetensors only. The
  weights file's header is checked first (structure, offsets, sizes; ``checkpoint.safetensors_header``)
  and its data must fit what an adapter of this base can hold (``max_adapter_bytes``), so a file
  that is not an adapter of this model is refused before it is read; any malformed file is a 400;
* ``add_adapter(source)`` injects it and loads its tensors, which validates it against the base
  model (targets, shapes); on any failure the model is left as it was. It changes the model, so
  the server runs it on the scheduler's thread, between two steps;
* ``remove_adapter(name)``; ``retire(name)`` first hides an adapter from new requests.

Task-shared tensors. Adapters of one ``task_group`` read one shared A; two directories saved by
different trainings may both say ``task_group="default"`` with different A's. ``add_adapter``
compares: an adapter whose shared tensors equal its group's joins the group (and shares the
down-projection of a batch); one whose tensors differ is served in a group of its own, so loading
it never changes another adapter's outputs.

``resolve_adapter_dir(root, path)`` is the gate for ``load_lora_adapter``: only directories under
``--adapter-root``, no ``..``, no symlink leading out, safetensors weights.
"""

from __future__ import annotations

import copy
import inspect
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..method import checkpoint
from ..method.config import ShareLoraConfig
from ..method.errors import ShareLoraError
from ..method.layers import bank_name
from ..method.model import ShareLoraModel
from ..method.modules_to_save import ModulesToSave
from ..method.plan import BASE_ADAPTER, check_adapter_name
from .batch_cache import unsupported_attention
from .errors import BadRequest, Forbidden, NotFound, log

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MAX_NAME_CHARS = 128  # adapter names are echoed in answers and logs: bounded and printable


def check_served_name(name: str, param: str = "lora_name") -> str:
    """``name`` if it can name a served adapter: an adapter name (``check_adapter_name``) of at most
    ``MAX_NAME_CHARS`` printable characters; else BadRequest (which never echoes a long name)."""
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not name.isprintable():
        shown = repr(name[:40]) + ("..." if isinstance(name, str) and len(name) > 40 else "")
        raise BadRequest(f"adapter name {shown} ({len(name) if isinstance(name, str) else '?'} characters) is not "
                         f"allowed: use at most {MAX_NAME_CHARS} printable characters", param=param)
    try:
        return check_adapter_name(name)
    except ShareLoraError as e:
        raise BadRequest(str(e), param=param) from None


def _shown(names: list[str], most: int = 20) -> str:
    return str(names[:most])[:-1] + (f", ... {len(names) - most} more]" if len(names) > most else "]")


@dataclass
class AdapterSource:
    """An adapter directory read from disk, ready to inject: ``configs`` by adapter name and the
    tensors (multi-adapter file keys when ``multi``, else one adapter's local keys)."""

    path: Path
    format: str  # "sharelora" | "sharelora-multi" | "peft"
    configs: dict[str, ShareLoraConfig]
    tensors: dict[str, torch.Tensor]
    file_bytes: int = 0

    @property
    def multi(self) -> bool:
        return self.format == "sharelora-multi"

    def renamed(self, name: str) -> AdapterSource:
        """This source's one adapter under the name ``name`` (a multi-adapter file's own keys follow; its task
        group's keys stay)."""
        (old,) = self.configs
        if old == name:
            return self
        tensors = self.tensors
        if self.multi:
            tensors = {(name + k[len(old):] if k.startswith(old + "/") else k): v for k, v in tensors.items()}
        return AdapterSource(self.path, self.format, {name: self.configs[old]}, tensors, self.file_bytes)


@dataclass
class AdapterInfo:
    """A loaded adapter, as ``/v1/models`` and the startup lines describe it."""

    name: str
    path: str
    format: str
    parameters: int
    bytes: int
    task_group: str | None
    created: int = field(default_factory=lambda: int(time.time()))
    retired: bool = False


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_adapter_dir(root: str | Path | None, path: str) -> Path:
    """The real directory ``path`` names under ``root``, or an error saying why it is refused."""
    if root is None:
        raise Forbidden("loading adapters while serving is off; start the server with --adapter-root DIR")
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise BadRequest("lora_path must be a directory under --adapter-root", param="lora_path")
    p = Path(path)
    if ".." in p.parts:
        raise Forbidden(f"lora_path {path!r} contains '..'; give a directory under --adapter-root", param="lora_path")
    real_root = Path(root).resolve(strict=True)
    real = (p if p.is_absolute() else real_root / p).resolve()
    if not real.is_relative_to(real_root):
        raise Forbidden(f"lora_path {path!r} is outside --adapter-root (or a symlink out of it)", param="lora_path")
    if not real.is_dir():
        raise BadRequest(f"lora_path {path!r} is not a directory under --adapter-root", param="lora_path")
    for name in (CONFIG, WEIGHTS):
        f = real / name
        if f.exists() and not f.resolve().is_relative_to(real_root):
            raise Forbidden(f"{path}/{name} is a symlink out of --adapter-root", param="lora_path")
    if not (real / WEIGHTS).is_file():
        others = sorted(x.name for x in real.iterdir())
        raise BadRequest(f"{path} has no {WEIGHTS} (it holds {others}); only safetensors adapters are loaded, "
                         "never pickles", param="lora_path")
    return real


class ServedModel:
    """The base model, its tokenizer and the loaded adapters (see the module docstring)."""

    def __init__(self, base_model: torch.nn.Module, tokenizer, name: str, context_length: int | None = None):
        why = unsupported_attention(base_model.config)
        if why is not None:
            raise ValueError(f"{name} {why}")
        self.base = base_model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.lora: ShareLoraModel | None = None
        self.adapters: dict[str, AdapterInfo] = {}
        self._tok_lock = threading.Lock()
        self._token_texts: dict[int, str] = {}
        params = inspect.signature(base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        cfg = base_model.config
        limits = [getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions")]
        limits = [int(x) for x in limits if isinstance(x, int) and x > 0]
        self.context_length = int(context_length) if context_length else (min(limits) if limits else 2048)
        gen = getattr(base_model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(cfg, "eos_token_id", None)
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else list(eos or []))
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or 0)
        # an adapter of this base holds at most as many numbers as the base itself (even a full
        # modules_to_save copy is a part of it), at most 4 bytes each
        self.max_adapter_bytes = 4 * sum(p.numel() for p in base_model.parameters())

    @classmethod
    def load(cls, name_or_path: str, cache_dir: str | None = None, device: str = "auto", dtype: str = "float32",
             context_length: int | None = None) -> ServedModel:
        """A causal LM by registry name (``smollm2``), local folder or hub id (``sharelora.sources``)."""
        from ..sources import load_model

        bundle = load_model(name_or_path, task="causal-lm", cache_dir=cache_dir, dtype=_dtype(dtype))
        if bundle.tokenizer is None:
            raise ValueError(f"{name_or_path} comes without a tokenizer; the server needs one")
        model = bundle.model.to(pick_device(device))
        return cls(model, bundle.tokenizer, str(name_or_path), context_length)

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    # --- names ------------------------------------------------------------------------------------
    def resolve(self, model: str) -> str:
        """The routing name of a request's ``model``: an adapter, or ``__base__`` for the base model."""
        if model == self.name:
            return BASE_ADAPTER
        info = self.adapters.get(model)
        if info is None or info.retired:
            shown = repr(model[:64]) + ("..." if len(model) > 64 else "")
            raise NotFound(f"the model {shown} does not exist; served: {_shown(self.served_names())}", param="model")
        return model

    def served_names(self) -> list[str]:
        return [self.name] + [n for n, a in self.adapters.items() if not a.retired]

    # --- text -------------------------------------------------------------------------------------
    def encode(self, text: str, special: bool = True) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            special: bool = False) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest(f"{self.name} has no chat template; use /v1/completions with a prompt")
        with self._tok_lock:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        return self.encode(text, special=special)  # by default the template writes the special tokens itself

    def token_text(self, token_id: int) -> str:
        """One token's text as log-probabilities show it (special tokens by their text)."""
        text = self._token_texts.get(token_id)
        if text is None:
            with self._tok_lock:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_texts[token_id] = text
        return text

    def decode(self, token_ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # --- the scheduler's engine ---------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, position_ids, cache, adapter_names, all_positions: bool = False):
        """(B, T) -> ((B, vocab) float32 logits of the last position, the cache); ``all_positions``:
        (B, T, vocab) logits of every position (scoring a prompt)."""
        device = self.device
        kwargs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                  "position_ids": position_ids.to(device), "use_cache": True, self._cache_kw: cache}
        if self._logits_to_keep and not all_positions:
            kwargs["logits_to_keep"] = 1  # as generate() does: the head runs on the last position only
        if self.lora is None:
            out = self.base(**kwargs)
        else:
            out = self.lora(**kwargs, adapter_names=list(adapter_names))
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return (out.logits.float() if all_positions else out.logits[:, -1, :].float()), new_cache

    # --- adapters -----------------------------------------------------------------------------------
    def read_adapter(self, path: str | Path, name: str | None = None) -> AdapterSource:
        """Read an adapter directory; ``name``: the adapter's name (a multi-adapter directory: which
        of its adapters; None loads all of them under their own names)."""
        d = Path(path)
        if not (d / WEIGHTS).is_file():
            raise BadRequest(f"{d} is not an adapter directory: it has no {WEIGHTS}")
        if name is not None:
            check_served_name(name)
        try:
            size = self._check_weights_header(d / WEIGHTS)
            if checkpoint.is_multi_adapter(d):
                configs, tensors, _ = checkpoint.load_adapters(d, [name] if name else None)
                return AdapterSource(d, "sharelora-multi", configs, tensors, size)
            if name is None:
                raise BadRequest(f"{d} holds one adapter; give it a name (NAME=DIR)")
            raw = checkpoint.read_json(d / CONFIG) if (d / CONFIG).is_file() else {}
            if raw.get("peft_type") is not None:
                from ..method.peft_io import read_peft

                config, tensors = read_peft(d)
                return AdapterSource(d, "peft", {name: config}, tensors, size)
            config, tensors = checkpoint.load_adapter(d)
            return AdapterSource(d, "sharelora", {name: config}, tensors, size)
        except (ShareLoraError, ValueError, KeyError, TypeError) as e:  # a malformed file is the sender's error
            if not isinstance(e, ShareLoraError):
                log.warning("reading the adapter in %s failed", d, exc_info=e)
            raise BadRequest(f"cannot read the adapter in {d}: {e}") from None

    def _check_weights_header(self, weights: Path) -> int:
        """The data size of ``weights`` from its checked header; refuse more than an adapter of this base holds."""
        header, start, size = checkpoint.safetensors_header(weights)
        meta = header.get("__metadata__") or {}
        adapters = 1
        if checkpoint.MANIFEST_KEY in meta:  # a multi-adapter file: each adapter may hold up to the bound
            try:
                adapters = max(1, len(json.loads(meta[checkpoint.MANIFEST_KEY]).get("adapters") or {}))
            except (ValueError, AttributeError):
                raise ShareLoraError(f"{weights}: the adapter manifest in its metadata is not a JSON object") from None
        limit = adapters * self.max_adapter_bytes
        if size - start > limit:
            raise ShareLoraError(
                f"{weights} holds {size - start:,} bytes of tensors, more than {adapters} adapter(s) of {self.name} "
                f"can hold ({limit:,} bytes: each at most the base model's {self.max_adapter_bytes // 4:,} "
                "parameters at 4 bytes); it is not an adapter of this model")
        return size

    def add_adapter(self, source: AdapterSource) -> list[AdapterInfo]:
        """Inject and load ``source`` (validated against the base model); all or nothing."""
        names = list(source.configs)
        for n in names:
            check_served_name(n)
            if n in self.adapters or n == self.name:
                raise BadRequest(f"an adapter named {n!r} is loaded already; unload it first or choose another name",
                                 param="lora_name")
        configs = {n: copy.deepcopy(c) for n, c in source.configs.items()}
        tensors = dict(source.tensors)
        added: list[str] = []
        try:
            if source.multi:
                self._own_groups_for_differing(configs, tensors)
                for n in names:
                    self._inject(n, configs[n])
                    added.append(n)
                self.lora.load_multi_adapter_state_dict(tensors, names)
            else:
                (n,) = names
                self._inject(n, configs[n])
                added.append(n)
                if self._shared_differs(n, tensors):
                    self._drop(n)
                    added.pop()
                    configs[n].task_group = self._fresh_group(configs[n].task_group, n)
                    self._inject(n, configs[n])
                    added.append(n)
                self.lora.load_adapter_state_dict(tensors, n)
        except Exception as e:
            for n in reversed(added):
                self._drop(n)
            if isinstance(e, (ShareLoraError, ValueError, KeyError)):
                raise BadRequest(f"the adapter in {source.path} does not fit {self.name}: {e}") from None
            raise
        self.lora.eval()
        infos = []
        for n in names:
            state = self.lora.adapter_state_dict(n)
            cfg = configs[n]
            info = AdapterInfo(n, str(source.path), source.format, sum(t.numel() for t in state.values()),
                               sum(t.numel() * t.element_size() for t in state.values()),
                               cfg.task_group if cfg.task_share != "none" else None)
            self.adapters[n] = info
            infos.append(info)
        return infos

    def adapter_tensor_bytes(self, name: str) -> tuple[int, dict[str, int]]:
        """(bytes of ``name``'s own tensors and modules_to_save copies, {task-shared tensor key: bytes})."""
        lora = self.lora
        plan = lora.plans[name]

        def size(key: str) -> int:
            p = lora.sharelora_bank[bank_name(key)]
            return p.numel() * p.element_size()

        own = sum(size(k) for k in plan.own_tensors())
        for wrapper in lora.base_model.modules():
            if isinstance(wrapper, ModulesToSave) and name in wrapper.modules_to_save:
                own += sum(p.numel() * p.element_size() for p in wrapper.modules_to_save[name].parameters())
        return own, {k: size(k) for k in plan.shared_tensors()}

    def retire(self, name: str) -> AdapterInfo:
        """Hide ``name`` from new requests (the ones already submitted finish)."""
        info = self.adapters.get(name)
        if info is None or info.retired:
            raise NotFound(f"no adapter named {name[:64]!r} is loaded; loaded: {_shown(self.served_names()[1:])}",
                           param="lora_name", code="adapter_not_found")
        info.retired = True
        return info

    def remove_adapter(self, name: str) -> None:
        """Remove an adapter (and the shared tensors no other adapter reads) from the model."""
        if name not in self.adapters:
            raise NotFound(f"no adapter named {name[:64]!r} is loaded", param="lora_name", code="adapter_not_found")
        self._drop(name)
        del self.adapters[name]

    # --- internals ----------------------------------------------------------------------------------
    def _inject(self, name: str, config: ShareLoraConfig) -> None:
        if self.lora is None:
            self.lora = ShareLoraModel(self.base, config, name)
        else:
            self.lora.add_adapter(name, config)

    def _drop(self, name: str) -> None:
        if self.lora is None or name not in self.lora.adapter_names:
            return
        if self.lora.adapter_names != [name]:
            self.lora.delete_adapter(name)
            return
        # The last adapter: give the base model its own modules back (unload() would keep the active
        # adapter's modules_to_save copies in their place).
        for module in self.lora.base_model.modules():
            if isinstance(module, ModulesToSave):
                module.set_active(())
        self.lora.unload()
        self.lora = None

    def _groups(self) -> dict[tuple[str, str], str]:
        """{(task_group, task_share): an adapter of that group} of the loaded adapters."""
        out: dict[tuple[str, str], str] = {}
        if self.lora is not None:
            for n, cfg in self.lora.sharelora_configs.items():
                if cfg.task_share != "none":
                    out.setdefault((cfg.task_group, cfg.task_share), n)
        return out

    def _fresh_group(self, group: str, name: str) -> str:
        taken = {g for g, _ in self._groups()}
        new, i = f"{group}-{name}", 2
        while new in taken:
            new, i = f"{group}-{name}-{i}", i + 1
        return new

    def _group_tensors(self, member: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.lora.multi_adapter_state_dict([member]).items() if k.startswith("@")}

    def _shared_differs(self, name: str, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether ``name`` (just injected) reused a group's tensors that its own file disagrees with."""
        cfg = self.lora.sharelora_configs[name]
        member = self._groups().get((cfg.task_group, cfg.task_share))
        if cfg.task_share == "none" or member is None or member == name:
            return False
        for key, value in self._group_tensors(name).items():
            local = key.split("/", 1)[1]
            if local not in tensors or not torch.equal(tensors[local].to(value), value):
                return True
        return False

    def _own_groups_for_differing(self, configs: dict[str, ShareLoraConfig], tensors: dict[str, torch.Tensor]) -> None:
        """Rename the task groups of a multi-adapter file whose shared tensors differ from a loaded group's."""
        groups = self._groups()
        for (group, share), member in groups.items():
            prefix = f"@{group}/"
            incoming = {k: v for k, v in tensors.items() if k.startswith(prefix)}
            users = [n for n, c in configs.items() if c.task_group == group and c.task_share != "none"]
            if not incoming or not users:
                continue
            loaded = self._group_tensors(member)
            same = all(c.task_share == share for n, c in configs.items() if n in users) and \
                set(incoming) == set(loaded) and all(torch.equal(incoming[k].to(loaded[k]), loaded[k]) for k in incoming)
            if same:
                continue
            new = self._fresh_group(group, users[0])
            for n in users:
                configs[n].task_group = new
            for k in incoming:
                tensors[f"@{new}/{k[len(prefix):]}"] = tensors.pop(k)
