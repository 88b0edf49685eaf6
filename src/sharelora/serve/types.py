"""Request and response bodies with OpenAI's (and vLLM's, for adapters) field names.

Fields a request may send but this server does not implement are accepted at their neutral value
and refused otherwise (``unsupported``), so a client never gets silently different behaviour.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .logprobs import MAX_TOP_LOGPROBS

MAX_N = 64  # choices per prompt
# vLLM's extensions this server does not implement: refused by name rather than silently ignored
VLLM_UNSUPPORTED = ("prompt_logprobs", "use_beam_search", "top_k", "min_p", "repetition_penalty", "min_tokens",
                    "length_penalty", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                    "return_tokens_as_token_ids", "include_stop_str_in_output", "truncate_prompt_tokens")


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever the model says

    def unsupported(self) -> str | None:
        """The first field set to something this server does not do, or None."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name
        if self.logit_bias:
            return "logit_bias"
        for name in VLLM_UNSUPPORTED:
            if name in (self.model_extra or {}):
                return name
        return None

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

    def unsupported(self) -> str | None:
        if self.best_of not in (None, 1):
            return "best_of"
        if self.suffix:
            return "suffix"
        return super().unsupported()


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """``logprobs``: each generated token's log-probability; ``top_logprobs`` k: and the k most likely."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class TokenizeRequest(_Request):
    """vLLM's ``POST /tokenize``: a ``prompt`` (``add_special_tokens`` default true) or chat ``messages``
    (rendered by the chat template; ``add_generation_prompt`` default true, ``add_special_tokens``
    default false, as the template writes them)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def unsupported(self) -> str | None:
        for name in ("chat_template", "chat_template_kwargs", "tools", "continue_final_message", "mm_processor_kwargs"):
            if (self.model_extra or {}).get(name) not in (None, False, {}, []):
                return name
        return None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class LoadLoraAdapterRequest(_Request):
    lora_name: str
    lora_path: str


class UnloadLoraAdapterRequest(_Request):
    lora_name: str
    lora_path: str | None = None


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


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: dict | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: dict | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: dict | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
