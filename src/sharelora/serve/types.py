"""Request and response bodies with OpenAI's (and vLLM's, for adapters) field names.

What a request may hold, and nothing else:

* fields this server implements;
* fields it does not implement, accepted only at their neutral value (``tools: []``,
  ``response_format: {"type": "text"}``, ``logprobs: false``, ...) and otherwise refused by name
  (``unsupported``), so a client never gets silently different behaviour;
* fields that change no output (``user``, ``store``, ``metadata``, ``service_tier``,
  ``parallel_tool_calls``);
* any other field is refused by name (``extra="forbid"``), as OpenAI's API does.

Every string is checked to be Unicode text (no lone surrogate, which JSON's ``\\ud800`` escapes can
smuggle in and no tokenizer or UTF-8 encoder accepts); names are bounded (``MAX_NAME_CHARS``).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from .errors import NOT_UNICODE
from .logprobs import MAX_TOP_LOGPROBS
from .scheduler import SEED_RANGE

MAX_NAME_CHARS = 128  # a model or adapter name; longer ones are refused, never echoed back


def lone_surrogate_at(value: Any) -> str | None:
    """The path of the first string in ``value`` (nested lists / dicts / models, keys too) that is not
    Unicode text, or None. Iterative: a deeply nested field cannot exhaust the stack."""
    todo = [("", value)]
    while todo:
        path, v = todo.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path or "(the request)"
        elif isinstance(v, BaseModel):
            todo.extend(reversed([(f"{path}.{k}" if path else k, getattr(v, k)) for k in type(v).model_fields]))
        elif isinstance(v, dict):
            items = []
            for k, x in v.items():
                items += [(path, k), (f"{path}.{k}" if path else str(k), x)]
            todo.extend(reversed(items))
        elif isinstance(v, (list, tuple)):
            todo.extend(reversed([(f"{path}.{i}" if path else str(i), x) for i, x in enumerate(v)]))
    return None


MAX_N = 64  # choices per prompt


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="after")
    def _unicode_text(self):
        where = lone_surrogate_at(self)
        if where is not None:
            raise PydanticCustomError("lone_surrogate", "{field} " + NOT_UNICODE, {"field": where})
        return self

    def unsupported(self) -> str | None:
        """The first field set to something other than its neutral value (``_NEUTRAL``), then the first
        such field of its ``messages`` (as ``messages.<i>.<field>``), or None."""
        for name in type(self).model_fields:
            if name in _NEUTRAL and getattr(self, name) not in _NEUTRAL[name]:
                return name
        for i, m in enumerate(getattr(self, "messages", None) or []):
            field = m.unsupported()
            if field is not None:
                return f"messages.{i}.{field}"
        return None


# the neutral value(s) of each field a request may send but this server does not implement (n, logprobs,
# top_logprobs and echo are implemented: see CompletionRequest and ChatCompletionRequest); vLLM's extensions
# it does not implement (top_k, min_p, prompt_logprobs, use_beam_search, ...) are unknown fields, refused by name
_NEUTRAL: dict[str, tuple] = {
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,), "chat_template": (None,), "chat_template_kwargs": (None, {}),
    "continue_final_message": (None, False), "mm_processor_kwargs": (None, {}), "tool_calls": (None, []),
}


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str = Field(max_length=4096)  # an adapter name or the base model's (a path, up to PATH_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever the model says
    # fields that change no output
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(_Sampling):
    """``prompt``: a string, token ids, or several of either (one choice per prompt and per ``n``);
    ``logprobs`` k: each token's log-probability and the k most likely (k <= 20); ``echo``: the prompt
    first (its text, and with ``logprobs`` its tokens); ``max_tokens`` 0 with ``echo``: scoring only."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: Any = None  # refused unless empty: this server does not call tools
    function_call: Any = None
    refusal: str | None = None
    audio: Any = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        """The message as a chat template reads it (role, content, and name / tool_call_id when given)."""
        out = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatCompletionRequest(_Sampling):
    """``logprobs``: each generated token's log-probability; ``top_logprobs`` k: and the k most likely."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    parallel_tool_calls: bool | None = None  # no tools are called, so it changes nothing


class TokenizeRequest(_Request):
    """vLLM's ``POST /tokenize``: a ``prompt`` (``add_special_tokens`` default true) or chat ``messages``
    (rendered by the chat template; ``add_generation_prompt`` default true, ``add_special_tokens``
    default false, as the template writes them). vLLM's template options are accepted at their neutral
    value only."""

    model: str | None = Field(None, max_length=4096)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    chat_template: Any = None
    chat_template_kwargs: Any = None
    tools: Any = None
    continue_final_message: Any = None
    mm_processor_kwargs: Any = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = Field(None, max_length=4096)
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class LoadLoraAdapterRequest(_Request):
    lora_name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    lora_path: str = Field(max_length=4096)


class UnloadLoraAdapterRequest(_Request):
    lora_name: str = Field(max_length=MAX_NAME_CHARS)
    lora_path: str | None = Field(None, max_length=4096)


# --- responses -----------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "sharelora"
    root: str | None = None
    parent: str | None = None
    status: Literal["loaded", "loadable"] | None = None  # resident, or loaded on demand when a request names it


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class _Choice(BaseModel):
    index: int = 0
    logprobs: dict | None = None
    finish_reason: str | None = None


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionChoice(_Choice):
    text: str


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Choice):
    delta: ChatDelta


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
