"""The one place where exceptions become OpenAI-style JSON errors.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with its HTTP
status: 400 bad request (parameters, a prompt longer than the context, an adapter that does not
fit, a field this server does not implement, text that is not Unicode), 401 missing or wrong API
key, 403 refused (a path outside ``--adapter-root``), 404 unknown model or adapter, 413 a body over
``--max-body-bytes``, 429 queue full, 503 shutting down, 500 anything else (logged; the server and
the other requests go on). A message never carries more than ``MAX_MESSAGE_CHARS`` characters nor a
string that is not Unicode text, whatever the request held.
"""

from __future__ import annotations

import logging

log = logging.getLogger("sharelora.serve")

MAX_MESSAGE_CHARS = 2000
NOT_UNICODE = ("holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), which is not Unicode "
               "text; send valid UTF-8 text")


class ServeError(Exception):
    """An error with its HTTP status and OpenAI error ``type`` / ``code``."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class BadRequest(ServeError):
    status, type = 400, "invalid_request_error"


class Unauthorized(ServeError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class Forbidden(ServeError):
    status, type = 403, "permission_error"


class NotFound(ServeError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class PayloadTooLarge(ServeError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class Overloaded(ServeError):
    status, type, code = 429, "rate_limit_error", "queue_full"


class Unavailable(ServeError):
    status, type = 503, "server_error"


def _text(s: str | None, limit: int) -> str | None:
    """``s`` as UTF-8-safe text of at most ``limit`` characters (lone surrogates escaped)."""
    if s is None:
        return None
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s if len(s) <= limit else s[:limit - 3] + "..."


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": _text(message, MAX_MESSAGE_CHARS), "type": type, "param": _text(param, 200),
                      "code": code}}


def as_serve_error(e: BaseException) -> ServeError:
    """Any exception as the ServeError a client should see (unknown ones: 500, message kept short)."""
    from .scheduler import QueueFull, SchedulerStopped

    if isinstance(e, ServeError):
        return e
    if isinstance(e, QueueFull):
        return Overloaded(str(e))
    if isinstance(e, SchedulerStopped):
        return Unavailable(str(e))
    return ServeError(f"internal error: {type(e).__name__}: {e}")


def _validation_message(errors) -> tuple[str, str | None]:
    """pydantic's errors as one message and the ``param`` of the first. Text that is not Unicode is
    reported alone (the other branches of a union would only say "not a list"); a field the request
    models do not know is refused by name."""
    errors = list(errors)
    surrogates = [e for e in errors if e.get("type") in ("lone_surrogate", "string_unicode")]
    errors = surrogates or errors
    parts, param = [], None
    for err in errors:
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        if err.get("type") == "lone_surrogate":
            loc.append(str(err["ctx"]["field"]))
        where = ".".join(loc)
        param = param or where or None
        if err.get("type") == "string_unicode":  # pydantic's own check of a constrained string
            parts.append(f"{where} {NOT_UNICODE}")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"{where} is not a field this server knows or implements; remove it (see docs/SERVING.md)")
        else:
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request", param


def install_handlers(app) -> None:
    """Make the FastAPI ``app`` answer every error in OpenAI's format."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    def respond(e: ServeError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=headers)

    @app.exception_handler(ServeError)
    async def _serve_error(request, e: ServeError):
        return respond(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        message, param = _validation_message(e.errors())
        return respond(BadRequest(message, param))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        kind = {404: NotFound, 405: BadRequest, 401: Unauthorized}.get(e.status_code, ServeError)
        err = kind(str(e.detail))
        err.status = e.status_code
        if e.status_code == 404:
            err.code = "not_found"
        return respond(err)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        err = as_serve_error(e)
        if err.status == 500:
            log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return respond(err)
