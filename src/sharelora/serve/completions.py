"""The choices of one completions or chat request, assembled from the scheduler's events.

A request with P prompts and ``n`` choices per prompt runs as P * n ``GenerationRequest``s; choice
``index = p * n + j`` is prompt p's j-th (OpenAI's order). Their events arrive interleaved as
(index, event); ``Choices`` keeps each choice's text, tokens and log-probabilities, builds the
final choices of a JSON answer, and the chunk of each event of a streamed one.

``echo`` (completions): a choice's text starts with its prompt's text, and with log-probabilities
asked for, its ``logprobs`` start with the prompt's tokens (the first one null).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import types as t
from .logprobs import TokenLogprob, chat_logprobs, completion_logprobs
from .scheduler import Event


def choice_seed(seed: int | None, j: int) -> int | None:
    """The seed of a prompt's j-th choice: ``seed`` for the first, ``(seed + j) mod 2**63`` for the others."""
    if seed is None or j == 0:
        return seed
    return (seed + j) % 2**63


@dataclass
class _Choice:
    echo_text: str = ""
    parts: list[str] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    last: Event | None = None
    echoed: bool = False  # streaming: the echo chunk was sent
    offset: int = 0  # streaming: text_offset of the next token


class Choices:
    """``prompts`` * ``n`` choices; ``logprobs`` k or None; ``echo_texts`` one per prompt (completions'
    echo) or None; ``token_text(id)`` the text logprobs show for a token."""

    def __init__(self, prompts: int, n: int, token_text: Callable[[int], str], logprobs: int | None,
                 echo_texts: list[str] | None = None):
        self.n = n
        self.items = [_Choice(echo_text=echo_texts[i // n] if echo_texts else "") for i in range(prompts * n)]
        self.token_text = token_text
        self.want_logprobs = logprobs is not None
        self.echo = echo_texts is not None

    def add(self, index: int, event: Event) -> None:
        c = self.items[index]
        if event.prompt_logprobs is not None:
            c.prompt_logprobs = list(event.prompt_logprobs)
        c.parts.append(event.text)
        c.logprobs += event.logprobs
        if event.finish_reason is not None:
            c.last = event

    @property
    def finished(self) -> bool:
        return all(c.last is not None for c in self.items)

    def usage(self) -> t.Usage:
        """Prompt tokens counted once per prompt (not per choice), as OpenAI and vLLM count them."""
        done = [c.last for c in self.items if c.last is not None]
        prompt = sum(c.last.prompt_tokens for c in self.items[::self.n] if c.last is not None)
        completion = sum(e.completion_tokens for e in done)
        return t.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    # --- whole answers ------------------------------------------------------------------------------
    def completion_choices(self) -> list[t.CompletionChoice]:
        out = []
        for i, c in enumerate(self.items):
            lps = None
            if self.want_logprobs:
                lps = completion_logprobs(c.prompt_logprobs + c.logprobs, self.token_text)
            out.append(t.CompletionChoice(index=i, text=c.echo_text + "".join(c.parts), logprobs=lps,
                                          finish_reason=c.last.finish_reason))
        return out

    def chat_choices(self) -> list[t.ChatChoice]:
        return [t.ChatChoice(index=i, message=t.AssistantMessage(content="".join(c.parts)),
                             logprobs=chat_logprobs(c.logprobs, self.token_text) if self.want_logprobs else None,
                             finish_reason=c.last.finish_reason) for i, c in enumerate(self.items)]

    # --- streamed answers ------------------------------------------------------------------------------
    def completion_chunks(self, index: int, event: Event) -> list[t.CompletionChoice]:
        """The chunk choices of one event (none when it carries nothing to send); the event is kept (``add``)."""
        self.add(index, event)
        c = self.items[index]
        out = []
        if self.echo and not c.echoed and (event.prompt_logprobs is not None or not self.want_logprobs):
            c.echoed = True
            lps = None
            if self.want_logprobs:
                lps = completion_logprobs(list(event.prompt_logprobs), self.token_text, c.offset)
                c.offset += sum(len(x) for x in lps["tokens"])
            out.append(t.CompletionChoice(index=index, text=c.echo_text, logprobs=lps))
        lps = None
        if self.want_logprobs and event.logprobs:
            lps = completion_logprobs(event.logprobs, self.token_text, c.offset)
            c.offset += sum(len(x) for x in lps["tokens"])
        if event.text or lps is not None:
            out.append(t.CompletionChoice(index=index, text=event.text, logprobs=lps))
        if event.finish_reason is not None:
            out.append(t.CompletionChoice(index=index, text="", finish_reason=event.finish_reason))
        return out

    def chat_opening(self) -> list[t.ChatChunkChoice]:
        """The first chunk's choices: each choice's role."""
        return [t.ChatChunkChoice(index=i, delta=t.ChatDelta(role="assistant", content=""))
                for i in range(len(self.items))]

    def chat_chunks(self, index: int, event: Event) -> list[t.ChatChunkChoice]:
        self.add(index, event)
        out = []
        lps = chat_logprobs(event.logprobs, self.token_text) if self.want_logprobs and event.logprobs else None
        if event.text or lps is not None:
            out.append(t.ChatChunkChoice(index=index, delta=t.ChatDelta(content=event.text), logprobs=lps))
        if event.finish_reason is not None:
            out.append(t.ChatChunkChoice(index=index, delta=t.ChatDelta(), finish_reason=event.finish_reason))
        return out
