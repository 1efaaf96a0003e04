"""The one exception tree.

Every error a user can see carries a stable `code`, a human `message`, and (for errors that
cross HTTP) a `status`. The API turns them into `application/problem+json`; the CLI prints
their message; the engine records node errors on the node run.

    ImagegraphError                       code               status
    ├── InvalidInput                      invalid_input      422
    │   ├── WorkflowInvalid               workflow_invalid   422  (.issues: every problem)
    │   ├── InvalidImage                  invalid_image      422
    │   └── UnsafeURL                     unsafe_url         422
    ├── Unauthorized                      unauthorized       401
    ├── PaymentRequired                   insufficient_credits 402
    ├── Forbidden                         forbidden          403
    ├── NotFound                          not_found          404
    ├── Conflict                          conflict           409
    ├── PayloadTooLarge                   payload_too_large  413
    ├── UnsupportedMediaType              unsupported_media_type 415
    ├── RateLimited                       rate_limited       429
    ├── ServiceUnavailable                not_ready          503
    └── NodeError                         (per node)         -    raised inside node code
        └── TransientNodeError            (per node)         -    worth another attempt
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Issue:
    """One problem found in a workflow or a request, located as precisely as we can."""

    code: str
    message: str
    node_id: str | None = None
    edge_id: str | None = None
    port: str | None = None
    field: str | None = None

    def to_json(self) -> dict[str, str]:
        names = {"node_id": "nodeId", "edge_id": "edgeId"}
        return {names.get(k, k): v for k, v in asdict(self).items() if v is not None}


class ImagegraphError(Exception):
    """Base of every error imagegraph raises on purpose."""

    code: str = "error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra
        # HTTP headers that go with the error (Retry-After, WWW-Authenticate).
        self.headers: dict[str, str] = {}

    def problem(self) -> dict[str, Any]:
        """The error as an RFC 9457 problem document (without `instance`)."""
        standard = {
            "type": f"urn:imagegraph:problem:{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.message,
            "code": self.code,
        }
        # The standard members first; extra members never replace them.
        return {**standard, **{k: v for k, v in self.extra.items() if k not in standard}}


class InvalidInput(ImagegraphError):
    code = "invalid_input"
    status = 422
    title = "Invalid input"

    def __init__(self, message: str, issues: list[Issue] | None = None, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.issues = issues or []

    def problem(self) -> dict[str, Any]:
        body = super().problem()
        body["errors"] = [issue.to_json() for issue in self.issues]
        return body


class WorkflowInvalid(InvalidInput):
    code = "workflow_invalid"
    title = "Workflow is invalid"

    def __init__(self, issues: list[Issue]) -> None:
        count = len(issues)
        first = issues[0].message if issues else "no details"
        more = f" (and {count - 1} more)" if count > 1 else ""
        super().__init__(f"{first}{more}", issues)


class InvalidImage(InvalidInput):
    code = "invalid_image"
    title = "Not a usable image"


class UnsafeURL(InvalidInput):
    code = "unsafe_url"
    title = "URL refused"


class Unauthorized(ImagegraphError):
    code = "unauthorized"
    status = 401
    title = "Unauthorized"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.headers["WWW-Authenticate"] = 'Bearer realm="imagegraph"'


class PaymentRequired(ImagegraphError):
    code = "insufficient_credits"
    status = 402
    title = "Insufficient credits"


class Forbidden(ImagegraphError):
    code = "forbidden"
    status = 403
    title = "Forbidden"


class NotFound(ImagegraphError):
    code = "not_found"
    status = 404
    title = "Not found"


class Conflict(ImagegraphError):
    code = "conflict"
    status = 409
    title = "Conflict"


class PayloadTooLarge(ImagegraphError):
    code = "payload_too_large"
    status = 413
    title = "Payload too large"


class UnsupportedMediaType(ImagegraphError):
    code = "unsupported_media_type"
    status = 415
    title = "Unsupported media type"


class RateLimited(ImagegraphError):
    code = "rate_limited"
    status = 429
    title = "Too many requests"

    def __init__(self, message: str, retry_after: int, **extra: Any) -> None:
        super().__init__(message, retryAfter=retry_after, **extra)
        self.headers["Retry-After"] = str(retry_after)


class ServiceUnavailable(ImagegraphError):
    code = "not_ready"
    status = 503
    title = "Service unavailable"


class NodeError(ImagegraphError):
    """A node could not produce its outputs. Recorded on the node run, never sent as HTTP."""

    code = "node_failed"
    title = "Node failed"

    def __init__(self, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message, **extra)
        if code is not None:
            self.code = code

    @property
    def retryable(self) -> bool:
        return False

    @property
    def retry_after(self) -> float | None:
        return None


class TransientNodeError(NodeError):
    """A failure that another attempt may not repeat (timeouts, 429, 5xx)."""

    code = "transient_failure"

    def __init__(
        self, message: str, code: str | None = None, retry_after: float | None = None, **extra: Any
    ) -> None:
        super().__init__(message, code, **extra)
        self._retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return True

    @property
    def retry_after(self) -> float | None:
        return self._retry_after
