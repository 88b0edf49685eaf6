"""What a request passes before a route sees it: the body-size bound and the API key.

* ``BodyLimit`` (ASGI middleware) reads every request's body up to ``--max-body-bytes`` and answers 413
  past it, whether the client sent ``Content-Length`` (refused before a byte is read) or a chunked
  body (refused at the chunk that crosses the bound); nothing larger is ever held in memory or
  parsed as JSON.
* ``api_key_check(key)`` (a FastAPI dependency) compares ``Authorization: Bearer KEY`` with the key
  as bytes: the header's bytes as the client sent them against the key's UTF-8 bytes, in constant
  time (``hmac.compare_digest``). HTTP headers are bytes; Starlette hands them over decoded as
  Latin-1, which is undone here, so a UTF-8 client matches a non-ASCII key and a Latin-1 one does not.
"""

from __future__ import annotations

import hmac
import json

from starlette.requests import Request

from .errors import PayloadTooLarge, Unauthorized, error_body

def api_key_check(key: str | None):
    """The dependency that requires ``key`` (None: no authentication). An empty key is refused here
    as well as in the settings: it must never mean "authentication off"."""
    if key is not None and not key.strip():
        raise ValueError("api_key is empty: give a non-empty key, or None to serve without authentication")
    expected = key.encode("utf-8") if key is not None else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        raw = request.headers.get("authorization", "").encode("latin-1")  # the bytes the client sent
        scheme, _, token = raw.strip().partition(b" ")
        if not (scheme.lower() == b"bearer") & hmac.compare_digest(token.strip(), expected):
            raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")

    return check


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 in OpenAI's error format; a smaller one is
    read whole and handed to the app, which then reads the client's messages as usual."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect message, when it comes

        return await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        err = PayloadTooLarge(f"the request body is larger than {self.max_bytes} bytes (--max-body-bytes "
                              f"{self.max_bytes}); send a shorter prompt, or start the server with a larger bound")
        payload = json.dumps(error_body(err.message, err.type, None, err.code)).encode()
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
