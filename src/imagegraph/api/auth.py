"""Who is calling: API keys to principals, scopes to permissions.

Every `/api/v1` route except the public trigger declares the scope it needs:

    @router.get("/workflows")
    async def list_workflows(principal: CanRead, ...): ...

The dependency checks the key (401 when it is missing, malformed, unknown or revoked),
then the scope (403), then counts the request against the workspace's rate limits (429),
in that order, so failed authentication never uses up a workspace's quota.

Keys are looked up by their SHA-256 through `store.workspaces.KeyCache`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from imagegraph import keys
from imagegraph.api.deps import get_runtime
from imagegraph.errors import Forbidden, Unauthorized
from imagegraph.keys import Mode, Scope
from imagegraph.plans import Plan
from imagegraph.runtime import Runtime
from imagegraph.store import workspaces as store

# A scope grants itself and the scopes it implies.
IMPLIED: dict[Scope, frozenset[Scope]] = {
    Scope.ADMIN: frozenset(Scope),
    Scope.WORKFLOWS_WRITE: frozenset({Scope.WORKFLOWS_WRITE, Scope.WORKFLOWS_READ}),
    Scope.EXECUTIONS_WRITE: frozenset({Scope.EXECUTIONS_WRITE, Scope.WORKFLOWS_READ}),
    Scope.WORKFLOWS_READ: frozenset({Scope.WORKFLOWS_READ}),
}


_SCOPE_NAMES = frozenset(s.value for s in Scope)


@dataclass(frozen=True)
class Principal:
    """The caller: a key of a workspace, with what it may do."""

    key_id: str
    workspace_id: str
    mode: Mode
    scopes: frozenset[str]
    plan: Plan

    def allows(self, scope: Scope) -> bool:
        return any(scope in IMPLIED.get(Scope(s), ()) for s in self.scopes if s in _SCOPE_NAMES)


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="An API key: `Authorization: Bearer sk-live-…` (or `sk-test-…`).",
)


async def authenticate(
    request: Request,
    runtime: Annotated[Runtime, Depends(get_runtime)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller's principal; raises 401 unless a valid, unrevoked key is presented."""
    state = request.scope.setdefault("state", {})
    client = request.client.host if request.client else "unknown"
    if credentials is None:
        await runtime.limiter.count_unauthenticated(state, client)
        raise Unauthorized("this route needs an API key: send 'Authorization: Bearer sk-…'")
    secret = credentials.credentials.strip()
    if keys.parse(secret) is None:
        await runtime.limiter.count_unauthenticated(state, client)
        raise Unauthorized("the API key is malformed (check that it was copied whole)")
    key_hash = keys.hash_key(secret)
    cache = runtime.keys
    owner = cache.get(key_hash)
    if owner is None:
        owner = await runtime.db.run(store.find_key, runtime.db, key_hash)
        if owner is None:
            await runtime.limiter.count_unauthenticated(state, client)
            raise Unauthorized("the API key is not valid or has been revoked")
        cache.put(key_hash, owner)
    if cache.due_for_touch(owner.key_id):
        await runtime.db.run(store.touch_key, runtime.db, owner.key_id, datetime.now(UTC))
    principal = Principal(
        key_id=owner.key_id,
        workspace_id=owner.workspace_id,
        mode=owner.mode,
        scopes=owner.scopes,
        plan=runtime.plan(owner.plan),
    )
    request.state.principal = principal
    return principal


def require(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the authenticated principal, if it holds `scope`; counts the request
    against the workspace's requests-per-minute limit."""

    async def dependency(
        request: Request,
        runtime: Annotated[Runtime, Depends(get_runtime)],
        principal: Annotated[Principal, Depends(authenticate)],
    ) -> Principal:
        if not principal.allows(scope):
            raise Forbidden(
                f"this API key lacks the {scope.value!r} scope "
                f"(it has: {', '.join(sorted(principal.scopes)) or 'none'})",
                requiredScope=scope.value,
            )
        await runtime.limiter.count_request(
            request.scope.setdefault("state", {}), principal.workspace_id, principal.plan
        )
        return principal

    dependency.__name__ = f"require_{scope.name.lower()}"
    return dependency


CanRead = Annotated[Principal, Depends(require(Scope.WORKFLOWS_READ))]
CanWrite = Annotated[Principal, Depends(require(Scope.WORKFLOWS_WRITE))]
CanExecute = Annotated[Principal, Depends(require(Scope.EXECUTIONS_WRITE))]
IsAdmin = Annotated[Principal, Depends(require(Scope.ADMIN))]
