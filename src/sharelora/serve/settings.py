"""The server's settings: one pydantic model; the ``sharelora serve`` flags are generated from it.

Each field is a flag (``max_batch`` -> ``--max-batch``) whose help is the field's description;
``adapter`` repeats (``--adapter NAME=DIR --adapter DIR2``).
"""

from __future__ import annotations

import argparse
from typing import Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A prompt of more than this many characters per token of context cannot fit the context with any
# tokenizer in practice; it is refused before tokenizing (tokenizing costs time and memory first).
CHARS_PER_TOKEN = 32


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="base causal LM: a registered name (smollm2), a local folder or a hub id")
    adapter: list[str] = Field(default_factory=list, description=(
        "NAME=DIR: serve the adapter in DIR as NAME (a sharelora directory or a PEFT LoRA directory); "
        "DIR alone: every adapter of a multi-adapter sharelora directory under its own name; repeatable"))
    host: str = Field("127.0.0.1", description="address to bind; 127.0.0.1 keeps the server on this machine")
    port: int = Field(8000, ge=0, le=65535, description="port (0: any free port)")
    max_batch: int = Field(16, ge=1, description="requests decoded together in one forward")
    max_queue: int = Field(256, ge=0, description="requests that may wait for a batch slot; more get 429")
    api_key: str | None = Field(None, description=(
        "require 'Authorization: Bearer KEY' on every request (KEY compared as UTF-8 bytes)"))
    max_body_bytes: int = Field(4 << 20, ge=1024, description="largest request body; a larger one gets 413")
    max_prompt_chars: int | None = Field(None, ge=1, description=(
        "longest prompt (characters of a completion prompt, or of a chat's messages together) the server "
        f"tokenizes; a longer one gets 400 (default: {CHARS_PER_TOKEN} x the context length)"))
    adapter_root: str | None = Field(None, description=(
        "directory of adapter directories: a request whose model names <DIR>/<name> loads it on demand, and "
        "POST /v1/load_lora_adapter may read under it (unset: loading while serving is off)"))
    max_adapters: int | None = Field(None, ge=1, description=(
        "most adapters resident at once; past it the least recently used one no request uses is evicted"))
    adapter_memory: float | None = Field(None, gt=0, description=(
        "most MiB of adapter tensors resident at once (own tensors, plus each task-shared tensor once); "
        "past it the least recently used adapters no request uses are evicted"))
    pin_adapters: bool = Field(True, description=(
        "keep the --adapter adapters resident whatever the bounds (--no-pin-adapters: they may be evicted "
        "too, and are read again from their directory when asked for)"))
    threads: int | None = Field(None, ge=1, description="CPU threads for PyTorch (default: all cores)")
    device: str = Field("auto", description="auto, cpu or cuda[:i]")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype of the base weights")
    context_length: int | None = Field(None, ge=1, description="longest prompt + completion (default: the model's)")
    cache_dir: str | None = Field(None, description="where fetched models are kept")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @field_validator("adapter")
    @classmethod
    def _adapters(cls, values: list[str]) -> list[str]:
        for v in values:
            if not v or v.startswith("=") or v.endswith("="):
                raise ValueError(f"--adapter expects NAME=DIR or DIR, got {v!r}")
        return values

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or value != value.strip()):
            raise ValueError("--api-key is empty or starts / ends with whitespace: give a key of visible characters, "
                             "or leave the flag out to serve without authentication")
        return value

    def prompt_char_limit(self, context_length: int) -> int:
        """The longest prompt, in characters, that is tokenized (``max_prompt_chars`` or its default)."""
        return self.max_prompt_chars or CHARS_PER_TOKEN * context_length

    def adapter_specs(self) -> list[tuple[str | None, str]]:
        """[(name or None, directory)] of ``--adapter``."""
        out = []
        for spec in self.adapter:
            name, sep, path = spec.partition("=")
            out.append((name, path) if sep else (None, spec))
        return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``Settings`` field (type, default and help from the field)."""
    for name, f in Settings.model_fields.items():
        ann = f.annotation
        kwargs: dict = {"help": f.description, "dest": name}
        if f.is_required():
            kwargs["required"] = True
        else:
            default = f.get_default(call_default_factory=True)
            if default not in (None, [], ""):
                kwargs["help"] += f" (default: {default})"
        args = [a for a in get_args(ann) if a is not type(None)]
        if ann is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=None)
        elif get_origin(ann) is list:
            kwargs.update(action="append", default=None, metavar="NAME=DIR")
        elif get_origin(ann) is Literal:
            kwargs.update(choices=list(get_args(ann)), default=None)
        elif ann is int or int in args:
            kwargs.update(type=int, default=None, metavar="N")
        elif float in args:
            kwargs.update(type=float, default=None, metavar="MIB" if name == "adapter_memory" else "X")
        else:
            kwargs.update(default=None, metavar={"adapter_root": "DIR", "cache_dir": "DIR"}.get(name, name.split("_")[-1].upper()))
        parser.add_argument(_flag(name), **kwargs)


def settings_from_args(args: argparse.Namespace) -> Settings:
    values = {n: getattr(args, n) for n in Settings.model_fields if getattr(args, n, None) is not None}
    return Settings(**values)
