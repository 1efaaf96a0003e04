"""Batch benchmark: how close a big batch comes to the ideal wall time, and what it costs
the server in memory.

    python benchmarks/batch.py [--quick]

Prints one JSON object on stdout (progress goes to stderr). Each phase runs against a fresh
`imagegraph serve` subprocess (SQLite, synchronous=NORMAL) and posts one batch of a sandbox
workflow (input:text -> generate:sandbox 64x64 with `delayMs` -> output:image) over HTTP:

(a) 2,000 items, delayMs=500, concurrency 100: wall time from the POST to the batch's end
    against the ideal items / concurrency * delay (10 s), and against a direct baseline
    measured in this process: the same number of sandbox renders, each after the same
    sleep, under a semaphore of the same size (no server, no database).
(b) server memory (the server and its worker process, which draws the sandbox's pictures):
    VmRSS idle and VmHWM (peak) for the 2,000-item batch and for a
    10,000-item batch (delayMs=100, concurrency 100, so its ideal is also 10 s), each on a
    fresh server with the decoded-image cache bounded at 16 MiB; also the time to accept
    the 10,000 items in one request and to read progress.
(c) dedupe: 1,000 items of which half repeat an earlier one, against 1,000 distinct items:
    executions run and wall time.

Every item's prompt is unique to this run (so no cache answers) except the duplicates of
(c). Nothing here asserts on speed; `targets` compares the numbers with the goals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

# Run as a script, this directory is on the path, not the checkout's `benchmarks` package.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from benchmarks.orchestration import (
    API,
    PROMPT_LABEL,
    Server,
    machine,
    median,
    percentile,
    progress,
    r3,
    ratio,
    running,
)

from imagegraph.drawing import render

IMAGE_SIZE = 64
# How often progress is read while a batch runs (as a progress bar would).
POLL_SECONDS = 0.25
# The decoded-image cache is bounded (256 MiB by default) and fills with distinct images
# whatever the batch's size; 16 MiB (a thousand 64x64 images, ten times the concurrency)
# keeps it from hiding what grows with the number of items.
SERVER_ENV = {
    "IMAGEGRAPH_SQLITE_SYNCHRONOUS": "NORMAL",
    "IMAGEGRAPH_LOG_LEVEL": "WARNING",
    "IMAGEGRAPH_IMAGE_CACHE_BYTES": str(16 * 1024 * 1024),
}


@dataclass(frozen=True)
class Config:
    quick: bool
    items: int
    concurrency: int
    delay_ms: int
    memory_items: int
    memory_delay_ms: int
    dedupe_items: int

    @classmethod
    def full(cls) -> Config:
        return cls(False, 2000, 100, 500, 10_000, 100, 1000)

    @classmethod
    def small(cls) -> Config:
        return cls(True, 100, 50, 100, 400, 20, 100)

    def ideal_s(self, items: int, delay_ms: int) -> float:
        return items / self.concurrency * delay_ms / 1000


def workflow_document(delay_ms: int) -> dict[str, Any]:
    def node(node_id: str, node_type: str, label: str | None = None, **params: Any) -> Any:
        data: dict[str, Any] = {"nodeType": node_type, "params": params}
        if label:
            data["label"] = label
        return {"id": node_id, "type": "basedNode", "position": {"x": 0, "y": 0}, "data": data}

    return {
        "name": f"batch benchmark {delay_ms} ms",
        "nodes": [
            node("prompt", "input:text", PROMPT_LABEL),
            node("gen", "generate:sandbox", width=IMAGE_SIZE, height=IMAGE_SIZE, delayMs=delay_ms),
            node("out", "output:image"),
        ],
        "edges": [
            {
                "id": "e1",
                "source": "prompt",
                "sourceHandle": "text",
                "target": "gen",
                "targetHandle": "prompt",
            },
            {
                "id": "e2",
                "source": "gen",
                "sourceHandle": "image",
                "target": "out",
                "targetHandle": "image",
            },
        ],
    }


def prompts(count: int, nonce: str) -> list[dict[str, str]]:
    return [
        {PROMPT_LABEL: f"a product shot on marble, item {i:06d} ({nonce})"} for i in range(count)
    ]


async def direct_baseline(items: int, concurrency: int, delay_ms: int) -> float:
    """The same renders after the same waits, under a semaphore, in this process."""
    gate = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()

    async def one(index: int) -> None:
        async with gate:
            await asyncio.sleep(delay_ms / 1000)
            await loop.run_in_executor(
                None, render, f"item {index}", "", index, IMAGE_SIZE, IMAGE_SIZE, 20, 7.5
            )

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(items)))
    return time.perf_counter() - started


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def run_batch(
    server: Server,
    items: Sequence[Mapping[str, Any]],
    delay_ms: int,
    concurrency: int,
) -> dict[str, Any]:
    """Post one batch and follow it to its end; times, peak running, read latencies."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=300) as client:
        saved = await client.post(f"{API}/workflows", json=workflow_document(delay_ms))
        saved.raise_for_status()
        body = {"workflowId": saved.json()["id"], "items": list(items), "concurrency": concurrency}
        started = time.perf_counter()
        created = await client.post(f"{API}/batches", json=body)
        accepted_s = time.perf_counter() - started
        created.raise_for_status()
        batch_id = created.json()["batchId"]
        reads: list[float] = []
        peak_running = 0
        while True:
            before = time.perf_counter()
            response = await client.get(f"{API}/batches/{batch_id}")
            reads.append((time.perf_counter() - before) * 1000)
            state = response.json()
            peak_running = max(peak_running, state["counts"]["running"])
            if state["status"] != "RUNNING":
                break
            await asyncio.sleep(POLL_SECONDS)
        client_wall = time.perf_counter() - started
        server_wall = (_parse(state["finishedAt"]) - _parse(state["createdAt"])).total_seconds()
        executions = 0
        cursor = None
        while True:
            page = await client.get(
                f"{API}/workflows/executions",
                params={"limit": 200, **({"cursor": cursor} if cursor else {})},
            )
            found = page.json()
            executions += len(found["items"])
            cursor = found["nextCursor"]
            if cursor is None:
                break
    return {
        "items": len(items),
        "status": state["status"],
        "counts": state["counts"],
        "executions": executions,
        "accept_request_s": r3(accepted_s),
        "wall_s": r3(server_wall),
        "client_wall_s": r3(client_wall),
        "peak_running_seen": peak_running,
        "progress_read_ms_p50": r3(median(reads)),
        "progress_read_ms_p95": r3(percentile(reads, 95)),
    }


async def phase(
    root: Path, name: str, items: Sequence[Mapping[str, Any]], delay_ms: int, concurrency: int
) -> dict[str, Any]:
    server = Server(root, name, SERVER_ENV)
    with running(server):
        await asyncio.sleep(0.5)
        server.record_idle()
        progress(f"{name}: {len(items)} items, delayMs={delay_ms}, concurrency {concurrency}")
        result = await run_batch(server, items, delay_ms, concurrency)
        server.record_phase(name)
        result["memory"] = server.memory_report()
    progress(f"{name}: {result['wall_s']} s")
    return result


async def benchmark(cfg: Config, root: Path) -> dict[str, Any]:
    nonce = uuid.uuid4().hex[:8]
    ideal = cfg.ideal_s(cfg.items, cfg.delay_ms)
    progress("direct baseline")
    direct_s = await direct_baseline(cfg.items, cfg.concurrency, cfg.delay_ms)

    main = await phase(root, "batch", prompts(cfg.items, nonce), cfg.delay_ms, cfg.concurrency)
    main["ideal_s"] = ideal
    main["direct_baseline_s"] = r3(direct_s)
    main["ratio_to_ideal"] = ratio(main["wall_s"], ideal)
    main["ratio_to_direct"] = ratio(main["wall_s"], direct_s)

    big = await phase(
        root,
        "memory",
        prompts(cfg.memory_items, nonce + "m"),
        cfg.memory_delay_ms,
        cfg.concurrency,
    )
    big["ideal_s"] = cfg.ideal_s(cfg.memory_items, cfg.memory_delay_ms)
    big["ratio_to_ideal"] = ratio(big["wall_s"], big["ideal_s"])

    half = cfg.dedupe_items // 2
    unique = prompts(half, nonce + "d")
    with_duplicates = [unique[i % half] for i in range(cfg.dedupe_items)]
    deduped = await phase(root, "dedupe", with_duplicates, cfg.delay_ms, cfg.concurrency)
    distinct = await phase(
        root, "distinct", prompts(cfg.dedupe_items, nonce + "u"), cfg.delay_ms, cfg.concurrency
    )
    dedupe = {
        "items": cfg.dedupe_items,
        "duplicates": cfg.dedupe_items - half,
        "executions_with_duplicates": deduped["executions"],
        "executions_distinct": distinct["executions"],
        "work_ratio": ratio(deduped["executions"], distinct["executions"]),
        "wall_s_with_duplicates": deduped["wall_s"],
        "wall_s_distinct": distinct["wall_s"],
        "wall_ratio": ratio(deduped["wall_s"], distinct["wall_s"]),
        "completed_with_duplicates": deduped["counts"]["completed"],
    }
    peak_small = main["memory"]["peak_rss_mb"]
    peak_big = big["memory"]["peak_rss_mb"]
    return {
        "batch": main,
        "memory": {
            "items_small": cfg.items,
            "items_big": cfg.memory_items,
            "peak_rss_mb_small": peak_small,
            "peak_rss_mb_big": peak_big,
            "ratio_big_to_small": ratio(peak_big, peak_small),
            "accept_request_s_big": big["accept_request_s"],
            "progress_read_ms_p95_big": big["progress_read_ms_p95"],
            "wall_s_big": big["wall_s"],
            "ratio_to_ideal_big": big["ratio_to_ideal"],
        },
        "dedupe": dedupe,
        "targets": {
            "wall_within_1_10_of_ideal": (main["ratio_to_ideal"] or 99) <= 1.10,
            "memory_flat_within_1_25": (ratio(peak_big, peak_small) or 99) <= 1.25,
            "dedupe_half_the_work": dedupe["work_ratio"] == 0.5,
            "every_item_completed": all(
                p["counts"]["completed"] == p["items"] for p in (main, big, deduped, distinct)
            ),
        },
    }


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    args = parser.parse_args(argv)
    cfg = Config.small() if args.quick else Config.full()
    signal.signal(signal.SIGTERM, _terminate)
    started = time.perf_counter()
    machine_info = machine()
    root = Path(tempfile.mkdtemp(prefix="imagegraph-bench-batch-"))
    try:
        results = asyncio.run(benchmark(cfg, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    machine_info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "benchmark": "batch",
        "quick": cfg.quick,
        "duration_s": round(time.perf_counter() - started, 1),
        "machine": machine_info,
        "settings": {
            "workflow": f"input:text -> generate:sandbox {IMAGE_SIZE}x{IMAGE_SIZE} "
            "(delayMs) -> output:image",
            "items": cfg.items,
            "concurrency": cfg.concurrency,
            "delay_ms": cfg.delay_ms,
            "memory_items": cfg.memory_items,
            "memory_delay_ms": cfg.memory_delay_ms,
            "dedupe_items": cfg.dedupe_items,
            "server_env": SERVER_ENV,
        },
        **results,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
