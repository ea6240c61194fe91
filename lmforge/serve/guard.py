"""What a request body must be before any route sees it: at most :data:`MAX_BODY_BYTES`, JSON, valid Unicode.

An ASGI middleware, so that a body too large is refused from its ``Content-Length`` or, without one, as soon as the
bytes received pass the limit, never read to its end; a body that is not JSON (its content type), not UTF-8, or
holds a lone surrogate (``"\\ud800"`` is valid JSON but no text: encoding it fails anywhere later) is refused with a
400 naming where it is, in OpenAI's error shape.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmforge.serve.errors import APIError

MAX_BODY_BYTES = 1 << 20
"""The largest request body accepted (1 MiB): far more text than any served context holds (a prompt longer than
the context is refused anyway), and small enough that reading, parsing and tokenizing one takes well under a
second."""

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
"""A JSON escape of a UTF-16 surrogate: a pair of them is one character, a lone one is none."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(body: Any) -> tuple[str | None, str, str] | None:
    """(param, what, the surrogate) for the first string in ``body`` (parsed JSON) that holds a lone surrogate: a
    value is named by its path (``messages.0.content``), a key by the object holding it; None if there is none."""
    stack: list[tuple[Any, list[str]]] = [(body, [])]  # a stack, not recursion: JSON nests as deep as it likes
    while stack:
        value, path = stack.pop()
        where = ".".join(path) or None
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found is not None:
                return where, f"'{where}'" if where else "the body (a JSON string)", found.group()
        elif isinstance(value, list):
            stack += reversed([(item, [*path, str(i)]) for i, item in enumerate(value)])
        elif isinstance(value, dict):
            for key in value:
                found = _SURROGATE.search(key)
                if found is not None:
                    return where, f"a key in '{where}'" if where else "a key of the body", found.group()
            stack += reversed([(item, [*path, key]) for key, item in value.items()])
    return None


def check_body(body: bytes, content_type: str | None) -> None:
    """APIError (400) unless ``body`` can be a JSON request: a JSON content type (or none), UTF-8, no lone
    surrogate in any string (the error names the field)."""
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise APIError(400, f"the request body must be JSON, sent with 'Content-Type: application/json' (got "
                            f"'Content-Type: {content_type}')", param="Content-Type")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start}): JSON must be UTF-8") from None
    if not _SURROGATE_ESCAPE.search(body):
        return
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return  # not JSON (or nested past what Python parses): the route's parser says so
    hit = _lone_surrogate(parsed)
    if hit is not None:
        param, what, char = hit
        raise APIError(400, f"{what} holds a lone surrogate ({char!a}), which is not text: every string must be "
                            f"valid Unicode", param=param)


class RequestGuard:
    """ASGI middleware: checks the body of every POST (see the module docstring) and hands the route the bytes it
    read."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY_BYTES):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            body = await self._read(headers, receive)
            if body is None:  # the client left before it finished sending
                return
            check_body(body, headers.get("content-type"))
        except APIError as e:
            await e.response()(scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect

        await self.app(scope, replay, send)

    def _too_large(self, declared: int | None) -> APIError:
        size = f"{declared} bytes (its Content-Length)" if declared is not None else f"over {self.max_body} bytes"
        return APIError(413, f"the request body is {size}: at most {self.max_body} bytes are accepted",
                        code="request_too_large")

    async def _read(self, headers: Headers, receive: Receive) -> bytes | None:
        """The whole body, or None if the client disconnected; 413 as soon as it is known to be too large."""
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large(int(declared))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large(None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
