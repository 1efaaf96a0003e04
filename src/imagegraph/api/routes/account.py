"""The workspace of the calling key: its plan and credits, its API keys, its usage."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from starlette.responses import Response as StarletteResponse

from imagegraph import keys
from imagegraph.api.auth import CanRead, IsAdmin, Principal
from imagegraph.api.deps import MAX_ID, RuntimeDep
from imagegraph.api.idempotency import (
    IdempotencyDep,
    idempotent,
)
from imagegraph.api.schemas import (
    CreditsAdd,
    CreditsOut,
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
    LedgerEntry,
    LedgerList,
    PlanOut,
    UsageDay,
    UsageModel,
    UsageOut,
    UsageRow,
    WorkspaceOut,
    json_response,
)
from imagegraph.errors import InvalidInput, Issue
from imagegraph.runtime import Runtime
from imagegraph.store import usage as usage_store
from imagegraph.store import workspaces as store

router = APIRouter(tags=["workspace"])
MAX_USAGE_DAYS = 366


async def _workspace_out(runtime: Runtime, principal: Principal) -> WorkspaceOut:
    record = await runtime.db.run(store.get_workspace, runtime.db, principal.workspace_id)
    plan = principal.plan
    return WorkspaceOut(
        id=record.id,
        name=record.name,
        plan=PlanOut(
            name=plan.name,
            requests_per_minute=plan.requests_per_minute,
            execution_starts_per_minute=plan.execution_starts_per_minute,
            executions_per_day=plan.executions_per_day,
        ),
        credits=CreditsOut(
            balance=round(record.credits_balance, 6),
            held=round(record.credits_held, 6),
            available=record.credits_available,
        ),
        mode=principal.mode,
        scopes=sorted(principal.scopes),
    )


@router.get("/workspace", response_model=WorkspaceOut, summary="The caller's workspace")
async def get_workspace(runtime: RuntimeDep, principal: CanRead) -> WorkspaceOut:
    return await _workspace_out(runtime, principal)


@router.post(
    "/credits",
    status_code=status.HTTP_201_CREATED,
    response_model=WorkspaceOut,
    summary="Add credits to the workspace (admin)",
)
async def add_credits(
    runtime: RuntimeDep,
    principal: IsAdmin,
    body: CreditsAdd,
    idempotency: IdempotencyDep,
) -> Response:
    async def grant() -> Response:
        await runtime.db.run(
            store.grant_credits,
            runtime.db,
            principal.workspace_id,
            body.amount,
            body.note,
            datetime.now(UTC),
        )
        return json_response(
            await _workspace_out(runtime, principal), status_code=status.HTTP_201_CREATED
        )

    return await idempotent(idempotency, grant)


@router.get("/credits/ledger", response_model=LedgerList, summary="Credit grants and charges")
async def get_ledger(
    runtime: RuntimeDep,
    principal: CanRead,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="`nextCursor` of the last page.")
    ] = None,
) -> LedgerList:
    rows = await runtime.db.run(
        usage_store.ledger, runtime.db, principal.workspace_id, limit=limit, cursor=cursor
    )
    items = [
        LedgerEntry(
            id=r.id,
            kind=r.kind,
            amount=r.amount,
            execution_id=r.execution_id,
            node_id=r.node_id,
            model=r.model,
            note=r.note,
            created_at=r.created_at,
        )
        for r in rows
    ]
    return LedgerList(items=items, next_cursor=str(items[-1].id) if len(items) == limit else None)


@router.get("/usage", response_model=UsageOut, summary="Executions, images and credits")
async def get_usage(
    runtime: RuntimeDep,
    principal: CanRead,
    start: Annotated[
        date | None,
        Query(alias="from", description="First day (UTC), YYYY-MM-DD; 30 days ago by default."),
    ] = None,
    end: Annotated[
        date | None,
        Query(
            alias="to",
            lt=date.max,
            description="Last day (UTC), included; today by default.",
        ),
    ] = None,
) -> UsageOut:
    today = datetime.now(UTC).date()
    end = end or today
    start = start or end - timedelta(days=29)
    if start > end or (end - start).days >= MAX_USAGE_DAYS:
        raise InvalidInput(
            f"from must not be after to, and the range must be at most {MAX_USAGE_DAYS} days",
            [Issue("invalid_field", "bad date range", field="query.from")],
        )
    found = await runtime.db.run(usage_store.usage, runtime.db, principal.workspace_id, start, end)

    def row(t: usage_store.Tally) -> UsageRow:
        return UsageRow(
            executions=t.executions,
            images=t.images,
            credits=round(t.credits, 6),
            cost_per_image=t.cost_per_image,
        )

    return UsageOut(
        start=start.isoformat(),
        end=end.isoformat(),
        totals=row(found.totals),
        by_day=[UsageDay(date=day, **row(t).model_dump()) for day, t in found.by_day.items()],
        by_model=[
            UsageModel(
                model=model,
                generations=t.generations,
                images=t.images,
                credits=round(t.credits, 6),
                cost_per_image=t.cost_per_image,
            )
            for model, t in found.by_model.items()
        ],
    )


# -- keys ------------------------------------------------------------------------------------


def _key_out(record: store.KeyRecord) -> KeyOut:
    return KeyOut(
        id=record.id,
        name=record.name,
        mode=record.mode,
        prefix=record.prefix,
        last4=record.last4,
        scopes=list(record.scopes),
        created_at=record.created_at,
        last_used_at=record.last_used_at,
        revoked_at=record.revoked_at,
    )


@router.post(
    "/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyCreated,
    summary="Create an API key (admin); the secret is shown once",
)
async def create_key(
    runtime: RuntimeDep,
    principal: IsAdmin,
    body: KeyCreate,
    idempotency: IdempotencyDep,
) -> Response:
    async def create() -> Response:
        new = keys.generate(body.mode)
        record = await runtime.db.run(
            store.add_key,
            runtime.db,
            principal.workspace_id,
            new,
            body.name,
            sorted({s.value for s in body.scopes}),
            datetime.now(UTC),
        )
        return json_response(
            KeyCreated(key=new.secret, **_key_out(record).model_dump()),
            status_code=status.HTTP_201_CREATED,
            headers={"Location": f"/api/v1/keys/{record.id}"},
        )

    # The secret must never be stored, not even in the replay of this response.
    return await idempotent(idempotency, create, stored=_without_secret)


def _without_secret(response: StarletteResponse) -> StarletteResponse:
    created = KeyCreated.model_validate_json(bytes(response.body))
    return json_response(
        created.model_copy(update={"key": None}),
        status_code=response.status_code,
        headers={"Location": response.headers.get("location", "")},
    )


@router.get("/keys", response_model=KeyList, summary="The workspace's API keys (admin)")
async def list_keys(runtime: RuntimeDep, principal: IsAdmin) -> KeyList:
    records = await runtime.db.run(store.list_keys, runtime.db, principal.workspace_id)
    return KeyList(items=[_key_out(r) for r in records])


@router.delete(
    "/keys/{key_id}",
    response_model=KeyOut,
    summary="Revoke an API key (admin); it stops working at once",
    responses={409: {"description": "The last admin key of a workspace cannot be revoked"}},
)
async def revoke_key(runtime: RuntimeDep, principal: IsAdmin, key_id: str) -> KeyOut:
    record = await runtime.db.run(
        store.revoke_key, runtime.db, principal.workspace_id, key_id, datetime.now(UTC)
    )
    runtime.keys.forget_key(key_id)
    return _key_out(record)
