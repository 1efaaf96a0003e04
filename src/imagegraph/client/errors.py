"""Errors the client raises.

    ImagegraphClientError
    ├── ImagegraphAPIError      the server answered with an error        .status .code .detail
    │   ├── BadRequest          400                                      .problem .request_id
    │   ├── Unauthorized        401
    │   ├── PaymentRequired     402  .required_credits .available_credits .nodes
    │   ├── Forbidden           403
    │   ├── NotFound            404
    │   ├── Conflict            409
    │   ├── PayloadTooLarge     413
    │   ├── ValidationFailed    422  .errors
    │   ├── RateLimited         429  .retry_after
    │   └── ServerError         5xx
    ├── TransportError          no answer from the server, after retries
    └── WaitTimeout             `wait()` ran out of time (also a `TimeoutError`)

Other statuses (405, 415, ...) raise `ImagegraphAPIError` itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from imagegraph.netguard import parse_retry_after

if TYPE_CHECKING:
    from imagegraph.client.models import Poll


class ImagegraphClientError(Exception):
    """Base of every error the client raises."""


class ImagegraphAPIError(ImagegraphClientError):
    """The server answered with an error status and (usually) an RFC 9457 problem body."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        problem: dict[str, Any] | None = None,
        request_id: str | None = None,
        headers: httpx.Headers | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.problem: dict[str, Any] = problem or {}
        self.request_id = request_id
        self.headers = headers or httpx.Headers()
        suffix = f" (request {request_id})" if request_id else ""
        super().__init__(f"{status} {code}: {detail}{suffix}")


class BadRequest(ImagegraphAPIError):
    """400: the request is malformed."""


class Unauthorized(ImagegraphAPIError):
    """401: the API key is missing, malformed, unknown or revoked."""


class PaymentRequired(ImagegraphAPIError):
    """402: the workspace's credits do not cover the execution."""

    @property
    def required_credits(self) -> float | None:
        value = self.problem.get("requiredCredits")
        return float(value) if isinstance(value, int | float) else None

    @property
    def available_credits(self) -> float | None:
        value = self.problem.get("availableCredits")
        return float(value) if isinstance(value, int | float) else None

    @property
    def nodes(self) -> list[dict[str, Any]]:
        """The price of each node: `{"nodeId", "nodeType", "credits"}`."""
        return list(self.problem.get("nodes") or [])


class Forbidden(ImagegraphAPIError):
    """403: the API key lacks the scope the route needs."""


class NotFound(ImagegraphAPIError):
    """404: no such resource in the key's workspace."""


class Conflict(ImagegraphAPIError):
    """409: the resource is not in a state that allows the request."""


class PayloadTooLarge(ImagegraphAPIError):
    """413: the body is larger than the server accepts."""


class ValidationFailed(ImagegraphAPIError):
    """422: the request or workflow is invalid; `errors` locates every problem."""

    @property
    def errors(self) -> list[dict[str, Any]]:
        """Each problem: `{"code", "message"}` and where known `nodeId`, `port`, `field`."""
        return list(self.problem.get("errors") or [])


class RateLimited(ImagegraphAPIError):
    """429: too many requests or executions; `retry_after` says when to try again."""

    @property
    def retry_after(self) -> float | None:
        seconds = parse_retry_after(self.headers.get("retry-after"))
        if seconds is None and isinstance(self.problem.get("retryAfter"), int | float):
            seconds = float(self.problem["retryAfter"])
        return seconds


class ServerError(ImagegraphAPIError):
    """5xx: the server (or a proxy in front of it) failed."""


class TransportError(ImagegraphClientError):
    """The server could not be reached or the connection broke, after every retry."""


class WaitTimeout(ImagegraphClientError, TimeoutError):
    """`wait()` gave up before the execution ended; `last` is the last poll."""

    def __init__(self, execution_id: str, timeout: float, last: Poll) -> None:
        self.execution_id = execution_id
        self.timeout = timeout
        self.last = last
        super().__init__(
            f"execution {execution_id} is still {last.status} after {timeout:g} seconds"
        )


_BY_STATUS: dict[int, type[ImagegraphAPIError]] = {
    400: BadRequest,
    401: Unauthorized,
    402: PaymentRequired,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationFailed,
    429: RateLimited,
}


def error_from_response(response: httpx.Response) -> ImagegraphAPIError:
    """The typed error for an error response (its body must have been read)."""
    problem: dict[str, Any] = {}
    if "json" in response.headers.get("content-type", ""):
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            problem = body
    status = response.status_code
    code = problem.get("code") if isinstance(problem.get("code"), str) else None
    detail = problem.get("detail") if isinstance(problem.get("detail"), str) else None
    request_id = problem.get("requestId") or response.headers.get("x-request-id")
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ImagegraphAPIError)
    return cls(
        status,
        code or "http_error",
        detail or response.text[:500] or response.reason_phrase,
        problem=problem,
        request_id=str(request_id) if request_id else None,
        headers=response.headers,
    )
