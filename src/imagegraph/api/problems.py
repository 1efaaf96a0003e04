"""Every error as `application/problem+json` (RFC 9457), never a stack trace.

Bodies carry `type`, `title`, `status`, `detail`, a stable `code`, the `requestId`, and for
validation failures an `errors` list with each problem's location (`nodeId`, `port`, `field`).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from imagegraph.api.schemas import Problem
from imagegraph.errors import ImagegraphError, Issue
from imagegraph.graph.model import format_loc

PROBLEM_JSON = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Invalid input",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
}


def problem_body(
    status: int, code: str, detail: str, request_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": f"urn:imagegraph:problem:{code}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if request_id:
        body["requestId"] = request_id
    body.update(extra)
    return body


def problem_response(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(
        content=json.dumps(body, separators=(",", ":"), default=str),
        status_code=int(body["status"]),
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def request_id_of(request: Request) -> str | None:
    value = request.scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ImagegraphError)
    async def _imagegraph_error(request: Request, exc: ImagegraphError) -> Response:
        body = exc.problem()
        if request_id_of(request):
            body["requestId"] = request_id_of(request)
        return problem_response(body, headers=exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        issues = [_issue(error) for error in exc.errors()]
        detail = issues[0].message if issues else "request is invalid"
        body = problem_body(
            422,
            "invalid_request",
            detail,
            request_id_of(request),
            errors=[i.to_json() for i in issues],
        )
        return problem_response(body)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:
            # The framework's answer to a body it cannot parse at all (JSON that is not
            # UTF-8, broken multipart): the same 422 as any other malformed body.
            issue = _unparsable(exc)
            body = problem_body(
                422,
                "invalid_request",
                issue.message,
                request_id_of(request),
                errors=[issue.to_json()],
            )
            return problem_response(body)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "")
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such resource: {request.method} {request.url.path}"
        if exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        body = problem_body(exc.status_code, code, detail, request_id_of(request))
        return problem_response(body, headers=dict(exc.headers or {}))


def _unparsable(exc: StarletteHTTPException) -> Issue:
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return Issue(
            "invalid_json",
            f"body is not valid JSON: not UTF-8 (byte {cause.start}: {cause.reason})",
            field="body",
        )
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail else None
    message = f"body could not be parsed: {detail}" if detail else "body could not be parsed"
    return Issue("invalid_body", message, field="body")


def _issue(error: Any) -> Issue:
    loc = tuple(error.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    elif loc and loc[0] in ("query", "path", "header"):
        loc = (f"{loc[0]}", *loc[1:])
    field = format_loc(loc) or "body"
    message = error.get("msg", "invalid")
    if error.get("type") == "json_invalid":
        ctx = error.get("ctx") or {}
        message = f"body is not valid JSON: {ctx.get('error', message)}"
        return Issue("invalid_json", message, field="body")
    return Issue("invalid_field", f"{field}: {message}", field=field)


# -- the OpenAPI document --------------------------------------------------------------------

PROBLEM_REF = "#/components/schemas/Problem"
SECURITY_SCHEME = "apiKey"

# Why each status is answered, when the operation does not say so itself.
_DESCRIPTIONS = {
    401: "No API key, or a malformed, unknown or revoked one",
    403: "The API key lacks the scope this operation needs",
    404: "No such resource in the caller's workspace",
    409: "A request with the same Idempotency-Key is still in progress",
    413: "The request body is too large",
    422: "The request is invalid; `errors` locates each problem",
    429: "Over a rate limit; retry after `Retry-After` seconds",
    500: "Unexpected failure; quote the request id when reporting it",
}

_HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-Id": {
        "description": "The request's id (the client's `X-Request-Id` if well-formed); "
        "logs and problem bodies carry it too.",
        "required": True,
        "schema": {"type": "string", "minLength": 1},
    },
    "RateLimit-Policy": {
        "description": 'The limits the request counted against, e.g. `"requests";q=600;w=60` '
        "(draft-ietf-httpapi-ratelimit-headers).",
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": 'Where the caller stands against each, e.g. `"requests";r=597;t=41`.',
        "schema": {"type": "string"},
    },
    "X-RateLimit-Limit": {
        "description": "Quota of the tightest limit.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "X-RateLimit-Remaining": {
        "description": "Requests left in its window.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "X-RateLimit-Used": {
        "description": "Requests used in its window.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "X-RateLimit-Reset": {
        "description": "When its window resets (Unix time, seconds).",
        "schema": {"type": "integer", "minimum": 0},
    },
    "X-RateLimit-Resource": {
        "description": "Name of the tightest limit.",
        "schema": {"type": "string"},
    },
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "WWW-Authenticate": {
        "description": "How to authenticate: `Bearer`.",
        "schema": {"type": "string"},
    },
}
_RATE_LIMIT_HEADERS = (
    "RateLimit-Policy",
    "RateLimit",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Used",
    "X-RateLimit-Reset",
    "X-RateLimit-Resource",
)
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def document_problems(schema: dict[str, Any]) -> None:
    """Make the OpenAPI document say what the app really answers (in place):

    - every error response is `application/problem+json` with the `Problem` schema,
      replacing FastAPI's `HTTPValidationError`, which this app never sends;
    - the errors any operation can meet are listed on it: 413 and 500 everywhere (the
      middleware's), 401, 403 and 429 where an API key is needed, 404 where a path names
      a resource, 422 where there is anything to validate, 409 with an `Idempotency-Key`;
    - `X-Request-Id` on every response, the rate-limit headers where requests are counted,
      `Retry-After` on 429 and `WWW-Authenticate` on 401;
    - operations without an API key say so (`security: []`).

    Responses an operation declares itself keep their description; content is merged.
    """
    problem = Problem.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update({**problem.pop("$defs", {}), "Problem": problem})
    components.setdefault("headers", {}).update(_HEADERS)
    components.setdefault("securitySchemes", {}).setdefault(
        SECURITY_SCHEME, {"type": "http", "scheme": "bearer"}
    )
    schema["security"] = [{SECURITY_SCHEME: []}]
    for item in schema.get("paths", {}).values():
        shared = item.get("parameters", [])
        for method in _METHODS:
            operation = item.get(method)
            if operation is not None:
                _document_operation(method, operation, [*shared, *operation.get("parameters", [])])
    _drop_unused_schemas(schema, ("HTTPValidationError", "ValidationError"))


def _document_operation(
    method: str, operation: dict[str, Any], parameters: list[dict[str, Any]]
) -> None:
    security = operation.setdefault("security", [])
    keyed = any(SECURITY_SCHEME in requirement for requirement in security)
    responses: dict[str, Any] = operation.setdefault("responses", {})
    statuses = {413, 500}
    if keyed:
        statuses |= {401, 403, 429}
    if method != "options" and any(p.get("in") == "path" for p in parameters):
        statuses.add(404)
    if parameters or "requestBody" in operation:
        statuses.add(422)
    if any(
        p.get("in") == "header" and p.get("name", "").lower() == "idempotency-key"
        for p in parameters
    ):
        statuses.add(409)
    for status in statuses:
        responses.setdefault(str(status), {"description": _DESCRIPTIONS[status]})
    counted = keyed or "429" in responses
    for code, response in responses.items():
        if "$ref" in response:
            continue
        headers = response.setdefault("headers", {})
        for name in ("X-Request-Id", *(_RATE_LIMIT_HEADERS if counted else ())):
            headers.setdefault(name, {"$ref": f"#/components/headers/{name}"})
        if code == "409":  # an Idempotency-Key still in use: try again shortly
            headers.setdefault("Retry-After", {"$ref": "#/components/headers/Retry-After"})
        if code == "429":
            headers["Retry-After"] = {**_HEADERS["Retry-After"], "required": True}
        if code == "401":
            headers["WWW-Authenticate"] = {**_HEADERS["WWW-Authenticate"], "required": True}
        if code[0] in "45":
            content = response.setdefault("content", {})
            json_content = content.get("application/json", {})
            if json_content.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                del content["application/json"]
            content.setdefault(PROBLEM_JSON, {"schema": {"$ref": PROBLEM_REF}})
    operation["responses"] = dict(sorted(responses.items()))


def _drop_unused_schemas(schema: dict[str, Any], names: tuple[str, ...]) -> None:
    schemas = schema.get("components", {}).get("schemas", {})
    for name in names:
        removed = schemas.pop(name, None)
        if removed is not None and f"#/components/schemas/{name}" in json.dumps(schema):
            schemas[name] = removed  # still referred to
