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
import json
import time
import uuid
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from . import types as t
from .errors import BadRequest, Overloaded, ServeError, Unavailable, as_serve_error, error_body, install_handlers
from .guard import BodyLimit, api_key_check
from .model import ServedModel, resolve_adapter_dir
from .scheduler import Event, GenerationRequest, QueueFull, SamplingParams, Scheduler, SchedulerStopped
from .settings import Settings

DISCONNECT_POLL_S = 0.25


def create_app(served: ServedModel, scheduler: Scheduler, settings: Settings) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the scheduler."""

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

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            raise Unavailable("the scheduler is not running")
        return {"status": "ok", "running": scheduler.running, "waiting": scheduler.waiting,
                "adapters": len(served.served_names()) - 1}

    @app.get("/v1/models")
    async def models() -> t.ModelList:
        cards = [t.ModelCard(id=served.name, root=served.name)]
        cards += [t.ModelCard(id=a.name, created=a.created, root=a.path, parent=served.name)
                  for a in list(served.adapters.values()) if not a.retired]
        return t.ModelList(data=cards)

    @app.post("/v1/completions")
    async def completions(body: t.CompletionRequest, request: Request):
        adapter = served.resolve(body.model)
        prompt = await _completion_prompt(served, body.prompt, max_chars)
        params = _sampling(served, body, len(prompt), body.max_tokens, "prompt")
        gen, queue = _submit(scheduler, GenerationRequest(prompt, adapter, params, label=body.model,
                                                          id=f"cmpl-{uuid.uuid4().hex}"))
        created = int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(text: str, finish: str | None) -> dict:
                return t.Completion(id=gen.id, created=created, model=body.model, choices=[
                    t.CompletionChoice(text=text, finish_reason=finish)]).model_dump(exclude_none=True)

            return _sse(_stream(scheduler, gen, queue), chunk, lambda e: _usage_chunk(
                t.Completion(id=gen.id, created=created, model=body.model, choices=[], usage=_usage(e))) if usage
                else None)
        text, last = await _collect(scheduler, gen, queue, request)
        return t.Completion(id=gen.id, created=created, model=body.model, usage=_usage(last),
                            choices=[t.CompletionChoice(text=text, finish_reason=last.finish_reason)])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: t.ChatCompletionRequest, request: Request):
        adapter = served.resolve(body.model)
        messages = [m.for_template() for m in body.messages]
        _bound_chars(sum(len(m["content"]) for m in messages), max_chars, "messages")
        try:
            prompt = await run_in_threadpool(served.apply_chat_template, messages)
        except BadRequest:
            raise
        except Exception as e:  # the template refused the conversation (a role it does not know, ...)
            raise BadRequest(f"the chat template cannot render these messages: {e}", param="messages") from None
        params = _sampling(served, body, len(prompt), body.max_completion_tokens or body.max_tokens, "messages")
        gen, queue = _submit(scheduler, GenerationRequest(prompt, adapter, params, label=body.model,
                                                          id=f"chatcmpl-{uuid.uuid4().hex}"))
        created = int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            first = [True]

            def chunk(text: str, finish: str | None) -> dict:
                delta = t.ChatDelta(role="assistant" if first[0] else None, content=text if text or first[0] else None)
                first[0] = False
                return t.ChatCompletionChunk(id=gen.id, created=created, model=body.model, choices=[
                    t.ChatChunkChoice(delta=delta, finish_reason=finish)]).model_dump(exclude_none=True)

            return _sse(_stream(scheduler, gen, queue), chunk, lambda e: _usage_chunk(
                t.ChatCompletionChunk(id=gen.id, created=created, model=body.model, choices=[], usage=_usage(e)))
                if usage else None, opening=True)
        text, last = await _collect(scheduler, gen, queue, request)
        return t.ChatCompletion(id=gen.id, created=created, model=body.model, usage=_usage(last), choices=[
            t.ChatChoice(message=t.AssistantMessage(content=text), finish_reason=last.finish_reason)])

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: t.LoadLoraAdapterRequest):
        if body.lora_name in served.adapters or body.lora_name == served.name:
            raise BadRequest(f"an adapter named {body.lora_name!r} is loaded already", param="lora_name")
        path = resolve_adapter_dir(settings.adapter_root, body.lora_path)
        source = await run_in_threadpool(served.read_adapter, path, body.lora_name)
        infos = await asyncio.wrap_future(scheduler.call(lambda: served.add_adapter(source)))
        for info in infos:
            _log_adapter(info, "loaded")
        return {"status": "ok", "adapters": [{"name": i.name, "parameters": i.parameters, "bytes": i.bytes,
                                              "format": i.format} for i in infos]}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: t.UnloadLoraAdapterRequest):
        info = served.retire(body.lora_name)  # new requests for it get 404 from now on
        try:
            await asyncio.wrap_future(scheduler.call_when_unused(body.lora_name,
                                                                 lambda: served.remove_adapter(body.lora_name)))
        except BaseException:
            info.retired = False
            raise
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


async def _completion_prompt(served: ServedModel, prompt, max_chars: int) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        _bound_chars(len(prompt), max_chars, "prompt")
        return await run_in_threadpool(served.encode, prompt)
    if prompt and all(isinstance(x, int) for x in prompt):
        if len(prompt) > served.context_length:
            raise BadRequest(f"the prompt has {len(prompt)} tokens, more than the context ({served.context_length})",
                             param="prompt", code="context_length_exceeded")
        bad = [x for x in prompt if not 0 <= x < served.vocab_size]
        if bad:
            raise BadRequest(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{served.vocab_size - 1})",
                             param="prompt")
        return list(prompt)
    if not prompt:
        raise BadRequest("the prompt is empty", param="prompt")
    raise BadRequest("one prompt per request: a string or a list of token ids", param="prompt")


def _sampling(served: ServedModel, body, prompt_tokens: int, max_tokens: int | None, what: str) -> SamplingParams:
    field = body.unsupported()
    if field:
        raise BadRequest(f"{field} is not supported by this server: it samples one completion (n = 1) with "
                         "temperature, top_p, stop and seed, without penalties, logprobs, tools or structured "
                         "output; remove the field or send its neutral value", param=field)
    if prompt_tokens == 0:
        raise BadRequest(f"the {what} has no tokens", param=what)
    ctx = served.context_length
    room = ctx - prompt_tokens
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = prompt_tokens + (max_tokens or 1)
        raise BadRequest(f"This model's maximum context length is {ctx} tokens. However, you requested {asked} "
                         f"tokens ({prompt_tokens} in the {what}, {max_tokens or 1} in the completion). Please "
                         f"reduce the length of the {what} or the completion.", param=what,
                         code="context_length_exceeded")
    stops = body.stop_list()
    if len(stops) > 4:
        raise BadRequest(f"stop takes up to 4 strings, got {len(stops)}", param="stop")
    return SamplingParams(max_tokens=max_tokens or room,
                          temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p,
                          stop=tuple(stops), seed=body.seed, ignore_eos=body.ignore_eos)


def _submit(scheduler: Scheduler, gen: GenerationRequest) -> tuple[GenerationRequest, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gen.sink = lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)
    try:
        scheduler.submit(gen)
    except QueueFull as e:
        raise Overloaded(str(e)) from None
    except SchedulerStopped as e:
        raise Unavailable(str(e)) from None
    return gen, queue


async def _stream(scheduler: Scheduler, gen: GenerationRequest, queue: asyncio.Queue,
                  request: Request | None = None) -> AsyncIterator[Event]:
    """The request's events; a client that goes away (or a cancelled task) cancels the request."""
    done = False
    get = asyncio.ensure_future(queue.get())
    checked = time.monotonic()
    try:
        while True:
            finished, _ = await asyncio.wait({get}, timeout=DISCONNECT_POLL_S)
            if request is not None and time.monotonic() - checked >= DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if not finished:
                continue
            event = get.result()
            done = event.finish_reason is not None
            yield event
            if done:
                return
            get = asyncio.ensure_future(queue.get())
    finally:
        get.cancel()
        if not done:
            scheduler.cancel(gen.id)


class _ClientGone(ServeError):
    """The client went away before its completion was ready (nginx's 499: nobody reads the answer)."""

    status, type = 499, "client_closed_request"


async def _collect(scheduler, gen, queue, request: Request) -> tuple[str, Event]:
    parts, last = [], None
    async for event in _stream(scheduler, gen, queue, request):
        parts.append(event.text)
        last = event
    if last is None or last.finish_reason is None:
        raise _ClientGone("the client closed the connection")  # nobody is listening any more; the request was cancelled
    if last.error is not None:
        raise as_serve_error(last.error)
    return "".join(parts), last


def _usage(event: Event) -> t.Usage:
    return t.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                   total_tokens=event.prompt_tokens + event.completion_tokens)


def _usage_chunk(model) -> dict:
    return model.model_dump(exclude_none=True) | {"choices": []}


def _sse(events: AsyncIterator[Event], chunk, final, opening: bool = False) -> StreamingResponse:
    """Server-sent events: ``data: {chunk}`` per delta, the finish chunk, the usage chunk, ``[DONE]``."""

    async def body():
        if opening:
            yield _data(chunk("", None))
        async for event in events:
            if event.error is not None:
                err = as_serve_error(event.error)
                yield _data(error_body(err.message, err.type, err.param, err.code))
                break
            if event.finish_reason is None:
                if event.text:
                    yield _data(chunk(event.text, None))
                continue
            if event.text:
                yield _data(chunk(event.text, None))
            yield _data(chunk("", event.finish_reason))
            extra = final(event)
            if extra is not None:
                yield _data(extra)
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
