"""Orchestration benchmark: what the engine costs on top of the node work it runs.

    python benchmarks/orchestration.py [--quick]

Prints one JSON object on stdout (progress goes to stderr). Every measurement is compared
with a baseline measured in the same run:

(a) throughput and per-node overhead of a 5-node sandbox workflow
    (input:text -> prompt:template -> generate:sandbox 256x256 -> image:resize ->
    output:image) submitted over HTTP to a real `imagegraph serve` subprocess (fresh data
    directory, SQLite, synchronous=NORMAL; the throughput and latency runs are repeated on a
    second server with synchronous=FULL). The baseline is the same five node functions
    called directly in this process with a minimal context that keeps images in a dict.
(b) executions that each wait `delayMs` in the sandbox, against the ideal wall time
    executions / concurrency * delay.
(c) chains of K cheap image:resize nodes: overhead per node against direct calls, per K.
(d) server memory: VmRSS when idle after startup and VmHWM (peak) after each phase.

Every execution uses a prompt no other execution uses, so the node output cache never
answers. Nothing here asserts on speed; `targets` reports how the numbers compare with the
goals for a small (2-core) machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import aiohttp
import httpx
import PIL

import imagegraph
from imagegraph.nodes import builtin_registry
from imagegraph.nodes.base import Node, NodeParams
from imagegraph.settings import Settings
from imagegraph.testing import MemoryContext

T = TypeVar("T")

API = "/api/v1"
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
LONG_POLL_SECONDS = 30
PROMPT_LABEL = "Prompt"

# Goals on a 2-core machine; reported, never asserted.
TARGET_EXECUTIONS_PER_S = 100.0
TARGET_OVERHEAD_MS_PER_NODE = 1.0
TARGET_DELAYED_RATIO = 1.10
TARGET_CHAIN_FLAT_RATIO = 1.25  # overhead per node at the largest K vs K=8, at most this
TARGET_IDLE_RSS_MB = 200.0


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    quick: bool
    warmup: int
    overhead_runs: int
    throughput_executions: int
    throughput_concurrency: int
    delayed_executions: int
    delayed_concurrency: int
    delay_ms: int
    chain_ks: tuple[int, ...]
    chain_runs: int
    image_size: int = 256
    resize_size: int = 128
    chain_size: int = 64

    @classmethod
    def full(cls) -> Config:
        return cls(
            quick=False,
            warmup=5,
            overhead_runs=50,
            throughput_executions=500,
            throughput_concurrency=32,
            delayed_executions=200,
            delayed_concurrency=50,
            delay_ms=1000,
            chain_ks=(1, 8, 32, 128, 256),
            chain_runs=5,
        )

    @classmethod
    def small(cls) -> Config:
        return cls(
            quick=True,
            warmup=2,
            overhead_runs=10,
            throughput_executions=60,
            throughput_concurrency=32,
            delayed_executions=20,
            delayed_concurrency=10,
            delay_ms=1000,
            chain_ks=(1, 8, 32),
            chain_runs=2,
        )


# -- workflows, described once for both the HTTP document and the direct calls --------------


@dataclass(frozen=True)
class Step:
    """One node of a linear workflow; `wires` maps its input ports to (step id, output port)."""

    id: str
    type: str
    params: Mapping[str, Any]
    wires: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    label: str | None = None


def pipeline_steps(cfg: Config, delay_ms: int = 0) -> list[Step]:
    """input:text -> prompt:template -> generate:sandbox -> image:resize -> output:image."""
    return [
        Step("prompt", "input:text", {"text": "placeholder"}, label=PROMPT_LABEL),
        Step(
            "template",
            "prompt:template",
            {"template": "${subject}, highly detailed"},
            {"subject": ("prompt", "text")},
        ),
        Step(
            "gen",
            "generate:sandbox",
            {
                "width": cfg.image_size,
                "height": cfg.image_size,
                "seed": 7,
                "delayMs": delay_ms,
            },
            {"prompt": ("template", "text")},
        ),
        Step(
            "resize",
            "image:resize",
            {"width": cfg.resize_size, "height": cfg.resize_size, "mode": "contain"},
            {"image": ("gen", "image")},
        ),
        Step("out", "output:image", {}, {"image": ("resize", "image")}),
    ]


def chain_steps(cfg: Config, k: int) -> list[Step]:
    """input:text -> generate:sandbox 64x64 -> k x image:resize (exact) -> output:image."""
    size = cfg.chain_size
    steps = [
        Step("prompt", "input:text", {"text": "placeholder"}, label=PROMPT_LABEL),
        Step(
            "gen",
            "generate:sandbox",
            {"width": size, "height": size, "seed": 7},
            {"prompt": ("prompt", "text")},
        ),
    ]
    previous = "gen"
    for i in range(k):
        side = size if i % 2 else size - 1  # alternate 63 and 64 so every resize does work
        step_id = f"r{i}"
        steps.append(
            Step(
                step_id,
                "image:resize",
                {"width": side, "height": side, "mode": "exact"},
                {"image": (previous, "image")},
            )
        )
        previous = step_id
    steps.append(Step("out", "output:image", {}, {"image": (previous, "image")}))
    return steps


def workflow_document(name: str, steps: Sequence[Step]) -> dict[str, Any]:
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    for index, step in enumerate(steps):
        data: dict[str, Any] = {"nodeType": step.type, "params": dict(step.params)}
        if step.label is not None:
            data["label"] = step.label
        nodes.append(
            {
                "id": step.id,
                "type": "basedNode",
                "position": {"x": index * 200, "y": 0},
                "data": data,
            }
        )
        for port, (source, source_port) in step.wires.items():
            edges.append(
                {
                    "id": f"{source}.{source_port}-{step.id}.{port}",
                    "source": source,
                    "sourceHandle": source_port,
                    "target": step.id,
                    "targetHandle": port,
                }
            )
    return {"name": name, "nodes": nodes, "edges": edges}


class Prompts:
    """Prompts no two executions share (in this run or any other), all of the same length."""

    def __init__(self) -> None:
        self._nonce = uuid.uuid4().hex[:8]
        self._count = 0

    def next(self) -> str:
        self._count += 1
        return f"a red fox in the snow, study {self._count:07d} ({self._nonce})"


# -- the direct baseline: node functions called in-process --------------------------------------


class DirectPipeline:
    """The node functions of a linear workflow, called one after the other in-process."""

    def __init__(self, steps: Sequence[Step]) -> None:
        registry = builtin_registry()
        self._steps: list[tuple[Step, Node[Any], NodeParams]] = []
        for step in steps:
            node = registry[step.type]
            self._steps.append((step, node, node.parse_params(step.params)))
        # The server's limit: its defaults, not this process's environment.
        self._max_pixels = Settings.model_validate(
            {"data_dir": tempfile.gettempdir()}
        ).max_image_pixels

    async def run(self, prompt: str) -> float:
        """Run once with this prompt; returns the wall time in milliseconds."""
        started = time.perf_counter()
        # Images are encoded as the engine encodes them, but kept in memory.
        ctx = MemoryContext(max_pixels=self._max_pixels)
        outputs: dict[str, Mapping[str, Any]] = {}
        for step, node, params in self._steps:
            if step.label == PROMPT_LABEL and node.input_param is not None:
                params = node.parse_params({**step.params, node.input_param: prompt})
            inputs = {port: outputs[src][src_port] for port, (src, src_port) in step.wires.items()}
            ctx.node_id = step.id
            outputs[step.id] = await node.run(ctx.as_context(), params, inputs)
        return (time.perf_counter() - started) * 1000


async def measure_direct(
    steps: Sequence[Step], prompts: Prompts, runs: int, warmup: int
) -> list[float]:
    pipeline = DirectPipeline(steps)
    for _ in range(warmup):
        await pipeline.run(prompts.next())
    return [await pipeline.run(prompts.next()) for _ in range(runs)]


# -- the server under test ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command() -> list[str]:
    script = Path(sys.executable).with_name("imagegraph")
    if script.exists():
        return [str(script)]
    found = shutil.which("imagegraph")
    if found:
        return [found]
    return [sys.executable, "-c", "from imagegraph.cli import main; main()"]


def child_pids(pid: int) -> list[int]:
    """The live child processes of a process (the server's worker processes), from /proc."""
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as children:
                found += [int(child) for child in children.read().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return found


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process and its live children have used (all their
    threads), from /proc."""
    total = 0.0
    for each in [pid, *child_pids(pid)]:
        try:
            with open(f"/proc/{each}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def read_status_kb(pid: int, key: str) -> int:
    """A /proc status figure of a process plus those of its live children (memory of the
    server and its worker processes, together)."""
    total = 0
    for each in [pid, *child_pids(pid)]:
        try:
            with open(f"/proc/{each}/status", encoding="ascii") as status:
                total += next(
                    (int(line.split()[1]) for line in status if line.startswith(key + ":")), 0
                )
        except FileNotFoundError:
            continue
    return total


class Server:
    """`imagegraph serve` in a subprocess on a free port with its own data directory."""

    def __init__(self, root: Path, name: str, env_overrides: Mapping[str, str]) -> None:
        self.name = name
        self.data_dir = root / f"data-{name}"
        self.log_path = root / f"server-{name}.log"
        self.env_overrides = dict(env_overrides)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.phases: list[dict[str, Any]] = []
        self.idle_rss_mb = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_key(self) -> str:
        """The admin key the server made on its first start."""
        return (self.data_dir / "admin.key").read_text().strip()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, attempts: int = 3) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGRAPH_")}
        env.update(self.env_overrides)
        for attempt in range(1, attempts + 1):
            self.port = free_port()
            command = [
                *server_command(),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
            ]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            if self._wait_ready(timeout=60):
                progress(f"server {self.name} ready on port {self.port} (pid {self.proc.pid})")
                return
            self.stop()
            progress(f"server {self.name} did not start (attempt {attempt}); log tail:")
            print(self.log_tail(), file=sys.stderr)
        raise RuntimeError(f"server {self.name} did not start; see the log above")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base_url, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.get("/readyz").status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def rss_mb(self) -> float:
        return read_status_kb(self.pid, "VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        return read_status_kb(self.pid, "VmHWM") / 1024

    def record_idle(self) -> None:
        self.idle_rss_mb = round(self.rss_mb(), 1)

    def record_phase(self, phase: str) -> None:
        self.phases.append(
            {
                "phase": phase,
                "rss_mb": round(self.rss_mb(), 1),
                "peak_rss_mb": round(self.peak_rss_mb(), 1),
            }
        )

    def memory_report(self) -> dict[str, Any]:
        peak = max((p["peak_rss_mb"] for p in self.phases), default=self.idle_rss_mb)
        return {
            "idle_rss_mb": self.idle_rss_mb,
            "phases": self.phases,
            "peak_rss_mb": peak,
            "ratio_peak_to_idle": ratio(peak, self.idle_rss_mb),
        }


@contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


# -- the HTTP client side ------------------------------------------------------------------------


@dataclass
class Outcome:
    execution_id: str
    status: str
    latency_ms: float


async def request(
    client: aiohttp.ClientSession,
    method: str,
    path: str,
    expected: int,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
) -> Any:
    async with client.request(method, path, json=body, headers=headers) as response:
        if response.status != expected:
            text = await response.text()
            raise RuntimeError(f"{method} {path} gave {response.status}: {text[:500]}")
        return await response.json()


async def create_workflow(client: aiohttp.ClientSession, document: Mapping[str, Any]) -> str:
    created = await request(client, "POST", f"{API}/workflows", 201, document)
    return str(created["id"])


async def execute_and_wait(client: aiohttp.ClientSession, workflow_id: str, prompt: str) -> Outcome:
    """POST execute, then long-poll until the execution ends."""
    started = time.perf_counter()
    execution_id = await submit_execution(client, workflow_id, prompt)
    status = await wait_for_end(client, execution_id)
    return Outcome(execution_id, status, (time.perf_counter() - started) * 1000)


async def submit_execution(client: aiohttp.ClientSession, workflow_id: str, prompt: str) -> str:
    """POST execute with `prompt` as the workflow's input; the execution's id."""
    queued = await request(
        client,
        "POST",
        f"{API}/workflows/{workflow_id}/execute",
        201,
        {"inputs": {PROMPT_LABEL: prompt}},
    )
    return str(queued["executionId"])


async def wait_for_end(client: aiohttp.ClientSession, execution_id: str) -> str:
    """Long-poll until the execution ends; its terminal status."""
    while True:
        polled = await request(
            client,
            "GET",
            f"{API}/workflows/executions/{execution_id}/poll",
            200,
            headers={"Prefer": f"wait={LONG_POLL_SECONDS}"},
        )
        status = str(polled["status"])
        if status in TERMINAL:
            return status


def http_client(base_url: str, concurrency: int, api_key: str) -> aiohttp.ClientSession:
    """The load generator shares the machine with the server, so it should cost as little
    CPU as it can: aiohttp spends about a third of what httpx does per request here."""
    return aiohttp.ClientSession(
        base_url=base_url,
        headers={"Authorization": f"Bearer {api_key}"},
        connector=aiohttp.TCPConnector(limit=concurrency + 4),
        timeout=aiohttp.ClientTimeout(total=LONG_POLL_SECONDS + 30, connect=10),
    )


async def run_sequential(
    client: aiohttp.ClientSession, workflow_id: str, prompts: Prompts, runs: int
) -> list[Outcome]:
    return [await execute_and_wait(client, workflow_id, prompts.next()) for _ in range(runs)]


async def run_interleaved(
    client: aiohttp.ClientSession,
    workflow_id: str,
    direct: DirectPipeline,
    prompts: Prompts,
    runs: int,
) -> tuple[list[Outcome], list[float]]:
    """One execution through the server, then the same nodes called directly, `runs` times:
    both see the machine in the same state, so its drift cancels out of their difference."""
    outcomes: list[Outcome] = []
    direct_ms: list[float] = []
    for _ in range(runs):
        outcomes.append(await execute_and_wait(client, workflow_id, prompts.next()))
        direct_ms.append(await direct.run(prompts.next()))
    return outcomes, direct_ms


async def run_concurrent(
    client: aiohttp.ClientSession,
    workflow_id: str,
    prompts: Prompts,
    executions: int,
    concurrency: int,
) -> tuple[float, list[Outcome]]:
    """`executions` executions by `concurrency` client tasks; returns (wall seconds, outcomes)
    with the wall time counted from the first submit to the last completion."""
    queue = [prompts.next() for _ in range(executions)]
    outcomes: list[Outcome] = []

    async def client_task() -> None:
        while queue:
            outcomes.append(await execute_and_wait(client, workflow_id, queue.pop()))

    started = time.perf_counter()
    await asyncio.gather(*(client_task() for _ in range(min(concurrency, executions))))
    return time.perf_counter() - started, outcomes


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def server_side_ms(client: aiohttp.ClientSession, outcomes: Sequence[Outcome]) -> list[float]:
    """createdAt -> finishedAt of each execution as the server recorded it (read afterwards,
    so reading it costs the measured runs nothing)."""
    spans = []
    for outcome in outcomes:
        record = await request(
            client, "GET", f"{API}/workflows/executions/{outcome.execution_id}", 200
        )
        if record.get("finishedAt") and record.get("createdAt"):
            span = _parse_time(record["finishedAt"]) - _parse_time(record["createdAt"])
            spans.append(span.total_seconds() * 1000)
    return spans


# -- statistics ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def r3(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else round(value, 3)


def ratio(numerator: float, denominator: float) -> float | None:
    if denominator == 0 or math.isnan(numerator) or math.isnan(denominator):
        return None
    return r3(numerator / denominator)


def failed(outcomes: Sequence[Outcome]) -> int:
    return sum(1 for o in outcomes if o.status != "COMPLETED")


# -- the phases ------------------------------------------------------------------------------------


@dataclass
class Baselines:
    pipeline_ms: list[float]
    chain_ms: dict[int, list[float]]


async def measure_baselines(cfg: Config, prompts: Prompts) -> Baselines:
    progress(f"direct baseline: {cfg.overhead_runs} runs of the 5-node pipeline in-process")
    pipeline_ms = await measure_direct(pipeline_steps(cfg), prompts, cfg.overhead_runs, cfg.warmup)
    chain_ms = {}
    for k in cfg.chain_ks:
        runs = max(cfg.chain_runs, 5)
        progress(f"direct baseline: {runs} runs of the chain with K={k}")
        chain_ms[k] = await measure_direct(chain_steps(cfg, k), prompts, runs, 1)
    return Baselines(pipeline_ms, chain_ms)


def overhead_report(
    outcomes: Sequence[Outcome], spans: Sequence[float], direct_ms: Sequence[float], nodes: int
) -> dict[str, Any]:
    """Engine overhead: the execution as the server recorded it (created -> finished) against
    the same node functions called directly. End to end: as the HTTP client saw it, which
    adds two requests (execute, poll) per execution."""
    latencies = [o.latency_ms for o in outcomes]
    direct = median(direct_ms)
    if len(direct_ms) == len(spans) == len(latencies):  # interleaved: compare pairs
        per_node = [(span - d) / nodes for span, d in zip(spans, direct_ms, strict=True)]
        end_to_end = [(lat - d) / nodes for lat, d in zip(latencies, direct_ms, strict=True)]
    else:
        per_node = [(span - direct) / nodes for span in spans]
        end_to_end = [(latency - direct) / nodes for latency in latencies]
    return {
        "runs": len(outcomes),
        "failed": failed(outcomes),
        "nodes": nodes,
        "engine_latency_ms_median": r3(median(latencies)),
        "engine_latency_ms_p95": r3(percentile(latencies, 95)),
        "server_side_ms_median": r3(median(spans)),
        "overhead_ms_per_node_median": r3(median(per_node)),
        "overhead_ms_per_node_p95": r3(percentile(per_node, 95)),
        "end_to_end_overhead_ms_per_node_median": r3(median(end_to_end)),
        "end_to_end_overhead_ms_per_node_p95": r3(percentile(end_to_end, 95)),
        "direct_ms_median": r3(direct),
        "ratio_engine_to_direct": ratio(median(spans), direct),
        "ratio_end_to_end_to_direct": ratio(median(latencies), direct),
    }


def throughput_report(
    wall_s: float, outcomes: Sequence[Outcome], concurrency: int, direct_per_s: float
) -> dict[str, Any]:
    latencies = [o.latency_ms for o in outcomes]
    per_s = len(outcomes) / wall_s if wall_s > 0 else math.nan
    return {
        "executions": len(outcomes),
        "failed": failed(outcomes),
        "concurrency": concurrency,
        "wall_s": r3(wall_s),
        "executions_per_s": r3(per_s),
        "latency_ms_p50": r3(median(latencies)),
        "latency_ms_p95": r3(percentile(latencies, 95)),
        "ratio_to_direct": ratio(per_s, direct_per_s),
        "ratio_to_target": ratio(per_s, TARGET_EXECUTIONS_PER_S),
    }


async def pipeline_phases(
    cfg: Config, server: Server, prompts: Prompts, baselines: Baselines
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(a) on one server: sequential latency (overhead per node), then throughput."""
    direct_per_s = 1000 / median(baselines.pipeline_ms)
    async with http_client(server.base_url, cfg.throughput_concurrency, server.api_key) as client:
        workflow_id = await create_workflow(client, workflow_document("bench", pipeline_steps(cfg)))
        progress(f"[{server.name}] warm-up: {cfg.warmup} executions")
        await run_sequential(client, workflow_id, prompts, cfg.warmup)

        progress(
            f"[{server.name}] overhead: {cfg.overhead_runs} executions one at a time, each "
            "followed by a direct run of the same nodes"
        )
        direct = DirectPipeline(pipeline_steps(cfg))
        sequential, direct_ms = await run_interleaved(
            client, workflow_id, direct, prompts, cfg.overhead_runs
        )
        spans = await server_side_ms(client, sequential)
        overhead = overhead_report(sequential, spans, direct_ms, nodes=5)
        server.record_phase("overhead")
        progress(f"[{server.name}] overhead per node: {overhead['overhead_ms_per_node_median']} ms")

        progress(
            f"[{server.name}] throughput: {cfg.throughput_executions} executions at "
            f"concurrency {cfg.throughput_concurrency}"
        )
        client_cpu = time.process_time()
        server_cpu = process_cpu_seconds(server.pid)
        wall, outcomes = await run_concurrent(
            client, workflow_id, prompts, cfg.throughput_executions, cfg.throughput_concurrency
        )
        server_cpu = process_cpu_seconds(server.pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
        throughput = throughput_report(wall, outcomes, cfg.throughput_concurrency, direct_per_s)
        throughput["client_cpu_ms_per_execution"] = r3(client_cpu * 1000 / len(outcomes))
        # Steadier than executions/s when the machine's speed drifts between runs.
        throughput["server_cpu_ms_per_execution"] = r3(server_cpu * 1000 / len(outcomes))
        server.record_phase("throughput")
        progress(f"[{server.name}] throughput: {throughput['executions_per_s']} executions/s")
    return overhead, throughput


async def delayed_phase(
    cfg: Config, server: Server, prompts: Prompts, baselines: Baselines
) -> dict[str, Any]:
    """(b) executions that wait delayMs in the sandbox, at high client concurrency."""
    ideal = cfg.delayed_executions / cfg.delayed_concurrency * cfg.delay_ms / 1000
    cpus = os.cpu_count() or 1
    cpu_s = cfg.delayed_executions * median(baselines.pipeline_ms) / 1000 / cpus
    async with http_client(server.base_url, cfg.delayed_concurrency, server.api_key) as client:
        document = workflow_document("bench-delayed", pipeline_steps(cfg, delay_ms=cfg.delay_ms))
        workflow_id = await create_workflow(client, document)
        progress(
            f"[{server.name}] delayed: {cfg.delayed_executions} executions of "
            f"{cfg.delay_ms} ms at concurrency {cfg.delayed_concurrency} (ideal {ideal:g} s)"
        )
        wall, outcomes = await run_concurrent(
            client, workflow_id, prompts, cfg.delayed_executions, cfg.delayed_concurrency
        )
    server.record_phase("delayed")
    latencies = [o.latency_ms for o in outcomes]
    progress(f"[{server.name}] delayed: wall {wall:.2f} s")
    return {
        "executions": len(outcomes),
        "failed": failed(outcomes),
        "concurrency": cfg.delayed_concurrency,
        "delay_ms": cfg.delay_ms,
        "wall_s": r3(wall),
        "ideal_s": r3(ideal),
        "ratio_wall_to_ideal": ratio(wall, ideal),
        # The ideal plus the node work itself (direct baseline) spread over every core.
        "ideal_plus_node_cpu_s": r3(ideal + cpu_s),
        "ratio_wall_to_ideal_plus_node_cpu": ratio(wall, ideal + cpu_s),
        "latency_ms_p50": r3(median(latencies)),
        "latency_ms_p95": r3(percentile(latencies, 95)),
    }


async def chain_phase(
    cfg: Config, server: Server, prompts: Prompts, baselines: Baselines
) -> dict[str, Any]:
    """(c) chains of K resize nodes, a few executions each, one at a time."""
    rows: list[dict[str, Any]] = []
    async with http_client(server.base_url, 4, server.api_key) as client:
        for k in cfg.chain_ks:
            steps = chain_steps(cfg, k)
            workflow_id = await create_workflow(client, workflow_document(f"chain-{k}", steps))
            progress(f"[{server.name}] chain K={k}: 1 warm-up + {cfg.chain_runs} executions")
            await run_sequential(client, workflow_id, prompts, 1)
            outcomes = await run_sequential(client, workflow_id, prompts, cfg.chain_runs)
            spans = await server_side_ms(client, outcomes)
            latency = median([o.latency_ms for o in outcomes])
            engine = median(spans)
            direct = median(baselines.chain_ms[k])
            rows.append(
                {
                    "k": k,
                    "nodes": len(steps),
                    "runs": len(outcomes),
                    "failed": failed(outcomes),
                    "direct_ms_median": r3(direct),
                    "engine_latency_ms_median": r3(latency),
                    "server_side_ms_median": r3(engine),
                    "overhead_ms": r3(engine - direct),
                    "overhead_ms_per_node": r3((engine - direct) / k),
                    "end_to_end_overhead_ms_per_node": r3((latency - direct) / k),
                }
            )
            progress(f"[{server.name}] chain K={k}: {rows[-1]['overhead_ms_per_node']} ms/node")
    server.record_phase("chains")

    by_k = {row["k"]: row for row in rows}
    first = rows[0]
    for row in rows:
        # Overhead per node added beyond the smallest chain: the fixed costs (HTTP, the other
        # nodes) cancel out, so a flat engine shows the same number for every K.
        added = row["k"] - first["k"]
        row["marginal_overhead_ms_per_added_node"] = (
            r3((row["overhead_ms"] - first["overhead_ms"]) / added) if added else None
        )
    largest = max(cfg.chain_ks)
    base = by_k.get(8)
    top = by_k[largest]
    return {
        "runs_per_k": cfg.chain_runs,
        "per_k": rows,
        "largest_k": largest,
        "ratio_overhead_per_node_largest_k_to_k8": (
            ratio(top["overhead_ms_per_node"], base["overhead_ms_per_node"]) if base else None
        ),
        "ratio_marginal_overhead_largest_k_to_k8": (
            ratio(
                top["marginal_overhead_ms_per_added_node"],
                base["marginal_overhead_ms_per_added_node"],
            )
            if base and base["marginal_overhead_ms_per_added_node"]
            else None
        ),
    }


def server_env(synchronous: str) -> dict[str, str]:
    return {"IMAGEGRAPH_SQLITE_SYNCHRONOUS": synchronous, "IMAGEGRAPH_LOG_LEVEL": "WARNING"}


def effective_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """The engine settings the server runs with (our env over the defaults)."""
    # model_validate reads no environment: the server's env holds only what we set.
    settings = Settings.model_validate(
        {
            "data_dir": tempfile.gettempdir(),
            "sqlite_synchronous": env["IMAGEGRAPH_SQLITE_SYNCHRONOUS"],
            "log_level": env["IMAGEGRAPH_LOG_LEVEL"],
        }
    )
    keys = (
        "sqlite_synchronous",
        "log_level",
        "max_concurrent_nodes",
        "cpu_threads",
        "db_threads",
        "lease_seconds",
        "poll_interval_seconds",
        "image_cache_bytes",
        "node_max_attempts",
    )
    values = settings.model_dump(include=set(keys))
    values["database"] = "sqlite (fresh temporary data directory)"
    return values


async def benchmark(cfg: Config, root: Path) -> dict[str, Any]:
    prompts = Prompts()
    baselines = await measure_baselines(cfg, prompts)
    direct_ms = baselines.pipeline_ms
    direct_per_s = 1000 / median(direct_ms)

    normal = Server(root, "normal", server_env("NORMAL"))
    with running(normal):
        await asyncio.sleep(0.5)
        normal.record_idle()
        overhead_normal, throughput_normal = await pipeline_phases(cfg, normal, prompts, baselines)
        delayed = await delayed_phase(cfg, normal, prompts, baselines)
        chains = await chain_phase(cfg, normal, prompts, baselines)

    full = Server(root, "full", server_env("FULL"))
    with running(full):
        await asyncio.sleep(0.5)
        full.record_idle()
        overhead_full, throughput_full = await pipeline_phases(cfg, full, prompts, baselines)

    throughput_full["ratio_to_normal"] = ratio(
        throughput_full["executions_per_s"] or math.nan,
        throughput_normal["executions_per_s"] or math.nan,
    )
    direct = {
        "runs": len(direct_ms),
        "ms_median": r3(median(direct_ms)),
        "ms_p95": r3(percentile(direct_ms, 95)),
    }
    chain_ratio = chains["ratio_overhead_per_node_largest_k_to_k8"]
    return {
        "throughput": {
            "target_executions_per_s": TARGET_EXECUTIONS_PER_S,
            "direct_baseline": {"executions_per_s": r3(direct_per_s), **direct},
            "sqlite_normal": throughput_normal,
            "sqlite_full": throughput_full,
        },
        "overhead": {
            "target_ms_per_node": TARGET_OVERHEAD_MS_PER_NODE,
            "direct_baseline": direct,
            "sqlite_normal": overhead_normal,
            "sqlite_full": overhead_full,
        },
        "delayed": {"target_ratio": TARGET_DELAYED_RATIO, **delayed},
        "chains": {"target_flat_ratio_max": TARGET_CHAIN_FLAT_RATIO, **chains},
        "memory": {
            "target_idle_rss_mb": TARGET_IDLE_RSS_MB,
            "sqlite_normal": normal.memory_report(),
            "sqlite_full": full.memory_report(),
        },
        "targets": {
            "throughput_met": _at_least(
                throughput_normal["executions_per_s"], TARGET_EXECUTIONS_PER_S
            ),
            "overhead_met": _at_most(
                overhead_normal["overhead_ms_per_node_median"], TARGET_OVERHEAD_MS_PER_NODE
            ),
            "delayed_met": _at_most(delayed["ratio_wall_to_ideal"], TARGET_DELAYED_RATIO),
            "chains_flat_met": _at_most(chain_ratio, TARGET_CHAIN_FLAT_RATIO),
            "idle_rss_met": _at_most(normal.idle_rss_mb, TARGET_IDLE_RSS_MB),
        },
    }


def _at_least(value: float | None, target: float) -> bool:
    return value is not None and value >= target


def _at_most(value: float | None, target: float) -> bool:
    return value is not None and value <= target


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "imagegraph_version": imagegraph.__version__,
        "pillow_version": PIL.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # Turn SIGTERM into SystemExit so the finally blocks stop the server and remove the dir.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="small counts: a smoke test in under a minute"
    )
    args = parser.parse_args(argv)
    cfg = Config.small() if args.quick else Config.full()
    signal.signal(signal.SIGTERM, _terminate)

    started = time.perf_counter()
    started_at = datetime.now().astimezone().isoformat(timespec="seconds")
    machine_info = machine()
    root = Path(tempfile.mkdtemp(prefix="imagegraph-bench-"))
    try:
        results = asyncio.run(benchmark(cfg, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    machine_info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {
        "benchmark": "orchestration",
        "quick": cfg.quick,
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - started, 1),
        "machine": machine_info,
        "settings": {
            "counts": {
                "warmup": cfg.warmup,
                "overhead_runs": cfg.overhead_runs,
                "throughput_executions": cfg.throughput_executions,
                "throughput_concurrency": cfg.throughput_concurrency,
                "delayed_executions": cfg.delayed_executions,
                "delayed_concurrency": cfg.delayed_concurrency,
                "delay_ms": cfg.delay_ms,
                "chain_ks": list(cfg.chain_ks),
                "chain_runs": cfg.chain_runs,
            },
            "workflow": {
                "pipeline": "input:text -> prompt:template -> generate:sandbox "
                f"{cfg.image_size}x{cfg.image_size} -> image:resize contain "
                f"{cfg.resize_size}x{cfg.resize_size} -> output:image",
                "chain": f"input:text -> generate:sandbox {cfg.chain_size}x{cfg.chain_size} -> "
                "K x image:resize exact (63/64 alternating) -> output:image",
                "unique_prompt_per_execution": True,
            },
            "client": {
                "library": f"aiohttp {aiohttp.__version__} ClientSession, keep-alive",
                "long_poll": f"Prefer: wait={LONG_POLL_SECONDS}",
            },
            "server_env": {"normal": server_env("NORMAL"), "full": server_env("FULL")},
            "server_settings": {
                "normal": effective_settings(server_env("NORMAL")),
                "full": effective_settings(server_env("FULL")),
            },
        },
        **results,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
