"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from imagegraph import __version__
from imagegraph.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from imagegraph.api.problems import install_problem_handlers
from imagegraph.api.routes import (
    account,
    assets,
    batches,
    executions,
    meta,
    models,
    negative_prompts,
    triggers,
    webhooks,
    workflows,
)
from imagegraph.graph.model import WorkflowDoc
from imagegraph.runtime import Runtime
from imagegraph.settings import Settings

API_PREFIX = "/api/v1"
# Bodies other than uploads are JSON documents; uploads get their own limit on top.
JSON_BODY_LIMIT = 32 * 1024 * 1024


def create_app(
    settings: Settings | None = None,
    runtime: Runtime | None = None,
    on_start: Callable[[Runtime], None] | None = None,
) -> FastAPI:
    """Build the app. With `runtime`, the caller owns it; otherwise the app builds one from
    `settings` on startup (then calls `on_start` with it) and closes it on shutdown."""
    settings = runtime.settings if runtime is not None else settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = runtime is None
        current = runtime or Runtime.build(settings)
        app.state.runtime = current
        if owned:
            await current.start()
            if on_start is not None:
                on_start(current)
        try:
            yield
        finally:
            if owned:
                await current.stop()

    app = FastAPI(
        title="imagegraph",
        version=__version__,
        summary="Self-hosted engine for AI image workflows.",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    if runtime is not None:
        app.state.runtime = runtime
    install_problem_handlers(app)
    # Each router straight into the app (a router of routers is matched once more per level,
    # on every request), probes first, then the API's in the order they are most asked for.
    app.include_router(meta.health_router)
    for router in (
        executions.router,  # before /workflows/{id}, which would shadow it
        workflows.router,
        batches.router,
        assets.router,
        triggers.router,
        negative_prompts.router,
        account.router,
        webhooks.router,
        meta.router,
        models.router,
        # Without an API key: public triggers, and providers announcing finished jobs (signed).
        triggers.public_router,
        models.public_router,
    ):
        app.include_router(router, prefix=API_PREFIX)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=max(JSON_BODY_LIMIT, settings.max_upload_bytes + 65536)
    )
    app.add_middleware(RequestContextMiddleware)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            # Workflow bodies are parsed by hand (JSON or YAML); publish their schema too.
            doc_schema = WorkflowDoc.model_json_schema(
                by_alias=True, ref_template="#/components/schemas/{model}"
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(doc_schema.pop("$defs", {}))
            components["WorkflowDoc"] = doc_schema
            # Errors as they are sent (problem+json, not FastAPI's HTTPValidationError), the
            # ones every operation can meet, response headers, operations without a key.
            from imagegraph.api.problems import document_problems

            document_problems(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
