"""The HTTP routes: OpenAI's completions, chat completions and models, vLLM's adapter loading.

Routes only: a request (its body bounded and its key checked in ``guard.py``, its fields in
``types.py``) is checked against the model, tokenized on a worker thread (never on the event loop,
and only once its length is bounded by ``--max-prompt-chars``) and turned into a
``GenerationRequest``; the scheduler decodes
it (batched with every other request, whatever its adapter) and hands events to an asyncio queue
through ``loop.call_soon_threadsafe``; the route answers with JSON or server-sent events in
OpenAI's chunk format. Errors become OpenAI-style JSON in ``errors.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from . import types as t
from .adapters import AdapterPool
from .completions import Choices, choice_seed
from .errors import BadRequest, Overloaded, ServeError, Unavailable, as_serve_error, error_body, install_handlers
from .guard import BodyLimit, api_key_check
from .model import ServedModel
from .scheduler import Event, GenerationRequest, QueueFull, SamplingParams, Scheduler, SchedulerStopped
from .settings import Settings

DISCONNECT_POLL_S = 0.25


def create_app(served: ServedModel, scheduler: Scheduler, settings: Settings) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the scheduler. ``app.state.adapters`` is its
    ``AdapterPool`` (raises ValueError when the adapters given at startup do not fit its bounds)."""
    memory = None if settings.adapter_memory is None else int(settings.adapter_memory * 2**20)
    pool = AdapterPool(served, scheduler, settings.adapter_root, settings.max_adapters, memory,
                       settings.pin_adapters)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(scheduler.stop)

    app = FastAPI(title="sharelora serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(api_key_check(settings.api_key))])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_handlers(app)
    max_chars = settings.prompt_char_limit(served.context_length)
    app.state.adapters = pool

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            raise Unavailable("the scheduler is not running")
        stats = pool.stats()
        return {"status": "ok", "running": scheduler.running, "waiting": scheduler.waiting,
                "adapters": stats.resident, "adapter_bytes": stats.bytes, "adapter_loads": stats.loads,
                "adapter_evictions": stats.evictions}

    @app.get("/v1/models")
    async def models() -> t.ModelList:
        """The base model, the resident adapters (``status`` "loaded") and the ones a request may name to
        load them (``status`` "loadable")."""
        cards = [t.ModelCard(id=served.name, root=served.name, status="loaded")]
        resident = pool.resident()
        for name in resident:
            a = served.adapters[name]
            cards.append(t.ModelCard(id=name, created=a.created, root=a.path, parent=served.name, status="loaded"))
        known = pool.known_paths()
        found = await run_in_threadpool(pool.scan_root, set(resident) | set(known))
        cards += [t.ModelCard(id=name, root=str(path), parent=served.name, status="loadable")
                  for name, path in list(known.items()) + found if name not in resident]
        return t.ModelList(data=cards)

    @app.post("/v1/completions")
    async def completions(body: t.CompletionRequest, request: Request):
        _refuse_unsupported(body)
        pool.check(body.model)
        _bound_chars(_prompt_chars(body.prompt), max_chars, "prompt")  # before tokenizing: the bound is on text
        prompts = await run_in_threadpool(_completion_prompts, served, body.prompt, body.echo)
        n = body.n or 1
        _bound_choices(scheduler, len(prompts), n)
        if body.max_tokens == 0 and not body.echo:
            raise BadRequest("max_tokens 0 generates nothing: use it with echo: true to score the prompt",
                             param="max_tokens")
        k = body.logprobs
        # echo with logprobs scores the prompt; max_tokens 0 needs the prefill's scores to end with
        scored = k if body.echo and k is not None else (0 if body.max_tokens == 0 else None)
        rid = f"cmpl-{uuid.uuid4().hex}"
        params = [_sampling(served, body, len(ids), body.max_tokens, "prompt", logprobs=k, prompt_logprobs=scored)
                  for ids, _ in prompts]
        adapter = await pool.acquire(body.model, len(prompts) * n)
        gens = [GenerationRequest(ids, adapter, dataclasses.replace(params[p], seed=choice_seed(body.seed, j)),
                                  label=body.model, id=_choice_id(rid, p * n + j, len(prompts) * n))
                for p, (ids, _) in enumerate(prompts) for j in range(n)]
        choices = Choices(len(prompts), n, served.token_text, k, [text for _, text in prompts] if body.echo else None)
        queue = _submit(scheduler, gens, functools.partial(pool.release, adapter))
        created = int(time.time())

        def chunk(parts: list[t.CompletionChoice], usage: t.Usage | None = None) -> dict:
            return t.Completion(id=rid, created=created, model=body.model, choices=parts,
                                usage=usage).model_dump(exclude_none=True)

        if body.stream:
            return _sse(_stream(scheduler, gens, queue),
                        lambda i, e: [chunk([c]) for c in choices.completion_chunks(i, e)],
                        lambda: chunk([], choices.usage()) if _include_usage(body) else None)
        await _collect(scheduler, gens, queue, request, choices)
        return t.Completion(id=rid, created=created, model=body.model, usage=choices.usage(),
                            choices=choices.completion_choices())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: t.ChatCompletionRequest, request: Request):
        _refuse_unsupported(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        pool.check(body.model)
        messages = [m.for_template() for m in body.messages]
        _bound_chars(sum(len(m["content"]) for m in messages), max_chars, "messages")
        prompt = await run_in_threadpool(_chat_prompt, served, messages)
        n = body.n or 1
        _bound_choices(scheduler, 1, n)
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = _sampling(served, body, len(prompt), body.max_completion_tokens or body.max_tokens, "messages",
                           logprobs=k)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        adapter = await pool.acquire(body.model, n)
        gens = [GenerationRequest(prompt, adapter, dataclasses.replace(params, seed=choice_seed(body.seed, j)),
                                  label=body.model, id=_choice_id(rid, j, n)) for j in range(n)]
        choices = Choices(1, n, served.token_text, k)
        queue = _submit(scheduler, gens, functools.partial(pool.release, adapter))
        created = int(time.time())

        def chunk(parts: list[t.ChatChunkChoice], usage: t.Usage | None = None) -> dict:
            return t.ChatCompletionChunk(id=rid, created=created, model=body.model, choices=parts,
                                         usage=usage).model_dump(exclude_none=True)

        if body.stream:
            return _sse(_stream(scheduler, gens, queue),
                        lambda i, e: [chunk([c]) for c in choices.chat_chunks(i, e)],
                        lambda: chunk([], choices.usage()) if _include_usage(body) else None,
                        opening=chunk(choices.chat_opening()))
        await _collect(scheduler, gens, queue, request, choices)
        return t.ChatCompletion(id=rid, created=created, model=body.model, usage=choices.usage(),
                                choices=choices.chat_choices())

    @app.post("/tokenize")
    async def tokenize(body: t.TokenizeRequest) -> t.TokenizeResponse:
        _refuse_unsupported(body)
        if body.model is not None:
            pool.check(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise BadRequest("give either a prompt or messages", param="prompt")
        if body.prompt is not None:
            _bound_chars(len(body.prompt), max_chars, "prompt")
            special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await run_in_threadpool(served.encode, body.prompt, special)
        else:
            messages = [m.for_template() for m in body.messages]
            _bound_chars(sum(len(m["content"]) for m in messages), max_chars, "messages")
            ids = await run_in_threadpool(_chat_prompt, served, messages, body.add_generation_prompt,
                                          bool(body.add_special_tokens))
        strs = [served.token_text(i) for i in ids] if body.return_token_strs else None
        return t.TokenizeResponse(count=len(ids), max_model_len=served.context_length, tokens=ids, token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(body: t.DetokenizeRequest) -> t.DetokenizeResponse:
        if body.model is not None:
            pool.check(body.model)
        _check_token_ids(served, body.tokens, "tokens")
        return t.DetokenizeResponse(prompt=await run_in_threadpool(served.decode, body.tokens))

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: t.LoadLoraAdapterRequest):
        infos = await pool.load(body.lora_name, body.lora_path)
        for info in infos:
            _log_adapter(info, "loaded")
        return {"status": "ok", "adapters": [{"name": i.name, "parameters": i.parameters, "bytes": i.bytes,
                                              "format": i.format} for i in infos]}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: t.UnloadLoraAdapterRequest):
        info = await pool.unload(body.lora_name)  # new requests for it wait, or get 404 if it cannot come back
        _log_adapter(info, "unloaded")
        return {"status": "ok", "lora_name": body.lora_name}

    return app


# --- helpers of the routes --------------------------------------------------------------------------------
def _log_adapter(info, what: str) -> None:
    from .scheduler import log

    log.info("adapter %s %s (%s, %d parameters, %s)", info.name, what, info.format, info.parameters, info.path)


def _bound_chars(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise BadRequest(f"the {what} has {n} characters, more than this server tokenizes ({limit}, "
                         f"--max-prompt-chars); shorten the {what}", param=what, code="prompt_too_long")


def _prompt_chars(prompt) -> int:
    """The characters of a completion's text prompts (token ids count none: they are not tokenized)."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(p) for p in prompt if isinstance(p, str)) if isinstance(prompt, list) else 0


def _refuse_unsupported(body) -> None:
    field = body.unsupported()
    if field:
        raise BadRequest(f"{field} is not supported by this server; remove the field or send its neutral value "
                         "(docs/SERVING.md lists what is)", param=field)


def _check_token_ids(served: ServedModel, ids: list[int], param: str) -> None:
    bad = [x for x in ids if not 0 <= x < served.vocab_size]
    if bad:
        raise BadRequest(f"token ids {bad[:5]} are outside the vocabulary (0..{served.vocab_size - 1})", param=param)


def _completion_prompts(served: ServedModel, prompt, echo: bool) -> list[tuple[list[int], str]]:
    """[(token ids, text)] of a completion's prompt: a string, token ids, or a list of either (text only
    with ``echo``: a string prompt's own text, token ids' decoded text)."""
    if isinstance(prompt, str) or (prompt and all(isinstance(x, int) for x in prompt)):
        prompt = [prompt]
    if not prompt:
        raise BadRequest("the prompt is empty", param="prompt")
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            out.append((served.encode(p), p))
            continue
        if not p:
            raise BadRequest(f"prompt {i} has no token ids", param="prompt")
        _check_token_ids(served, p, "prompt")
        out.append((list(p), served.decode(p) if echo else ""))
    return out


def _chat_prompt(served: ServedModel, messages: list[dict], add_generation_prompt: bool = True,
                 special: bool = False) -> list[int]:
    try:
        return served.apply_chat_template(messages, add_generation_prompt, special)
    except BadRequest:
        raise
    except Exception as e:  # the template refused the conversation (a role it does not know, ...)
        raise BadRequest(f"the chat template cannot render these messages: {e}", param="messages") from None


def _bound_choices(scheduler: Scheduler, prompts: int, n: int) -> None:
    most = scheduler.max_batch + scheduler.max_queue
    if prompts * n > most:
        raise BadRequest(f"{prompts} prompts x n = {n} make {prompts * n} completions; this server takes at most "
                         f"{most} at once (--max-batch + --max-queue): send fewer per request", param="prompt")


def _choice_id(rid: str, index: int, count: int) -> str:
    return rid if count == 1 else f"{rid}-{index}"


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _sampling(served: ServedModel, body, prompt_tokens: int, max_tokens: int | None, what: str,
              logprobs: int | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    if prompt_tokens == 0:
        raise BadRequest(f"the {what} has no tokens", param=what)
    ctx = served.context_length
    room = ctx - prompt_tokens
    least = 0 if max_tokens == 0 else 1
    if room < least or (max_tokens is not None and max_tokens > room):
        asked = prompt_tokens + (1 if max_tokens is None else max_tokens)
        raise BadRequest(f"This model's maximum context length is {ctx} tokens. However, you requested {asked} "
                         f"tokens ({prompt_tokens} in the {what}, {asked - prompt_tokens} in the completion). "
                         f"Please reduce the length of the {what} or the completion.", param=what,
                         code="context_length_exceeded")
    stops = body.stop_list()
    if len(stops) > 4:
        raise BadRequest(f"stop takes up to 4 strings, got {len(stops)}", param="stop")
    return SamplingParams(max_tokens=room if max_tokens is None else max_tokens,
                          temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p,
                          stop=tuple(stops), seed=body.seed, ignore_eos=body.ignore_eos,
                          logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def _submit(scheduler: Scheduler, gens: list[GenerationRequest], done) -> asyncio.Queue:
    """Queue every request (all or none); their events arrive in the queue as (index, event), and ``done()``
    runs on the event loop once per request that ends (or at once for each, if they cannot be queued)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    for i, gen in enumerate(gens):
        gen.sink = functools.partial(_put, loop, queue, i, done)
    try:
        scheduler.submit_all(gens)
    except BaseException as e:
        for _ in gens:
            done()
        if isinstance(e, QueueFull):
            raise Overloaded(str(e)) from None
        if isinstance(e, SchedulerStopped):
            raise Unavailable(str(e)) from None
        raise
    return queue


def _put(loop, queue: asyncio.Queue, index: int, done, event: Event) -> None:
    loop.call_soon_threadsafe(_deliver, queue, index, done, event)


def _deliver(queue: asyncio.Queue, index: int, done, event: Event) -> None:
    queue.put_nowait((index, event))
    if event.finish_reason is not None:
        done()


async def _stream(scheduler: Scheduler, gens: list[GenerationRequest], queue: asyncio.Queue,
                  request: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
    """(index, event) of every request until each has finished; a client that goes away (or a cancelled
    task, or closing this iterator early) cancels the requests still running."""
    running = set(range(len(gens)))
    get = asyncio.ensure_future(queue.get())
    checked = time.monotonic()
    try:
        while running:
            finished, _ = await asyncio.wait({get}, timeout=DISCONNECT_POLL_S)
            if request is not None and time.monotonic() - checked >= DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if not finished:
                continue
            index, event = get.result()
            if event.finish_reason is not None:
                running.discard(index)
            yield index, event
            if running:
                get = asyncio.ensure_future(queue.get())
    finally:
        get.cancel()
        for i in running:
            scheduler.cancel(gens[i].id)


class _ClientGone(ServeError):
    """The client went away before its completion was ready (nginx's 499: nobody reads the answer)."""

    status, type = 499, "client_closed_request"


async def _collect(scheduler, gens, queue, request: Request, choices: Choices) -> None:
    """Wait for every choice; the first error ends the request (and cancels its other choices)."""
    async with contextlib.aclosing(_stream(scheduler, gens, queue, request)) as events:
        async for index, event in events:
            if event.error is not None:
                raise as_serve_error(event.error)
            choices.add(index, event)
    if not choices.finished:
        raise _ClientGone("the client closed the connection")  # nobody is listening any more; the request was cancelled


def _sse(events: AsyncIterator[tuple[int, Event]], chunks, final, opening: dict | None = None) -> StreamingResponse:
    """Server-sent events: ``opening``, then ``data: {chunk}`` for each of ``chunks(index, event)`` (the
    deltas and each choice's finish chunk), then ``final()`` (the usage chunk) unless None, then ``[DONE]``."""

    async def body():
        if opening is not None:
            yield _data(opening)
        async with contextlib.aclosing(events) as stream:
            async for index, event in stream:
                if event.error is not None:
                    err = as_serve_error(event.error)
                    yield _data(error_body(err.message, err.type, err.param, err.code))
                    break
                for obj in chunks(index, event):
                    yield _data(obj)
            else:
                extra = final()
                if extra is not None:
                    yield _data(extra)
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
