"""ShareLoraConfig: what to adapt and what to share, as data that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ShareLoraError

CONFIG_NAME = "adapter_config.json"
FORMAT_VERSION = 1

SHARE_MODES = ("none", "A", "B", "AB")
SCOPES = ("layers", "qkv")
DROPOUT_MASKS = ("input", "module")
TASK_SHARE_MODES = ("none", "A", "B", "AB")
TASK_CORES = ("none", "matrix", "diagonal")
BASIS_INITS = ("lora", "random")


def _default_fused() -> dict[str, list[str]]:
    # GPT-2 computes q, k and v with one Conv1D, c_attn, whose output is [q | k | v].
    return {"c_attn": ["q", "k", "v"]}


@dataclass
class ShareLoraConfig:
    """Configuration of a ShareLoRA adapter.

    Each adapted linear map W0 (d_out x d_in) of layer l and module type m computes

        h = W0 x + (alpha / rank) * B_{l,m} A_{l,m} dropout(x)

    and ``share`` says which of A and B are one tensor for every layer instead of one per layer:
    ``"none"`` is plain LoRA, ``"A"`` ShareA, ``"B"`` ShareB, ``"AB"`` ShareAB.

    Args:
        rank: r, the inner dimension of B A.
        alpha: the update is scaled by alpha / rank.
        dropout: dropout probability applied to x on the adapter path only.
        dropout_mask: "input" (default): adapted modules of one block that read the same input
            (q, k, v of an attention block; gate and up of a gated MLP) draw one dropout mask and
            compute their down-projections ``dropout(x) [A_q; A_v]^T`` in one product, so x is
            read once for all of them. "module": every module draws its own mask, as PEFT does
            (slower); products are then shared only when no dropout is active. Each module sees
            dropout with probability ``dropout`` either way; without dropout (p = 0, or eval)
            both give identical outputs and gradients.
        share: which matrices are shared: "none", "A", "B" or "AB".
        scope: "layers" shares per module type across layers (the paper: all queries share one
            A, all values another); "qkv" shares one matrix across the query/key/value
            projections of all layers (only where shapes agree).
        target_modules: module names (a name matches a module whose path ends with it, e.g.
            "query"), a regular expression string (full match on the module path), or
            "all-linear". A fused projection's slice is named "<module>.<slice>", e.g. "c_attn.q".
        modules_to_save: modules trained in full and saved with the adapter (classifier heads).
        layers_to_transform: only adapt these layer indices (None: all layers).
        share_block_size: share only within blocks of this many consecutive layers (None: all).
        fused_modules: fused projections and the names of their equal output slices.
        init_lora_weights: True for LoRA's init (A Kaiming-uniform a=sqrt(5), B zeros), so the
            adapted model equals the base model at step 0. False for random B (tests only).
        adapter_dtype: dtype of the adapter tensors; None keeps float32.
        task_share: which matrix adapters of one ``task_group`` in one model share across tasks:
            "none" (default: each adapter owns its tensors, as in PEFT), "A" or "B". Combined with
            ``share`` (across layers), ShareA + task_share "A" keeps one A per module type for all
            layers and all tasks, so each extra task adds only its B's (SPEC.md's counts).
            "AB" shares both: every adapter of the group reads the same A and B and owns only a
            core per target (``task_core``, which "AB" needs).
        task_group: adapters with the same group and ``task_share`` read the same shared tensors.
        task_core: the adapter's own part when A and B are shared by the tasks (``task_share="AB"``):
            "matrix", an r x r matrix C per target, so ``h = W0 x + (alpha / r) B C A dropout(x)``;
            or "diagonal", an r-vector c per target (``B diag(c) A``). "none" (default) for every
            other ``task_share``. Every adapter starts exactly at the base model (``basis_init``).
        basis_init: how a task group's basis and cores start (task cores only). "lora" (default):
            the basis as LoRA's, A Kaiming-uniform and B = 0, and the core of each adapter that
            trains the untrained basis the identity (ones for diagonal cores): the adapter whose
            ``add_adapter`` creates the basis, and those ``ShareLoraModel.init_cores(names,
            trains_basis=True)`` names (the first k tasks of a joint stage). Such an adapter is then
            exactly a ShareLoRA adapter B A (B C A with C = I) and trains like one; B = 0 makes it
            the base model at start. Every other adapter's core starts at zero, so on a trained
            basis it starts at the base model too and gets the gradient s B^T g (A x)^T. "random":
            B Kaiming-uniform like A (as VeRA's frozen A and B) and every core zero: the update
            B C A grows as a product of three trained factors (slow at a LoRA's learning rate,
            unstable at higher ones; docs/RESULTS_MULTITASK.md).
        grow_basis: g >= 0, task cores only: the adapter adds g new directions to its group's basis
            for each of the group's A's (g more rows, g x d_in) and B's (g more columns, d_out x g),
            stored with the group (later adapters read them) but trained only by this adapter
            (LoRA's start: A random, B = 0). Its core covers them: (r + G) x (r + G), G the
            directions it reads. Earlier adapters do not read them, so their outputs stay bit for
            bit what they were. Its own block of the core starts at the identity (with B = 0, so
            the adapter still computes the base model), the rest of it at zero.
        basis_growth: the earlier adapters' added directions this adapter reads, in order, as
            [[adapter name, g], ...]. None (default): ``add_adapter`` fills in every block its group
            has then (saved when not empty; loading adds adapters in their saved order, so an
            adapter saved without blocks again finds none).
        heads: K, the number of B heads (HydraLoRA). 1 is plain (Share)LoRA; K > 1 needs ``router``.
        router: mix the K B heads per token with a softmax router ``w(x) = softmax(R x)``, R:
            (K, d_in) per target, so ``h = W0 x + scaling * sum_k w_k(x) B_k A dropout(x)``. The
            update depends on the input, so such an adapter cannot be merged or exported to PEFT.
        router_top_k: keep only the k largest router weights per token (renormalised); None: all.

    PEFT's names work too: ``ShareLoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, ...)`` is the same
    config as ``rank=8, alpha=16, dropout=0.1``, ``cfg.r`` / ``cfg.lora_alpha`` / ``cfg.lora_dropout``
    read and set them, and :meth:`from_peft` builds one from a PEFT ``LoraConfig``.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    dropout_mask: str = "input"
    share: str = "A"
    scope: str = "layers"
    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])
    modules_to_save: list[str] = field(default_factory=list)
    layers_to_transform: list[int] | None = None
    share_block_size: int | None = None
    fused_modules: dict[str, list[str]] = field(default_factory=_default_fused)
    init_lora_weights: bool = True
    adapter_dtype: str | None = None
    base_model_name_or_path: str | None = None
    task_share: str = "none"
    task_group: str = "default"
    task_core: str = "none"
    basis_init: str = "lora"
    grow_basis: int = 0
    basis_growth: list | None = None
    heads: int = 1
    router: bool = False
    router_top_k: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.share, str) and self.share.lower() in ("none", "lora", ""):
            self.share = "none"
        elif isinstance(self.share, str) and self.share.upper() in ("A", "B", "AB", "BA"):
            self.share = "AB" if self.share.upper() in ("AB", "BA") else self.share.upper()
        if isinstance(self.task_share, str) and self.task_share.lower() in ("none", ""):
            self.task_share = "none"
        elif isinstance(self.task_share, str) and self.task_share.upper() in ("A", "B", "AB", "BA"):
            self.task_share = "AB" if self.task_share.upper() in ("AB", "BA") else self.task_share.upper()
        if isinstance(self.task_core, str) and self.task_core.lower() in ("none", "", "matrix", "diagonal"):
            self.task_core = self.task_core.lower() or "none"
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ShareLoraError(f"rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ShareLoraError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ShareLoraError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.dropout_mask not in DROPOUT_MASKS:
            raise ShareLoraError(f"dropout_mask must be one of {DROPOUT_MASKS}, got {self.dropout_mask!r}")
        if self.share not in SHARE_MODES:
            raise ShareLoraError(f"share must be one of {SHARE_MODES}, got {self.share!r}")
        if self.scope not in SCOPES:
            raise ShareLoraError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if not self.target_modules:
            raise ShareLoraError("target_modules is empty; name the modules to adapt, e.g. ['query', 'value']")
        if self.share_block_size is not None and (
            not isinstance(self.share_block_size, int) or self.share_block_size < 1
        ):
            raise ShareLoraError(f"share_block_size must be a positive integer or None, got {self.share_block_size!r}")
        if self.adapter_dtype not in (None, "float32", "bfloat16", "float16", "float64"):
            raise ShareLoraError(
                f"adapter_dtype must be None, 'float32', 'bfloat16', 'float16' or 'float64', got {self.adapter_dtype!r}"
            )
        if self.task_share not in TASK_SHARE_MODES:
            raise ShareLoraError(f"task_share must be one of {TASK_SHARE_MODES}, got {self.task_share!r}")
        if self.task_core not in TASK_CORES:
            raise ShareLoraError(f"task_core must be one of {TASK_CORES}, got {self.task_core!r}")
        if self.task_share == "AB" and self.task_core == "none":
            raise ShareLoraError("task_share='AB' gives every task the same A and B, so the tasks need a core of "
                                 "their own: set task_core='matrix' (r x r per target) or 'diagonal' (r per target)")
        if self.task_core != "none" and self.task_share != "AB":
            raise ShareLoraError(f"task_core={self.task_core!r} is the adapter's own part between a task-shared A and "
                                 f"B; it needs task_share='AB' (got task_share={self.task_share!r})")
        if self.basis_init not in BASIS_INITS:
            raise ShareLoraError(f"basis_init must be one of {BASIS_INITS}, got {self.basis_init!r}")
        if not isinstance(self.grow_basis, int) or isinstance(self.grow_basis, bool) or self.grow_basis < 0:
            raise ShareLoraError(f"grow_basis must be an integer >= 0 (new basis directions), got {self.grow_basis!r}")
        if (self.grow_basis or self.basis_growth) and self.task_core == "none":
            raise ShareLoraError("grow_basis / basis_growth add directions to a task group's shared A and B, which "
                                 "only task cores read: set task_share='AB' and task_core='matrix' or 'diagonal'")
        if self.basis_growth is not None:
            if not isinstance(self.basis_growth, list) or not all(
                    isinstance(b, (list, tuple)) and len(b) == 2 and isinstance(b[0], str) and isinstance(b[1], int)
                    and b[1] > 0 for b in self.basis_growth):
                raise ShareLoraError(f"basis_growth must be a list of [adapter name, directions > 0] pairs, got "
                                     f"{self.basis_growth!r}")
            self.basis_growth = [[str(n), int(g)] for n, g in self.basis_growth]
        if self.task_core != "none" and self.heads > 1:
            raise ShareLoraError("task_core and router heads (HydraLoRA) do not combine; use heads=1 with task_core")
        if not isinstance(self.task_group, str) or not self.task_group or "/" in self.task_group:
            raise ShareLoraError(f"task_group must be a non-empty name without '/', got {self.task_group!r}")
        if not isinstance(self.heads, int) or self.heads < 1:
            raise ShareLoraError(f"heads must be a positive integer, got {self.heads!r}")
        if self.heads > 1 and not self.router:
            raise ShareLoraError(f"heads={self.heads} needs router=True to mix the heads (HydraLoRA); "
                                 "use heads=1 for a single B")
        if self.router and self.heads < 2:
            raise ShareLoraError("router=True mixes several B heads; set heads to 2 or more")
        if self.router_top_k is not None and (
            not self.router or not isinstance(self.router_top_k, int) or not 1 <= self.router_top_k <= self.heads
        ):
            raise ShareLoraError(f"router_top_k must be None or an integer in [1, heads={self.heads}] with "
                                 f"router=True, got {self.router_top_k!r}")

    # PEFT's names for rank / alpha / dropout (PEFT_NAMES), as attributes
    r = property(lambda self: self.rank, lambda self, v: setattr(self, "rank", v), doc="PEFT's name of ``rank``")
    lora_alpha = property(lambda self: self.alpha, lambda self, v: setattr(self, "alpha", v),
                          doc="PEFT's name of ``alpha``")
    lora_dropout = property(lambda self: self.dropout, lambda self, v: setattr(self, "dropout", v),
                            doc="PEFT's name of ``dropout``")

    @classmethod
    def from_peft(cls, peft_config: Any, **overrides: Any) -> ShareLoraConfig:
        """A ShareLoraConfig with a PEFT ``LoraConfig``'s rank, scaling, dropout and targets.

        ``peft_config`` is a ``peft.LoraConfig`` or its ``adapter_config.json`` as a dict (peft need not
        be installed); ``overrides`` set the ShareLoRA fields, e.g. ``share="A"``. r, lora_alpha,
        lora_dropout, target_modules, modules_to_save, layers_to_transform, base_model_name_or_path
        and init_lora_weights (True / False) carry over; ``use_rslora`` scales by lora_alpha / sqrt(r),
        so alpha becomes lora_alpha * sqrt(r) (the same update). What has no ShareLoRA equivalent
        (DoRA, per-module rank_pattern / alpha_pattern, trained biases, other initialisations) is
        refused by name rather than dropped.
        """
        get = peft_config.get if isinstance(peft_config, dict) else (lambda k, d=None: getattr(peft_config, k, d))
        kind = str(get("peft_type", "LORA") or "LORA")
        kind = getattr(get("peft_type"), "value", kind)
        if str(kind).upper() != "LORA":
            raise ShareLoraError(f"from_peft reads a LoRA config; got peft_type {kind!r}")
        refused = [k for k in ("use_dora", "rank_pattern", "alpha_pattern") if get(k)]
        if get("bias", "none") not in (None, "none"):
            refused.append(f"bias={get('bias')!r}")
        init = get("init_lora_weights", True)
        if not isinstance(init, bool):
            refused.append(f"init_lora_weights={init!r}")
        if refused:
            raise ShareLoraError(f"the PEFT config sets {', '.join(refused)}, which ShareLoRA has no equivalent of; "
                                 "unset them (use_dora=False, no rank_pattern / alpha_pattern, bias='none', "
                                 "init_lora_weights=True) or train with PEFT")
        r = int(get("r", 8))
        alpha = float(get("lora_alpha", 8))
        if get("use_rslora"):
            alpha = alpha * r ** 0.5  # PEFT's rsLoRA scaling lora_alpha / sqrt(r) == alpha / r
        targets = get("target_modules")
        if targets is None:
            raise ShareLoraError("the PEFT config has no target_modules; set them (names, a regex or 'all-linear')")
        layers = get("layers_to_transform")
        values: dict[str, Any] = {
            "rank": r, "alpha": alpha, "dropout": float(get("lora_dropout", 0.0) or 0.0),
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "modules_to_save": list(get("modules_to_save") or []),
            "layers_to_transform": [layers] if isinstance(layers, int) else (list(layers) if layers else None),
            "init_lora_weights": init, "base_model_name_or_path": get("base_model_name_or_path"),
        }
        return cls(**{**values, **overrides})

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def task_shared_roles(self) -> frozenset[str]:
        """The roles ("A" / "B") this adapter reads from its task group instead of owning."""
        return frozenset() if self.task_share == "none" else frozenset(self.task_share)

    # --- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["task_core"] == "none":  # so an adapter without cores stays readable by an earlier sharelora
            del d["task_core"]
        if "task_core" not in d or d["basis_init"] == "lora":  # only task cores read it; the default not written
            del d["basis_init"]
        for key in ("grow_basis", "basis_growth"):  # written only when used (older readers stay able to read)
            if not d[key]:
                del d[key]
        d["adapter_type"] = "SHARELORA"
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShareLoraConfig:
        d = dict(d)
        kind = d.pop("adapter_type", "SHARELORA")
        if kind != "SHARELORA":
            hint = " (a PEFT adapter: load it with ShareLoraModel.from_peft)" if d.get("peft_type") else ""
            raise ShareLoraError(f"adapter_config.json has adapter_type {kind!r}, expected 'SHARELORA'{hint}")
        version = d.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ShareLoraError(
                f"adapter format version {version} is newer than this sharelora understands ({FORMAT_VERSION}); upgrade sharelora"
            )
        names = {f.name for f in dataclasses.fields(cls)} | set(PEFT_NAMES)
        unknown = sorted(set(d) - names)
        if unknown:
            raise ShareLoraError(f"adapter_config.json has unknown fields {unknown}; known fields: {sorted(names)}")
        return cls(**d)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> ShareLoraConfig:
        path = Path(path)
        if not path.is_file():
            raise ShareLoraError(f"{path} does not exist; an adapter directory holds {CONFIG_NAME} and the weights")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShareLoraError(f"{path} is not valid JSON ({e}); the file is corrupted or truncated") from e
        if not isinstance(d, dict):
            raise ShareLoraError(f"{path} must hold a JSON object")
        return cls.from_dict(d)


# PEFT's argument names and the fields they stand for: ShareLoraConfig(r=8, lora_alpha=16, lora_dropout=0.1)
PEFT_NAMES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}
_dataclass_init = ShareLoraConfig.__init__


def _init_with_peft_names(self: ShareLoraConfig, *args: Any, **kwargs: Any) -> None:
    for peft_name, name in PEFT_NAMES.items():
        if peft_name in kwargs:
            value = kwargs.pop(peft_name)
            if name in kwargs and kwargs[name] != value:
                raise ShareLoraError(f"{peft_name}={value!r} and {name}={kwargs[name]!r} name the same setting; "
                                     f"pass one of them")
            kwargs[name] = value
    _dataclass_init(self, *args, **kwargs)


_init_with_peft_names.__doc__ = _dataclass_init.__doc__
_init_with_peft_names.__signature__ = __import__("inspect").signature(_dataclass_init)
ShareLoraConfig.__init__ = _init_with_peft_names  # type: ignore[method-assign]
