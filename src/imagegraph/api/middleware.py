"""Pure ASGI middleware: request ids, access logs, body size limits, last-resort errors.

Written against ASGI directly (not `BaseHTTPMiddleware`) so it adds no task or buffering per
request, and so that even an unexpected exception becomes a problem+json 500 that still
carries the request id.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagegraph import ratelimit
from imagegraph.api.problems import problem_body, problem_response
from imagegraph.errors import PayloadTooLarge

log = structlog.get_logger("imagegraph.http")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestContextMiddleware:
    """Assigns `X-Request-Id` (the client's if well-formed), adds the rate-limit headers of
    whatever the request counted against, logs one line per request, and turns an
    unhandled exception into a 500 problem without leaking its trace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                headers.extend(ratelimit.headers(state))
                message = {**message, "headers": headers}
            await send(message)

        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logging.getLogger("imagegraph.http").exception("unhandled error")
            if response_started:
                raise
            response = problem_response(
                problem_body(
                    500,
                    "internal_error",
                    "the server failed to handle this request; "
                    "quote the request id when reporting it",
                    request_id,
                )
            )
            await response(scope, receive, send_with_id)
        finally:
            log.info(
                "request",
                method=scope.get("method"),
                path=loggable_path(scope.get("path", "")),
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )
            structlog.contextvars.unbind_contextvars("request_id")


_TRIGGER_PATH = re.compile(r"(/workflow/)([^/]{6})[^/]*(/trigger)")


def loggable_path(path: str) -> str:
    """The path as logs may show it: public trigger ids are credentials, so cut short.

    >>> loggable_path("/api/v1/workflow/AbCdEfGhIjKlMnOp/trigger")
    '/api/v1/workflow/AbCdEf…/trigger'
    """
    return _TRIGGER_PATH.sub(r"\1\2…\3", path)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _VALID_REQUEST_ID.match(candidate):
                return candidate
    return uuid.uuid4().hex


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` (413), by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                response = problem_response(_too_large(scope, limit))
                await response(scope, receive, send)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body is larger than {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)


def _too_large(scope: Scope, limit: int) -> dict[str, Any]:
    request_id = scope.get("state", {}).get("request_id")
    return problem_body(
        413, "payload_too_large", f"request body is larger than {limit} bytes", request_id
    )
