"""`Idempotency-Key` on POSTs that create something (draft-ietf-httpapi-idempotency-key).

- The first response to a key (2xx) is stored; the same key with the same request within
  the retention window (`IMAGEGRAPH_IDEMPOTENCY_HOURS`, 72 by default) replays it byte for
  byte with `Idempotent-Replayed: true`, doing nothing else.
- The same key with a different request (method, path or body) → 422.
- The same key while the first request still runs → 409 with `Retry-After: 1`; a request
  that stopped without answering releases its key after `IN_FLIGHT_SECONDS`.
- Keys are per workspace: the same key in two workspaces are two keys.
- A request that fails (4xx, 5xx) stores nothing, so it can be corrected and retried with
  the same key.

Executions claim their key in the transaction that creates them (see `Idempotency.record`),
so concurrent twins cannot both create one; other creating routes use `idempotent()`, which
claims the key before the work and stores the response after it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Depends, Header, Request
from starlette.responses import Response

from imagegraph.api.auth import Principal, authenticate
from imagegraph.api.deps import get_runtime
from imagegraph.engine.transitions import IdempotentResponse
from imagegraph.errors import Conflict, InvalidInput, Issue
from imagegraph.runtime import Runtime
from imagegraph.store import idempotency as store

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
IN_FLIGHT_SECONDS = 60
_VALID_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
# Response headers that belong to the stored response (the rest are about this request).
_KEPT_HEADERS = ("content-type", "location")

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias=HEADER,
        description="Any unique string (a UUID v4, say) of 1-255 printable ASCII characters. "
        "Retrying with the same key and body replays the first response instead of "
        "doing the work again.",
    ),
]


def fingerprint(method: str, path: str, body: bytes) -> str:
    """SHA-256 of the request: JSON bodies in canonical form, so key order and spacing do
    not make a retry look like a different request."""
    try:
        canonical = json.dumps(
            json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    except ValueError:
        canonical = body
    digest = hashlib.sha256(f"{method} {path}\n".encode())
    digest.update(canonical)
    return digest.hexdigest()


@dataclass
class Idempotency:
    runtime: Runtime
    workspace_id: str
    key: str
    fingerprint: str
    # Whether this request holds the key (it took over one whose request died).
    held: bool = False

    @classmethod
    def of(
        cls, runtime: Runtime, workspace_id: str, key: str | None, fingerprint: str
    ) -> Idempotency | None:
        if key is None:
            return None
        if not _VALID_KEY.match(key):
            raise InvalidInput(
                f"the {HEADER} header must be 1-255 printable ASCII characters",
                [Issue("invalid_header", "malformed idempotency key", field=f"header.{HEADER}")],
            )
        return cls(runtime, workspace_id, key, fingerprint)

    async def replay(self) -> Response | None:
        """The stored response to replay, or None if the key is new. Raises 422 when the
        key was used for another request, 409 while that request still runs."""
        now = datetime.now(UTC)
        retention = timedelta(hours=self.runtime.settings.idempotency_hours)
        db = self.runtime.db
        stored = await db.run(store.lookup, db, self.workspace_id, self.key, now - retention)
        if stored is None:
            return None
        if stored.fingerprint != self.fingerprint:
            raise InvalidInput(
                f"{HEADER} {self.key!r} was already used for a different request; "
                "use a new key for new requests",
                [
                    Issue(
                        "idempotency_key_reused",
                        "the key was used with another method, path or body",
                        field=f"header.{HEADER}",
                    )
                ],
            )
        if stored.state == "done" and stored.body is not None and stored.status_code:
            headers = {**stored.headers, REPLAYED: "true"}
            return Response(stored.body, status_code=stored.status_code, headers=headers)
        stale = now - timedelta(seconds=IN_FLIGHT_SECONDS)
        if stored.locked_at is not None and stored.locked_at < stale:
            taken = await db.run(
                store.take_over, db, self.workspace_id, self.key, self.fingerprint, stale, now
            )
            if taken:
                self.held = True
                return None
        error = Conflict(
            f"a request with {HEADER} {self.key!r} is still in progress; retry shortly",
            idempotencyKey=self.key,
        )
        error.headers["Retry-After"] = "1"
        raise error

    def record(self, response: Response) -> IdempotentResponse:
        """The response, as stored by the transaction that does the work."""
        return IdempotentResponse(
            key=self.key,
            fingerprint=self.fingerprint,
            status_code=response.status_code,
            headers=_kept_headers(response),
            body=bytes(response.body),
        )

    async def claim(self) -> Response | None:
        """Hold the key for this request; a replay if another request got there first."""
        if self.held:
            return None
        db = self.runtime.db
        claimed = await db.run(
            store.claim, db, self.workspace_id, self.key, self.fingerprint, datetime.now(UTC)
        )
        if claimed:
            return None
        replay = await self.replay()
        if replay is None:  # the other request gave the key up meanwhile
            return await self.claim()
        return replay

    async def save(self, response: Response) -> None:
        db = self.runtime.db
        await db.run(
            store.complete,
            db,
            self.workspace_id,
            self.key,
            response.status_code,
            _kept_headers(response),
            bytes(response.body),
        )

    async def release(self) -> None:
        db = self.runtime.db
        await db.run(store.forget, db, self.workspace_id, self.key)


async def idempotent(
    idempotency: Idempotency | None,
    make: Callable[[], Awaitable[Response]],
    stored: Callable[[Response], Response] | None = None,
) -> Response:
    """Run `make` at most once per idempotency key, replaying its response after that.
    `stored` gives the response to keep for replays when it must differ from the first
    (a new API key's secret is never stored)."""
    if idempotency is None:
        return await make()
    replay = await idempotency.replay()
    if replay is None:
        replay = await idempotency.claim()
    if replay is not None:
        return replay
    try:
        response = await make()
    except BaseException:
        await idempotency.release()
        raise
    if 200 <= response.status_code < 300:
        await idempotency.save(stored(response) if stored is not None else response)
    else:
        await idempotency.release()
    return response


def _kept_headers(response: Response) -> dict[str, str]:
    return {name: response.headers[name] for name in _KEPT_HEADERS if name in response.headers}


async def idempotency_of(
    request: Request,
    runtime: Annotated[Runtime, Depends(get_runtime)],
    principal: Annotated[Principal, Depends(authenticate)],
    idempotency_key: IdempotencyKeyHeader = None,
) -> Idempotency | None:
    """The request's Idempotency-Key in the caller's workspace (None without one), with the
    fingerprint of its method, path and JSON body."""
    if idempotency_key is None:
        return None
    body = await request.body()
    return Idempotency.of(
        runtime,
        principal.workspace_id,
        idempotency_key,
        fingerprint(request.method, request.url.path, body),
    )


IdempotencyDep = Annotated[Idempotency | None, Depends(idempotency_of)]
