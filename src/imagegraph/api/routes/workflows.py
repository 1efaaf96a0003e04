"""`/workflows`: create, read, version, delete and validate workflows; execute them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status

from imagegraph.api.auth import CanExecute, CanRead, CanWrite
from imagegraph.api.deps import MAX_VERSION, CursorQuery, LimitQuery, RuntimeDep
from imagegraph.api.idempotency import (
    Idempotency,
    IdempotencyDep,
    idempotent,
)
from imagegraph.api.schemas import (
    ExecuteRequest,
    ExecuteResponse,
    ValidationResult,
    VersionList,
    VersionOut,
    WorkflowList,
    WorkflowOut,
    WorkflowSummary,
    json_response,
)
from imagegraph.engine.engine import IdempotencyKeyTaken
from imagegraph.engine.states import ExecutionStatus
from imagegraph.errors import Conflict, InvalidInput, Issue, WorkflowInvalid
from imagegraph.graph.model import WorkflowDoc, parse_workflow
from imagegraph.graph.validate import validate_workflow
from imagegraph.ids import new_id
from imagegraph.keys import Mode
from imagegraph.runtime import Runtime
from imagegraph.store import workflows as store
from imagegraph.store.workflows import WorkflowRecord

router = APIRouter(prefix="/workflows", tags=["workflows"])

WORKFLOW_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A workflow as JSON (or the same document as YAML).",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/WorkflowDoc"}},
            "application/yaml": {"schema": {"$ref": "#/components/schemas/WorkflowDoc"}},
        },
    }
}
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


async def workflow_body(request: Request) -> WorkflowDoc:
    """The request body as a workflow document, from JSON or YAML."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    raw = await request.body()
    if content_type in YAML_TYPES:
        return parse_workflow(raw, "yaml")
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise InvalidInput(
            f"workflow bodies must be application/json or application/yaml, not {content_type}",
            [
                Issue(
                    "unsupported_media_type",
                    f"content type {content_type} is not accepted",
                    field="body",
                )
            ],
        )
    return parse_workflow(raw, "json")


WorkflowBody = Annotated[WorkflowDoc, Depends(workflow_body)]


def _out(record: WorkflowRecord) -> WorkflowOut:
    graph = record.graph
    return WorkflowOut(
        id=record.id,
        name=record.name,
        description=record.description,
        version=record.version,
        latest_version=record.latest_version,
        created_at=record.created_at,
        updated_at=record.updated_at,
        nodes=graph.get("nodes", []),
        edges=graph.get("edges", []),
        viewport=graph.get("viewport"),
    )


def _validated(runtime: RuntimeDep, doc: WorkflowDoc) -> dict[str, Any]:
    validate_workflow(doc, runtime.registry, runtime.settings.max_graph_nodes)
    return doc.to_json()


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WorkflowOut,
    openapi_extra=WORKFLOW_BODY,
    summary="Create a workflow (version 1)",
)
async def create_workflow(
    runtime: RuntimeDep,
    principal: CanWrite,
    doc: WorkflowBody,
    idempotency: IdempotencyDep,
) -> Response:
    graph = _validated(runtime, doc)

    async def create() -> Response:
        workflow_id = new_id("wf")
        record = await runtime.db.run(
            store.create_workflow,
            runtime.db,
            principal.workspace_id,
            workflow_id,
            graph,
            datetime.now(UTC),
        )
        return json_response(
            _out(record),
            status_code=status.HTTP_201_CREATED,
            headers={"Location": f"/api/v1/workflows/{workflow_id}"},
        )

    return await idempotent(idempotency, create)


@router.post(
    "/validate",
    response_model=ValidationResult,
    openapi_extra=WORKFLOW_BODY,
    summary="Check a workflow without saving it",
)
async def validate(runtime: RuntimeDep, principal: CanRead, doc: WorkflowBody) -> ValidationResult:
    try:
        validate_workflow(doc, runtime.registry, runtime.settings.max_graph_nodes)
    except WorkflowInvalid as exc:
        return ValidationResult(valid=False, errors=[i.to_json() for i in exc.issues])
    return ValidationResult(valid=True)


@router.get("", response_model=WorkflowList, summary="List workflows, newest first")
async def list_workflows(
    runtime: RuntimeDep, principal: CanRead, limit: LimitQuery = 50, cursor: CursorQuery = None
) -> WorkflowList:
    records = await runtime.db.run(
        store.list_workflows, runtime.db, principal.workspace_id, limit=limit, cursor=cursor
    )
    items = [
        WorkflowSummary(
            id=r.id,
            name=r.name,
            description=r.description,
            version=r.latest_version,
            node_count=len(r.graph.get("nodes", [])),
            created_at=r.created_at,
            updated_at=r.updated_at,
        )
        for r in records
    ]
    return WorkflowList(items=items, next_cursor=items[-1].id if len(items) == limit else None)


@router.get("/{workflow_id}", response_model=WorkflowOut, summary="Get a workflow")
async def get_workflow(
    runtime: RuntimeDep,
    principal: CanRead,
    workflow_id: str,
    version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None,
) -> WorkflowOut:
    record = await runtime.db.run(
        store.get_workflow, runtime.db, principal.workspace_id, workflow_id, version
    )
    return _out(record)


@router.put(
    "/{workflow_id}",
    response_model=WorkflowOut,
    openapi_extra=WORKFLOW_BODY,
    summary="Save a new version of a workflow",
)
async def update_workflow(
    runtime: RuntimeDep, principal: CanWrite, workflow_id: str, doc: WorkflowBody
) -> WorkflowOut:
    graph = _validated(runtime, doc)
    record = await runtime.db.run(
        store.update_workflow,
        runtime.db,
        principal.workspace_id,
        workflow_id,
        graph,
        datetime.now(UTC),
    )
    return _out(record)


@router.delete(
    "/{workflow_id}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a workflow"
)
async def delete_workflow(runtime: RuntimeDep, principal: CanWrite, workflow_id: str) -> Response:
    await runtime.db.run(
        store.delete_workflow, runtime.db, principal.workspace_id, workflow_id, datetime.now(UTC)
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{workflow_id}/versions", response_model=VersionList, summary="List versions")
async def list_versions(runtime: RuntimeDep, principal: CanRead, workflow_id: str) -> VersionList:
    versions = await runtime.db.run(
        store.list_versions, runtime.db, principal.workspace_id, workflow_id
    )
    return VersionList(
        items=[
            VersionOut(version=v.version, name=v.name, created_at=v.created_at) for v in versions
        ]
    )


@router.post(
    "/{workflow_id}/execute",
    status_code=status.HTTP_201_CREATED,
    response_model=ExecuteResponse,
    summary="Queue an execution",
    responses={
        402: {"description": "The workspace's credits do not cover the execution's price"},
        409: {"description": "A request with this Idempotency-Key is still in progress"},
        429: {"description": "Too many executions started (per minute or per day)"},
    },
)
async def execute_workflow(
    runtime: RuntimeDep,
    principal: CanExecute,
    workflow_id: str,
    body: ExecuteRequest,
    request: Request,
    idempotency: IdempotencyDep,
) -> Response:
    if body.edges:
        raise InvalidInput(
            "edges cannot be changed when executing; save a new workflow version instead",
            [Issue("invalid_field", "edges must be empty", field="edges")],
        )
    if idempotency is not None:
        replay = await idempotency.replay()
        if replay is not None:
            return replay
    version, doc = await runtime.workflow_version(principal.workspace_id, workflow_id, body.version)
    if body.webhook_url is not None:
        await runtime.webhooks.check_url(body.webhook_url, field="webhookUrl")
    await runtime.limiter.count_execution(
        request.scope.setdefault("state", {}), principal.workspace_id, principal.plan
    )
    return await submit(
        runtime,
        principal.workspace_id,
        principal.mode,
        doc,
        workflow_id=workflow_id,
        workflow_version=version,
        inputs=body.inputs,
        overrides=body.nodes,
        webhook_url=body.webhook_url,
        idempotency=idempotency,
    )


async def submit(
    runtime: Runtime,
    workspace_id: str,
    mode: Mode,
    doc: WorkflowDoc,
    *,
    workflow_id: str,
    workflow_version: int,
    inputs: Mapping[str, Any],
    overrides: Sequence[Mapping[str, Any]] = (),
    webhook_url: str | None = None,
    idempotency: Idempotency | None = None,
    status_code: int = status.HTTP_201_CREATED,
) -> Response:
    """Queue an execution and answer with its handle; with an idempotency key, the key is
    stored with the execution, and a twin request that won the race is replayed."""
    execution_id = new_id("exec")
    response = json_response(
        ExecuteResponse(execution_id=execution_id, status=ExecutionStatus.QUEUED.value),
        status_code=status_code,
        headers={"Location": f"/api/v1/workflows/executions/{execution_id}"},
    )
    try:
        await runtime.engine.submit(
            doc,
            workspace_id=workspace_id,
            mode=mode,
            workflow_id=workflow_id,
            workflow_version=workflow_version,
            inputs=inputs,
            overrides=overrides,
            webhook_url=webhook_url,
            execution_id=execution_id,
            idempotency=idempotency.record(response) if idempotency is not None else None,
        )
    except IdempotencyKeyTaken:
        assert idempotency is not None
        replay = await idempotency.replay()
        if replay is None:
            error = Conflict("the idempotency key changed hands meanwhile; retry")
            error.headers["Retry-After"] = "1"
            raise error from None
        return replay
    return response
