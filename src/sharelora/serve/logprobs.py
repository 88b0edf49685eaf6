"""Log-probabilities of tokens, and how OpenAI's completions and chat completions show them.

The log-probability of token t at a position is ``log_softmax(logits)[t]`` of the served adapter's
float32 logits at that position: the model's own distribution, before temperature and top-p (what
vLLM returns by default and what log-likelihood scoring needs). ``top`` holds the k most likely
tokens of that distribution (k <= ``MAX_TOP_LOGPROBS``), most likely first.

Prompt tokens (``echo``): position i's logits score prompt token i + 1, so the first prompt token
has no log-probability (None), as in OpenAI's and vLLM's answers.

Shapes: ``logits`` (N, vocab) for N positions, ``tokens`` (N,) the token scored at each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

MAX_TOP_LOGPROBS = 20
CHUNK = 256  # positions per log_softmax when scoring a prompt: bounds the (positions, vocab) temporary


@dataclass(frozen=True)
class TokenLogprob:
    """One scored token: its id, its log-probability, and the ``top`` (id, log-probability) pairs."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: int) -> list[TokenLogprob]:
    """The log-probability of ``tokens[i]`` under ``logits[i]`` (N, vocab) and its ``k`` most likely tokens."""
    if logits.dim() != 2 or logits.shape[0] != len(tokens):
        raise ValueError(f"logits must be (N, vocab) with N = {len(tokens)} tokens, got {tuple(logits.shape)}")
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise ValueError(f"k must be in 0..{MAX_TOP_LOGPROBS}, got {k}")
    out: list[TokenLogprob] = []
    for start in range(0, len(tokens), CHUNK):
        lp = torch.log_softmax(logits[start:start + CHUNK].float(), dim=-1)
        ids = torch.tensor(tokens[start:start + CHUNK], dtype=torch.long, device=lp.device)
        chosen = lp.gather(1, ids.view(-1, 1)).view(-1).tolist()
        if k:
            values, indices = lp.topk(k, dim=-1)
            tops = [tuple(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        else:
            tops = [()] * len(chosen)
        out += [TokenLogprob(t, c, top) for t, c, top in zip(ids.tolist(), chosen, tops)]
    return out


def prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], k: int) -> list[TokenLogprob]:
    """The first prompt token unscored (``unscored``), then each token i >= 1 scored by ``logits[i - 1]``;
    ``logits`` (len(prompt), vocab) of the prompt's forward."""
    if len(prompt) == 0:
        return []
    return [unscored(prompt[0])] + token_logprobs(logits[:len(prompt) - 1], list(prompt[1:]), k)


# --- OpenAI's formats --------------------------------------------------------------------------------------
def completion_logprobs(entries: Sequence[TokenLogprob], token_text: Callable[[int], str], offset: int = 0) -> dict:
    """The ``logprobs`` object of a completion choice: ``tokens``, ``token_logprobs``, ``top_logprobs``
    ({token text: log-probability}, most likely first) and ``text_offset`` (each token's character offset:
    ``offset`` plus the lengths of the token texts before it, as vLLM counts). An ``unscored`` entry
    shows null for its log-probability and its top tokens."""
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        text = token_text(e.token)
        tokens.append(text)
        scored = is_scored(e)
        values.append(e.logprob if scored else None)
        if scored:
            top: dict[str, float] = {}
            for tid, lp in e.top:
                top.setdefault(token_text(tid), lp)  # two ids with one text: the likelier one stays
            tops.append(top)
        else:
            tops.append(None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: Callable[[int], str]) -> dict:
    """The ``logprobs`` object of a chat choice: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""

    def item(tid: int, lp: float) -> dict:
        text = token_text(tid)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [item(e.token, e.logprob) | {"top_logprobs": [item(t, v) for t, v in e.top]}
                        for e in entries]}


def is_scored(entry: TokenLogprob) -> bool:
    return entry.logprob == entry.logprob  # NaN marks an unscored token


def unscored(token: int) -> TokenLogprob:
    """A token shown without a log-probability (the first token of an echoed prompt)."""
    return TokenLogprob(token, float("nan"))
