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

    def __post_init__(self) -> None:
        if isinstance(self.share, str) and self.share.lower() in ("none", "lora", ""):
            self.share = "none"
        elif isinstance(self.share, str) and self.share.upper() in ("A", "B", "AB", "BA"):
            self.share = "AB" if self.share.upper() in ("AB", "BA") else self.share.upper()
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

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank

    # --- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
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
        names = {f.name for f in dataclasses.fields(cls)}
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
