"""The Python client of the imagegraph REST API: `Client` (blocking) and `AsyncClient`
(asyncio), with the same methods, typed results and typed errors.

    from imagegraph.client import Client, PaymentRequired

    with Client("http://127.0.0.1:8000") as client:  # key: IMAGEGRAPH_API_KEY or admin.key
        workflow = client.create_workflow("examples/linear.json")
        try:
            result = client.run(workflow.id, {"Product": "a ceramic teapot"}, timeout=120)
        except PaymentRequired as exc:
            raise SystemExit(f"needs {exc.required_credits} credits") from exc
        client.download(result.outputs[0], "teapot.webp")
        handle = client.execute(workflow.id, {"Product": "a desk lamp"})
        steps = [event.type for event in client.events(handle.execution_id)]

What belongs here: HTTP calls to a server, and the models and errors of its answers. It must
never import the server's API, engine or store packages: other programs use it to talk to a
server over HTTP, nothing more.
"""

from imagegraph.client._async_client import AsyncClient
from imagegraph.client._client import Client, fire_trigger
from imagegraph.client._config import default_api_key
from imagegraph.client.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    ImagegraphAPIError,
    ImagegraphClientError,
    NotFound,
    PayloadTooLarge,
    PaymentRequired,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
    ValidationFailed,
    WaitTimeout,
)
from imagegraph.client.models import (
    BATCH_TERMINAL_STATUSES,
    TERMINAL_STATUSES,
    Asset,
    Batch,
    BatchCounts,
    BatchCreated,
    BatchItem,
    BatchOutput,
    BatchRetry,
    CreatedKey,
    Credits,
    Delivery,
    DeliveryAttempt,
    Event,
    Execution,
    ExecutionHandle,
    ExecutionSummary,
    Key,
    NodeRun,
    Output,
    Page,
    Plan,
    Poll,
    Totals,
    Trigger,
    Usage,
    UsageByModel,
    UsageDay,
    UsageRow,
    Validation,
    WebhookEndpoint,
    Workflow,
    WorkflowSummary,
    Workspace,
)

__all__ = [
    "BATCH_TERMINAL_STATUSES",
    "TERMINAL_STATUSES",
    "Asset",
    "AsyncClient",
    "BadRequest",
    "Batch",
    "BatchCounts",
    "BatchCreated",
    "BatchItem",
    "BatchOutput",
    "BatchRetry",
    "Client",
    "Conflict",
    "CreatedKey",
    "Credits",
    "Delivery",
    "DeliveryAttempt",
    "Event",
    "Execution",
    "ExecutionHandle",
    "ExecutionSummary",
    "Forbidden",
    "ImagegraphAPIError",
    "ImagegraphClientError",
    "Key",
    "NodeRun",
    "NotFound",
    "Output",
    "Page",
    "PayloadTooLarge",
    "PaymentRequired",
    "Plan",
    "Poll",
    "RateLimited",
    "ServerError",
    "Totals",
    "TransportError",
    "Trigger",
    "Unauthorized",
    "Usage",
    "UsageByModel",
    "UsageDay",
    "UsageRow",
    "Validation",
    "ValidationFailed",
    "WaitTimeout",
    "WebhookEndpoint",
    "Workflow",
    "WorkflowSummary",
    "Workspace",
    "default_api_key",
    "fire_trigger",
]
