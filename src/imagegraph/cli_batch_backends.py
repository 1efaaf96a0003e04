"""Where `imagegraph batch` runs a batch: on a runtime in this process, or on a server
through the client. Both save the workflow, start the batch, report its progress, retry
its failed items and write its layout (`batch-<date>-<id>/`) into --out."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import zipfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from imagegraph.cli import _settings
from imagegraph.errors import ImagegraphError
from imagegraph.graph.model import WorkflowDoc

if TYPE_CHECKING:
    from imagegraph.batches.expand import Item
    from imagegraph.client import AsyncClient, Batch
    from imagegraph.runtime import Runtime
    from imagegraph.store.db import Database
    from imagegraph.store.workflows import WorkflowRecord


@dataclass(frozen=True)
class WorkflowSource:
    """WORKFLOW as given: a file's document (and its fingerprint), or a saved workflow's id."""

    given: str
    doc: WorkflowDoc | None
    sha256: str | None

    def record(self) -> dict[str, Any]:
        if self.doc is None:
            return {"source": self.given, "id": self.given}
        return {"source": self.given, "sha256": self.sha256}


def doc_sha256(doc: WorkflowDoc) -> str:
    """A workflow's fingerprint: its graph, not its file's layout or the editor's viewport."""
    graph = doc.model_dump(mode="json", by_alias=True, exclude={"viewport"})
    return hashlib.sha256(json.dumps(graph, sort_keys=True).encode()).hexdigest()


# -- where the batch runs --------------------------------------------------------------------


class Backend(Protocol):
    """The engine a batch runs on: this process's, or a server's through the client."""

    poll_seconds: float

    async def workflow(self, source: WorkflowSource) -> tuple[str, int]:
        """The workflow's id and version to run: a file is saved (a new workflow, or a new
        version of the one with its name when it differs), an id is looked up."""

    async def create(
        self, workflow_id: str, version: int, items_file: Path, options: Mapping[str, Any]
    ) -> str: ...

    async def progress(self, batch_id: str) -> Batch: ...

    async def retry_failed(self, batch_id: str) -> int: ...

    async def deliver(self, batch_id: str, parent: Path) -> Path:
        """Write the batch's layout under `parent`; returns its folder."""


class InProcess:
    """The batch runs on a runtime in this process (its dispatcher resumes it on start)."""

    poll_seconds = 0.25

    def __init__(self, runtime: Runtime, items: list[Item] | None) -> None:
        self.runtime = runtime
        self.items = items

    async def workflow(self, source: WorkflowSource) -> tuple[str, int]:
        from imagegraph.graph.validate import validate_workflow

        assert source.doc is not None
        validate_workflow(source.doc, self.runtime.registry, self.runtime.settings.max_graph_nodes)
        record = await self.runtime.db.run(_save_workflow, self.runtime.db, source.doc)
        return record.id, record.version

    async def create(
        self, workflow_id: str, version: int, items_file: Path, options: Mapping[str, Any]
    ) -> str:
        from imagegraph.batches import BatchOptions
        from imagegraph.store.tables import DEFAULT_WORKSPACE

        assert self.items is not None
        parsed = BatchOptions.model_validate(
            {**options, "workflowId": workflow_id, "workflowVersion": version}
        )
        return await self.runtime.batches.create(DEFAULT_WORKSPACE, "live", parsed, self.items)

    async def progress(self, batch_id: str) -> Batch:
        from imagegraph.api.routes.batches import batch_out
        from imagegraph.client import Batch
        from imagegraph.store import batches as store
        from imagegraph.store.tables import DEFAULT_WORKSPACE

        db = self.runtime.db
        row = await db.run(store.get_batch, db, DEFAULT_WORKSPACE, batch_id)
        return Batch.model_validate(batch_out(row).model_dump(mode="json", by_alias=True))

    async def retry_failed(self, batch_id: str) -> int:
        from imagegraph.store.tables import DEFAULT_WORKSPACE

        return await self.runtime.batches.retry_failed(DEFAULT_WORKSPACE, batch_id)

    async def deliver(self, batch_id: str, parent: Path) -> Path:
        from imagegraph.batches import manifest
        from imagegraph.store.tables import DEFAULT_WORKSPACE

        db = self.runtime.db
        found = await db.run(manifest.build, db, DEFAULT_WORKSPACE, batch_id)
        return await asyncio.to_thread(manifest.export_to, found, self.runtime.blobs, parent)


def _save_workflow(db: Database, doc: WorkflowDoc) -> WorkflowRecord:
    from imagegraph.graph.model import parse_workflow
    from imagegraph.ids import new_id
    from imagegraph.store import workflows
    from imagegraph.store.tables import DEFAULT_WORKSPACE

    now = datetime.now(UTC)
    cursor: str | None = None
    while True:
        page = workflows.list_workflows(db, DEFAULT_WORKSPACE, limit=200, cursor=cursor)
        found = next((record for record in page if record.name == doc.name), None)
        if found is not None:
            if doc_sha256(parse_workflow(found.graph)) == doc_sha256(doc):
                return found
            return workflows.update_workflow(db, DEFAULT_WORKSPACE, found.id, doc.to_json(), now)
        if len(page) < 200:
            return workflows.create_workflow(
                db, DEFAULT_WORKSPACE, new_id("wf"), doc.to_json(), now
            )
        cursor = page[-1].id


class OnServer:
    """The batch runs on a server; this process follows it and downloads its zip."""

    poll_seconds = 1.0

    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    async def workflow(self, source: WorkflowSource) -> tuple[str, int]:
        from imagegraph.graph.model import parse_workflow

        if source.doc is None:
            saved = await self.client.get_workflow(source.given)
            return saved.id, saved.version
        doc = source.doc
        async for summary in self.client.iter_workflows(page_size=200):
            if summary.name == doc.name:
                current = await self.client.get_workflow(summary.id)
                if doc_sha256(parse_workflow(current.document())) != doc_sha256(doc):
                    current = await self.client.update_workflow(summary.id, doc.to_json())
                return current.id, current.version
        created = await self.client.create_workflow(doc.to_json())
        return created.id, created.version

    async def create(
        self, workflow_id: str, version: int, items_file: Path, options: Mapping[str, Any]
    ) -> str:
        created = await self.client.create_batch(
            workflow_id, file=items_file, workflow_version=version, **options
        )
        return created.batch_id

    async def progress(self, batch_id: str) -> Batch:
        return await self.client.get_batch(batch_id)

    async def retry_failed(self, batch_id: str) -> int:
        return (await self.client.retry_failed(batch_id)).retried

    async def deliver(self, batch_id: str, parent: Path) -> Path:
        await asyncio.to_thread(parent.mkdir, parents=True, exist_ok=True)
        archive = parent / f".{batch_id}.zip"
        try:
            await self.client.download_batch_zip(batch_id, archive)
            return await asyncio.to_thread(unpack, archive, parent)
        finally:
            archive.unlink(missing_ok=True)


def unpack(archive: Path, parent: Path) -> Path:
    """Extract a batch's zip under `parent` as `manifest.export_to` writes the layout: files
    already there with the right size are kept, files of a review folder that the zip no
    longer holds there (their review changed) are removed; manifest.json comes last."""
    from imagegraph.store.batches import REVIEW_STATES

    with zipfile.ZipFile(archive) as zipped:
        members = [m for m in zipped.infolist() if not m.is_dir()]
        folders = {PurePosixPath(m.filename).parts[0] for m in zipped.infolist()}
        if len(folders) != 1:
            raise ImagegraphError(f"the batch's zip holds {len(folders)} folders, not one")
        root = parent / folders.pop()
        wanted: set[Path] = set()
        for member in sorted(members, key=lambda m: m.filename.endswith("/manifest.json")):
            relative = PurePosixPath(member.filename)
            if relative.is_absolute() or ".." in relative.parts or len(relative.parts) > 3:
                raise ImagegraphError(f"the batch's zip holds an odd path: {member.filename}")
            target = parent.joinpath(*relative.parts)
            wanted.add(target)
            keep = relative.name != "manifest.json" and target.is_file()
            if keep and target.stat().st_size == member.file_size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.part")
            partial.write_bytes(zipped.read(member))
            os.replace(partial, target)
    for state in REVIEW_STATES:
        (root / state).mkdir(parents=True, exist_ok=True)
        for present in (root / state).iterdir():
            if present.is_file() and present not in wanted:
                present.unlink()
    return root


@contextlib.asynccontextmanager
async def in_process(data_dir: Path, items: list[Item] | None) -> AsyncIterator[Backend]:
    from imagegraph.runtime import Runtime

    runtime = Runtime.build(_settings(data_dir=data_dir))
    await runtime.start()
    try:
        yield InProcess(runtime, items)
    finally:
        await runtime.stop()


@contextlib.asynccontextmanager
async def on_server(url: str, key: str) -> AsyncIterator[Backend]:
    from imagegraph.client import AsyncClient

    async with AsyncClient(url, key) as client:
        yield OnServer(client)
