"""Continuous batching across adapters: one forward per step for every running request.

The scheduler owns the model on one worker thread and knows nothing of HTTP. Requests wait in a
bounded queue (``QueueFull`` past ``max_queue``). Each step the worker

1. runs the control calls queued with ``call`` / ``call_when_unused`` (loading and unloading
   adapters happens here, between two forwards, never during one);
2. admits waiting requests up to ``max_batch`` running ones: each new request is prefilled alone
   (exactly the forward ``model.generate`` runs for it), its first token is sampled, and its KV
   cache joins the batch's;
3. runs **one** forward of one token per running request, ``adapter_names`` routing each row to
   its adapter (rows whose adapters share an A compute ``x A^T`` once for the whole batch);
4. samples each row (greedy at temperature 0, else temperature + top-p with the request's own
   seeded ``torch.Generator``), hands the new text to the request's ``sink`` and drops the rows
   that finished (``max_tokens``, an end-of-sequence token, a stop string) or were cancelled.

Batch layout (``batch_cache.py``). The batch's keys and values are the model's own transformers
cache (``DynamicCache``: full-attention layers keep every column, sliding-window layers the last
W - 1), rows left-padded to a common width C, with ``mask`` (B, C) marking each row's real tokens.
Row i's next token has position id ``length_i`` (its real tokens so far), so rotary embeddings,
the causal mask and the sliding windows see each row as if it ran alone: the layout ``generate``
uses for a left-padded batch. A joining row is left-padded to the batch (or the batch to the row);
leaving rows are dropped and leading columns that no remaining row uses are cut, so C stays the
longest running row's length.

A failure stays with its request: a prefill or a sampling error ends that request only; if the
batched forward itself raises, every row is tried alone on a copy of its cache, the rows that fail
alone end with the error and the others go on from the state before the failed step.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from ..method.plan import BASE_ADAPTER
from .batch_cache import BatchCache
from .logprobs import TokenLogprob, prompt_logprobs, token_logprobs

log = logging.getLogger("sharelora.serve")

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (as vLLM does)
SEED_RANGE = (-(2**63), 2**64 - 1)  # the seeds torch.Generator.manual_seed takes


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_queue`` requests already."""


class SchedulerStopped(RuntimeError):
    """The scheduler is not running (not started yet, or shut down)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes: ``temperature`` 0 is greedy; ``top_p`` keeps the smallest set of
    tokens whose probability reaches it; ``stop`` strings end the text before them.

    ``logprobs`` k (None: none): every generated token comes with its log-probability and the k most
    likely tokens; ``prompt_logprobs`` k: so do the prompt's tokens (the first unscored), computed in
    the prefill (see ``logprobs.py``). With ``prompt_logprobs`` set, ``max_tokens`` may be 0 (scoring
    only: the prefill and nothing else)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclass(frozen=True)
class Event:
    """What the worker hands a request's sink: new text and tokens, and at the end why it stopped.

    ``finish_reason`` is None while the request runs, then "stop" (an end-of-sequence token or a
    stop string), "length" (``max_tokens``), "cancelled" or "error" (``error`` says what).
    ``logprobs``: one ``TokenLogprob`` per token of ``token_ids`` when the request asked for them;
    ``prompt_logprobs``: the prompt's, in the request's first event, when it asked for them.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    error: BaseException | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass
class Completion:
    """A finished request, as ``Scheduler.generate`` returns it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(eq=False)
class GenerationRequest:
    """One prompt (token ids) for one adapter (or ``BASE_ADAPTER``), decoded with ``params``.

    ``sink(event)`` is called on the worker thread for every event; it must be quick and must not
    raise (an exception in it cancels the request). ``label`` names the request in the log.
    """

    prompt_ids: list[int]
    adapter: str = BASE_ADAPTER
    params: SamplingParams = field(default_factory=SamplingParams)
    sink: Callable[[Event], None] | None = None
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    label: str = ""
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)


class Engine(Protocol):
    """What the scheduler needs of a model (``sharelora.serve.model.ServedModel`` is one)."""

    eos_token_ids: frozenset[int]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: Any, adapter_names: list[str]) -> tuple[torch.Tensor, Any]:
        """(B, T) tokens -> ((B, vocab) float32 logits of the last position, the updated cache). Called
        with ``all_positions=True`` (only then) it returns the (B, T, vocab) logits of every position."""

    def decode(self, token_ids: list[int]) -> str:
        """The text of generated tokens."""


# --- sampling --------------------------------------------------------------------------------------------
def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from (vocab,) float32 logits: argmax (greedy), or temperature then top-p sampling."""
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        probs = sorted_scores.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first is always kept)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = scores.softmax(-1)
    if not torch.isfinite(probs).all():
        raise FloatingPointError("the model produced non-finite scores; cannot sample")
    return int(torch.multinomial(probs, 1, generator=generator))


class _Text:
    """Generated tokens -> text deltas; holds back what could still turn into a stop string or is an
    incomplete UTF-8 character, and cuts the text before the first stop string."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""

    def add(self, token: int | None) -> tuple[str, bool]:
        """(new text safe to send, whether a stop string appeared); ``None`` flushes at the end."""
        if token is not None:
            self.ids.append(token)
            self.text = self.decode(self.ids)
        text = self.text
        if self.stop:
            start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = text[:min(hits)]
                delta = self.text[self.sent:]
                self.sent = len(self.text)
                return delta, True
        safe = len(text)
        if token is not None:
            while safe > self.sent and text[safe - 1] == "\ufffd":  # an incomplete multi-byte character
                safe -= 1
            for s in self.stop:
                for k in range(min(len(s) - 1, safe - self.sent), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        delta = text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta, False


@dataclass(eq=False)
class _Row:
    request: GenerationRequest
    text: _Text
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    length: int = 0  # real tokens in the cache
    first_token_at: float = 0.0
    last: tuple[str, int, tuple] | None = None  # (text, token, its logprobs) of the step that finished the row


class Scheduler:
    """Batches the requests of every adapter into one forward per step (see the module docstring).

    ``start()`` launches the worker thread, ``submit(request)`` queues a request (``QueueFull``
    when ``max_queue`` wait already), ``cancel(id)`` drops one, ``generate(...)`` is the blocking
    form, ``call(fn)`` runs ``fn()`` on the worker between steps, ``stop()`` ends the worker.
    """

    def __init__(self, engine: Engine, max_batch: int = 16, max_queue: int = 256, idle_wait_s: float = 0.5):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.idle_wait_s = idle_wait_s
        self._cv = threading.Condition()
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._controls: list[tuple[Callable[[], Any], concurrent.futures.Future, str | None]] = []
        self._rows: list[_Row] = []
        # every request submitted and not finished yet, by id: cancel() finds one wherever it is
        # (waiting, in its prefill, running)
        self._live: dict[str, GenerationRequest] = {}
        self._batch: BatchCache | None = None  # the running rows' cache (None when none runs)
        self._cache = None  # the same state as the transformers cache the next forward updates
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.completed = 0
        self.failed = 0

    # --- the caller's side -----------------------------------------------------------------------
    def start(self) -> Scheduler:
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sharelora-scheduler", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float | None = 30.0) -> None:
        """End the worker; requests still waiting or running end with finish_reason "error"."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        self.submit_all([request])
        return request

    def submit_all(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """Queue every request or none (``QueueFull`` when they do not all fit; ``ValueError`` names a bad one)."""
        for request in requests:
            if not request.prompt_ids:
                raise ValueError("the prompt has no tokens")
            least = 0 if request.params.prompt_logprobs is not None else 1
            if request.params.max_tokens < least:
                raise ValueError(f"max_tokens must be >= {least}, got {request.params.max_tokens}")
            seed = request.params.seed
            if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
                raise ValueError(f"seed must be an integer in [-2**63, 2**64 - 1] (what torch.Generator takes), "
                                 f"got {seed}")
        with self._cv:
            if not self.alive:
                raise SchedulerStopped("the scheduler is not running")
            free_slots = max(0, self.max_batch - len(self._rows) - len(self._waiting))
            room = free_slots + max(0, self.max_queue - len(self._waiting))
            if len(requests) > room:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (--max-queue {self.max_queue}); "
                                f"{len(requests)} more do not fit; retry later")
            for request in requests:
                request.submitted = time.perf_counter()
                self._waiting.append(request)
                self._live[request.id] = request
            self._cv.notify_all()
        return requests

    def cancel(self, request_id: str) -> None:
        """Drop a request (its client went away); it leaves the batch before the next step."""
        with self._cv:
            request = self._live.get(request_id)
            if request is not None:
                request.cancelled = True
            self._cv.notify_all()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the worker thread between two steps; the future holds its result."""
        return self._control(fn, None)

    def call_when_unused(self, adapter: str, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` on the worker once no waiting or running request uses ``adapter``."""
        return self._control(fn, adapter)

    def _control(self, fn, adapter) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if not self.alive:
                future.set_exception(SchedulerStopped("the scheduler is not running"))
                return future
            self._controls.append((fn, future, adapter))
            self._cv.notify_all()
        return future

    def generate(self, prompt_ids: list[int], adapter: str = BASE_ADAPTER, params: SamplingParams | None = None,
                 timeout: float | None = None, label: str = "") -> Completion:
        """Blocking: submit one request and wait for its completion (raises its error)."""
        done = threading.Event()
        events: list[Event] = []

        def sink(event: Event) -> None:
            events.append(event)
            if event.finish_reason is not None:
                done.set()

        request = self.submit(GenerationRequest(list(prompt_ids), adapter, params or SamplingParams(), sink,
                                                label=label))
        if not done.wait(timeout):
            self.cancel(request.id)
            raise TimeoutError(f"request {request.id} did not finish within {timeout} s")
        last = events[-1]
        if last.error is not None:
            raise last.error
        prompt_lps = next((list(e.prompt_logprobs) for e in events if e.prompt_logprobs is not None), None)
        return Completion("".join(e.text for e in events), [t for e in events for t in e.token_ids],
                          last.finish_reason, last.prompt_tokens, last.completion_tokens,
                          time.perf_counter() - request.submitted, [lp for e in events for lp in e.logprobs],
                          prompt_lps)

    # --- the worker ----------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    if not self._tick():
                        break
                except Exception as e:  # a bug in the bookkeeping must not end the server
                    log.exception("scheduler step failed; ending the running requests")
                    for row in self._rows:
                        self._finish(row, "error", e)
                    self._rows, self._batch, self._cache = [], None, None
        self._shutdown()

    def _tick(self) -> bool:
        with self._cv:
            if self._stopping:
                return False
            if not self._waiting and not self._rows and not self._ready_controls():
                self._cv.wait(self.idle_wait_s)
                return True
        self._run_controls()
        self._admit()
        self._drop_cancelled()
        if self._rows:
            self._step()
        return True

    def _shutdown(self) -> None:
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
            controls, self._controls = self._controls, []
        stopped = SchedulerStopped("the server is shutting down")
        for row in self._rows:
            self._finish(row, "error", stopped)
        self._rows = []
        for request in waiting:
            self._emit(request, Event("", (), "error", stopped, len(request.prompt_ids), 0))
            with self._cv:
                self._live.pop(request.id, None)
        for _, future, _ in controls:
            future.set_exception(stopped)

    def _in_use(self, adapter: str) -> bool:
        return any(r.request.adapter == adapter for r in self._rows) or any(
            r.adapter == adapter for r in self._waiting)

    def _ready_controls(self) -> bool:
        return any(a is None or not self._in_use(a) for _, _, a in self._controls)

    def _run_controls(self) -> None:
        with self._cv:
            ready = [c for c in self._controls if c[2] is None or not self._in_use(c[2])]
            self._controls = [c for c in self._controls if c not in ready]
        for fn, future, _ in ready:
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)

    def _emit(self, request: GenerationRequest, event: Event) -> None:
        if request.sink is None:
            return
        try:
            request.sink(event)
        except Exception:  # the caller is gone (its event loop closed): stop working for it
            request.cancelled = True

    def _finish(self, row: _Row, reason: str, error: BaseException | None = None) -> None:
        request = row.request
        with self._cv:
            self._live.pop(request.id, None)
        delta, tokens, lps = "", (), ()
        if row.last is not None:
            delta, token, lps = row.last
            delta, tokens = delta + row.text.add(None)[0], (token,)
        self._emit(request, Event(delta, tokens, reason, error, len(request.prompt_ids), len(row.tokens), lps))
        now = time.perf_counter()
        if reason == "error":
            self.failed += 1
        else:
            self.completed += 1
        ttft = f"{row.first_token_at - request.submitted:.3f}s" if row.first_token_at else "-"
        log.info("%s adapter=%s prompt_tokens=%d completion_tokens=%d finish=%s latency=%.3fs ttft=%s%s",
                 request.id, request.label or request.adapter, len(request.prompt_ids), len(row.tokens), reason,
                 now - request.submitted, ttft, f" error={error!r}" if error is not None else "")

    def _accept(self, row: _Row, logits: torch.Tensor) -> str | None:
        """Sample the row's next token and tell its client; the finish reason, or None to go on."""
        params = row.request.params
        token = sample(logits, params, row.generator)
        lps = () if params.logprobs is None else tuple(token_logprobs(logits.view(1, -1), [token], params.logprobs))
        row.tokens.append(token)
        if not row.first_token_at:
            row.first_token_at = time.perf_counter()
        reason, delta = None, ""
        if token in self.engine.eos_token_ids and not params.ignore_eos:
            reason = "stop"  # the end-of-sequence token counts as generated, but has no text
        else:
            delta, stopped = row.text.add(token)
            if stopped:
                reason = "stop"
            elif len(row.tokens) >= params.max_tokens:
                reason = "length"
        if reason is None:
            self._emit(row.request, Event(delta, (token,), logprobs=lps))
        else:
            row.last = (delta, token, lps)  # sent with the final event
        return reason

    def _admit(self) -> None:
        joined: list[tuple[_Row, BatchCache]] = []
        while len(self._rows) + len(joined) < self.max_batch:
            with self._cv:
                if not self._waiting:
                    break
                request = self._waiting.popleft()
            if request.cancelled:
                self._finish(_Row(request, _Text(self.engine.decode, ()), None), "cancelled")
                continue
            p = request.params
            row = _Row(request, _Text(self.engine.decode, p.stop), None)
            try:  # everything of one request, its generator included, fails alone
                if p.temperature >= GREEDY_BELOW:
                    seed = p.seed if p.seed is not None else random.getrandbits(63)
                    row.generator = torch.Generator().manual_seed(seed)
                ids = torch.tensor([request.prompt_ids], dtype=torch.long)
                mask = torch.ones_like(ids)
                positions = torch.arange(ids.shape[1]).unsqueeze(0)
                if p.prompt_logprobs is None:
                    logits, cache = self.engine.forward(ids, mask, positions, None, [request.adapter])
                else:  # scoring: the logits of every position, each prompt token's log-probability
                    logits, cache = self.engine.forward(ids, mask, positions, None, [request.adapter],
                                                        all_positions=True)
                    scored = prompt_logprobs(logits[0], request.prompt_ids, p.prompt_logprobs)
                    self._emit(request, Event("", (), prompt_logprobs=tuple(scored)))
                    logits = logits[:, -1]
                    if p.max_tokens == 0:
                        self._finish(row, "length")
                        continue
                row.length = ids.shape[1]
                reason = self._accept(row, logits[0].cpu())
                state = BatchCache.of(cache, mask) if reason is None else None
            except Exception as e:
                log.exception("prefill of %s failed", request.id)
                self._finish(row, "error", e)
                continue
            if reason is not None:
                self._finish(row, reason)
                continue
            state.mask = mask.to(state.keys[0].device)
            joined.append((row, state))
        if not joined:
            return
        parts = ([self._batch] if self._rows else []) + [state for _, state in joined]
        self._batch = BatchCache.join(parts)
        self._cache = self._batch.to_cache()
        self._rows += [row for row, _ in joined]

    def _drop_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self._rows) if r.request.cancelled]
        if gone:
            for i in gone:
                self._finish(self._rows[i], "cancelled")
            self._keep([i for i in range(len(self._rows)) if i not in gone])

    def _keep(self, rows: list[int]) -> None:
        if len(rows) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in rows]
        if not rows:
            self._batch, self._cache = None, None
            return
        self._batch = self._batch.select(rows)
        self._cache = self._batch.to_cache()

    def _inputs(self, rows: list[_Row], mask: torch.Tensor):
        device = mask.device
        ids = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long, device=device)
        positions = torch.tensor([[r.length] for r in rows], dtype=torch.long, device=device)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        return ids, mask, positions

    def _step(self) -> None:
        rows = self._rows
        ids, mask, positions = self._inputs(rows, self._batch.mask)
        try:  # the forward's cache update concatenates: the tensors of self._batch stay valid if it fails
            logits, cache = self.engine.forward(ids, mask, positions, self._cache,
                                                [r.request.adapter for r in rows])
        except Exception as e:
            self._isolate_failure(e)
            return
        self.steps += 1
        self._cache, self._batch = cache, BatchCache.of(cache, mask)
        logits = logits.cpu()
        keep = []
        for i, row in enumerate(rows):
            row.length += 1
            try:
                reason = self._accept(row, logits[i])
            except Exception as e:
                log.exception("sampling for %s failed", row.request.id)
                self._finish(row, "error", e)
                continue
            if reason is None:
                keep.append(i)
            else:
                self._finish(row, reason)
        self._keep(keep)

    def _isolate_failure(self, error: Exception) -> None:
        """The batched forward raised: find the rows that fail alone, end them, keep the rest."""
        log.warning("a batched step failed (%r); trying each of its %d rows alone", error, len(self._rows))
        bad = []
        for i, row in enumerate(self._rows):
            alone = self._batch.select([i])
            ids, mask, positions = self._inputs([row], alone.mask)
            try:
                self.engine.forward(ids, mask, positions, alone.to_cache(), [row.request.adapter])
            except Exception as e:
                bad.append(i)
                self._finish(row, "error", e)
        if not bad:  # no row fails alone: the failure belongs to the batch, end them all
            for row in self._rows:
                self._finish(row, "error", error)
            bad = list(range(len(self._rows)))
        self._keep([i for i in range(len(self._rows)) if i not in bad])
        if self._rows:  # the failed forward may have appended to some layers: rebuild from the tensors
            self._cache = self._batch.to_cache()
