"""Provider benchmark: hosted generations against the fal fake, under a concurrency cap.

    python benchmarks/providers.py [--quick]

Prints one JSON object on stdout (progress goes to stderr). A `FalFake` (fal's queue API,
`latency` seconds a job) runs in this process; a real `imagegraph serve` subprocess (fresh
data directory, SQLite) is pointed at it with fal's concurrency cap set to `cap` and room
for more node runs than that, so the cap, not the worker, is the limit. Each execution runs
input:text -> generate:flux_dev 256x256 -> output:image with a prompt no other execution
uses, so the node output cache never answers; all of them are submitted at once.

(direct) the baseline: the same fal jobs made by the server's `FalAdapter` (from a
    `ProviderHub`, so the same HTTP clients and result downloads) in this process under a
    plain semaphore of `cap` (submit, watch the status stream, download), no engine;
(clean) `executions` executions against the ideal wall time ceil(executions / cap) x
    latency, with the most jobs the fake saw in flight at once (the cap respected, and
    reached) and where the time between the ideal and the measured wall went;
(faults) the same with 10 % of fal's submit and status calls answered 429 (Retry-After 1)
    or 503 at random: every execution must end (COMPLETED or FAILED) and no paid job may
    be duplicated (every job the fake accepted is the recorded job of a node run).

The fake draws its pictures once per size and makes each job's bytes distinct with a PNG
text chunk: a real provider draws on its own machines, while the fake's sandbox drawing
(about 14 ms a job) would take this machine's cores from the server under test. Nothing
here asserts on speed; `targets` reports how the numbers compare with the goals.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

# Run as a script, this directory is on the path, not the checkout's `benchmarks` package.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from benchmarks.orchestration import (
    API,
    LONG_POLL_SECONDS,
    PROMPT_LABEL,
    TERMINAL,
    Outcome,
    Prompts,
    Server,
    Step,
    create_workflow,
    http_client,
    machine,
    median,
    percentile,
    process_cpu_seconds,
    progress,
    r3,
    ratio,
    request,
    running,
    submit_execution,
    wait_for_end,
    workflow_document,
)

from imagegraph.catalog import load_catalog
from imagegraph.providers.base import Request, Result
from imagegraph.providers.hub import KEY_VARIABLES, ProviderHub
from imagegraph.settings import Settings
from imagegraph.testing.fakes.fal import FalFake
from imagegraph.testing.fakes.server import Fault

NODE_TYPE = "generate:flux_dev"
GEN = "gen"
FAULT_ENDPOINTS = ("submit", "status")
FAULT_SEED = 20240601
BOOTSTRAP_CREDITS = 1_000_000  # the generations cost credits; never the limit here
WATCH_SECONDS = 30.0  # how long the direct baseline holds one status stream, as nodes do

# Goals; reported, never asserted.
TARGET_RATIO_TO_IDEAL = 1.10


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    quick: bool
    executions: int
    cap: int
    latency: float
    node_concurrency: int  # IMAGEGRAPH_MAX_CONCURRENT_NODES: well above the cap
    warmup: int
    deadline_s: float  # an execution not ended by then is reported as stuck
    fault_probability: float = 0.10
    image_size: int = 256
    # Execute requests the client has open at once (None: all of them at once). Long polls
    # are not counted: every execution is waited for at once.
    submit_concurrency: int | None = None

    @classmethod
    def full(cls) -> Config:
        return cls(
            quick=False,
            executions=500,
            cap=50,
            latency=1.0,
            node_concurrency=256,
            warmup=3,
            deadline_s=300.0,
        )

    @classmethod
    def small(cls) -> Config:
        return cls(
            quick=True,
            executions=60,
            cap=10,
            latency=0.3,
            node_concurrency=256,
            warmup=2,
            deadline_s=120.0,
        )

    @property
    def ideal_s(self) -> float:
        return math.ceil(self.executions / self.cap) * self.latency


def steps(cfg: Config) -> list[Step]:
    """input:text -> generate:flux_dev -> output:image."""
    size = cfg.image_size
    return [
        Step("prompt", "input:text", {"text": "placeholder"}, label=PROMPT_LABEL),
        Step(
            GEN,
            NODE_TYPE,
            {"width": size, "height": size, "seed": 7},
            {"prompt": ("prompt", "text")},
        ),
        Step("out", "output:image", {}, {"image": (GEN, "image")}),
    ]


# -- the fake ----------------------------------------------------------------------------------


class BenchFal(FalFake):
    """fal's queue API as `FalFake` speaks it, drawing each size's picture only once."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._pictures: dict[tuple[int, int, str], tuple[bytes, str]] = {}

    def image(
        self, prompt: str, seed: int, width: int, height: int, fmt: str = "png"
    ) -> tuple[bytes, str]:
        if fmt != "png":
            return super().image(prompt, seed, width, height, fmt)
        key = (width, height, fmt)
        if key not in self._pictures:
            self._pictures[key] = super().image("benchmark", 7, width, height, fmt)
        data, mime = self._pictures[key]
        return _with_png_text(data, f"{seed} {prompt}".encode()), mime


def _with_png_text(png: bytes, text: bytes) -> bytes:
    """`png` with a tEXt chunk after its header: other bytes, the same picture."""
    body = b"Comment\x00" + text
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + body))
    header_end = 8 + 25  # the signature, then IHDR (length, type, 13 bytes, CRC)
    return png[:header_end] + chunk + png[header_end:]


def fault_choices() -> list[Fault]:
    """What a faulted call gets: fal's 429 with Retry-After 1, or a 503."""
    return [
        Fault(status=429, body={"detail": "Rate limit exceeded"}, headers={"Retry-After": "1"}),
        Fault(status=503, body={"detail": "Service temporarily unavailable"}),
    ]


# -- the server under test -----------------------------------------------------------------------


def server_env(cfg: Config, fal: FalFake) -> dict[str, str]:
    env = {
        "IMAGEGRAPH_LOG_LEVEL": "WARNING",
        "IMAGEGRAPH_FAL_API_KEY": fal.api_key,
        "IMAGEGRAPH_FAL_BASE_URL": fal.url,
        "IMAGEGRAPH_PROVIDER_CONCURRENCY": json.dumps({"fal": cfg.cap}),
        "IMAGEGRAPH_MAX_CONCURRENT_NODES": str(cfg.node_concurrency),
        "IMAGEGRAPH_BOOTSTRAP_CREDITS": str(BOOTSTRAP_CREDITS),
    }
    # Keys of the developer's environment would configure the other routes of flux_dev
    # (real providers, real money) for when fal's circuit opens: empty keys configure none.
    for provider, variables in KEY_VARIABLES.items():
        if provider != "fal":
            env.update(dict.fromkeys(variables, ""))
    env["FAL_KEY"] = fal.api_key
    return env


def shown_env(env: Mapping[str, str]) -> dict[str, str]:
    """The server's environment for the report, without the port and key of one run."""
    hidden = {"IMAGEGRAPH_FAL_API_KEY", "IMAGEGRAPH_FAL_BASE_URL", "FAL_KEY"}
    return {k: v for k, v in env.items() if k not in hidden and v != ""}


def effective_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings of the server that matter here (our env over the defaults)."""
    settings = Settings.model_validate(
        {
            "data_dir": tempfile.gettempdir(),
            "provider_concurrency": json.loads(env["IMAGEGRAPH_PROVIDER_CONCURRENCY"]),
            "max_concurrent_nodes": int(env["IMAGEGRAPH_MAX_CONCURRENT_NODES"]),
        }
    )
    keys = (
        "max_concurrent_nodes",
        "provider_concurrency",
        "provider_retry_budget",
        "node_max_attempts",
        "retry_base_seconds",
        "breaker_failures",
        "breaker_failure_ratio",
        "db_threads",
        "sqlite_synchronous",
        "provider_timeout_seconds",
    )
    return settings.model_dump(include=set(keys))


# -- running executions ----------------------------------------------------------------------


@dataclass
class Run:
    wall_s: float
    outcomes: list[Outcome]
    stuck: list[str]  # executions not ended by the deadline
    # time.monotonic() (the fake's clock) of the first submit, the last submit answered,
    # and the last end seen.
    started: float
    all_submitted: float
    ended: float


async def run_all(
    client: aiohttp.ClientSession,
    workflow_id: str,
    prompts: Prompts,
    executions: int,
    deadline_s: float,
    submit_concurrency: int | None = None,
) -> Run:
    """Submit `executions` executions at once and wait for every one to end (or the
    deadline); the wall time runs from the first submit to the last end."""
    submitted: dict[int, str] = {}
    submitted_at: list[float] = []
    ended_at: list[float] = []

    gate = asyncio.Semaphore(submit_concurrency or executions)

    async def one(index: int, prompt: str) -> Outcome:
        started = time.monotonic()
        async with gate:
            submitted[index] = await submit_execution(client, workflow_id, prompt)
        submitted_at.append(time.monotonic())
        status = await wait_for_end(client, submitted[index])
        ended_at.append(time.monotonic())
        return Outcome(submitted[index], status, (ended_at[-1] - started) * 1000)

    queue = [prompts.next() for _ in range(executions)]
    started = time.monotonic()
    tasks = [asyncio.create_task(one(i, prompt)) for i, prompt in enumerate(queue)]
    done, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        error = task.exception()
        if error is not None:
            raise error
    stuck = [submitted[i] for i, task in enumerate(tasks) if task in pending and i in submitted]
    if len(pending) > len(stuck):
        raise RuntimeError(f"{len(pending) - len(stuck)} executions were never accepted")
    ended = max(ended_at, default=started)
    return Run(
        ended - started,
        [t.result() for t in tasks if t in done],
        stuck,
        started,
        max(submitted_at, default=started),
        ended,
    )


async def records(
    client: aiohttp.ClientSession, execution_ids: Sequence[str]
) -> list[dict[str, Any]]:
    """The full record of each execution (read afterwards, at a modest concurrency)."""
    gate = asyncio.Semaphore(16)

    async def one(execution_id: str) -> dict[str, Any]:
        async with gate:
            record: dict[str, Any] = await request(
                client, "GET", f"{API}/workflows/executions/{execution_id}", 200
            )
            return record

    return list(await asyncio.gather(*(one(e) for e in execution_ids)))


# -- what the fake and the server recorded ---------------------------------------------------


def accepted_since(fal: FalFake, since: float) -> list[str]:
    return [job for job in fal.accepted_ids if fal.accepted_at[job] >= since]


def paid_jobs(fal: FalFake, since: float, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The fake's accepted jobs against the jobs the node runs recorded."""
    accepted = accepted_since(fal, since)
    recorded = [
        str(gen["provider"]["jobId"])
        for gen in runs
        if (gen.get("provider") or {}).get("jobId") is not None
    ]
    accepted_set, recorded_set = set(accepted), set(recorded)
    duplicates = sorted(accepted_set - recorded_set)
    return {
        "accepted": len(accepted),
        "recorded_by_node_runs": len(recorded),
        "duplicate_paid_jobs": len(duplicates),
        "duplicate_job_ids": duplicates[:20],
        "recorded_not_accepted": len(recorded_set - accepted_set),
        "recorded_twice": len(recorded) - len(recorded_set),
        "accepted_consistent": (
            len(accepted) == len(accepted_set) == len(recorded_set) + len(duplicates)
            and recorded_set <= accepted_set
        ),
    }


def generation_runs(execs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    runs = []
    for record in execs:
        for node in record.get("nodes") or []:
            if node.get("nodeId") == GEN:
                runs.append(node)
    return runs


def node_facts(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Attempts and errors of the generation node runs."""
    states = Counter(str(gen.get("status")) for gen in runs)
    codes: Counter[str] = Counter()
    budget_exhausted = 0
    for gen in runs:
        error = gen.get("error") or {}
        if gen.get("status") == "FAILED":
            codes[str(error.get("code"))] += 1
            budget_exhausted += bool(error.get("retryBudgetExhausted"))
    attempts = [int(gen.get("attempts") or 0) for gen in runs]
    return {
        "states": dict(sorted(states.items())),
        "failed_error_codes": dict(sorted(codes.items())),
        "failed_retry_budget_exhausted": budget_exhausted,
        "attempts_total": sum(attempts),
        "retried": sum(1 for a in attempts if a > 1),
        "max_attempts": max(attempts, default=0),
        "previous_attempt_in_doubt": sum(
            1 for gen in runs if (gen.get("provider") or {}).get("previousAttemptInDoubt")
        ),
    }


def timeline(cfg: Config, fal: FalFake, run: Run, *, saturated: bool) -> dict[str, Any]:
    """Where the wall time went, on the fake's clock: submitting (until the server had
    accepted every execution), before the first job and the cap-th job were accepted, the
    jobs themselves (accepted until their result was read), and after the last read.
    `mean_in_flight` is the jobs in flight averaged over the wall time (the cap when every
    slot is always busy). `overhead_ms_per_job` is the wall time of a slot per job beyond
    `latency` (cap x wall / jobs - latency): the ratio to the ideal is about
    1 + overhead / latency. When the cap is `saturated` (jobs always wait for a slot, so
    the i-th job takes the slot of the (i - cap)-th result read), also the hand-off of a
    slot: a result read until the next job is accepted."""
    accepted = accepted_since(fal, run.started)
    spans = [(fal.accepted_at[job], fal.taken_at[job]) for job in accepted if job in fal.taken_at]
    if not spans:
        return {}
    held = [(end - start) * 1000 for start, end in spans]
    beyond = [ms - cfg.latency * 1000 for ms in held]
    starts = sorted(start for start, _ in spans)
    reads = sorted(end for _, end in spans)
    slot_ms = cfg.cap * run.wall_s * 1000 / len(spans)
    report = {
        "all_submitted_after_ms": r3((run.all_submitted - run.started) * 1000),
        "first_job_accepted_after_ms": r3((starts[0] - run.started) * 1000),
        # When the cap-th job was accepted: the first moment the cap could be full.
        "cap_filled_after_ms": r3((starts[min(cfg.cap, len(starts)) - 1] - run.started) * 1000),
        "last_result_read_before_end_ms": r3((run.ended - reads[-1]) * 1000),
        "job_accepted_to_result_read_ms_p50": r3(median(held)),
        "job_accepted_to_result_read_ms_p95": r3(percentile(held, 95)),
        "job_result_read_after_done_ms_p50": r3(median(beyond)),
        "job_result_read_after_done_ms_p95": r3(percentile(beyond, 95)),
        "mean_in_flight": r3(sum(held) / (run.wall_s * 1000)),
        "slot_ms_per_job": r3(slot_ms),
        "overhead_ms_per_job": r3(slot_ms - cfg.latency * 1000),
        "slot_utilization": r3(sum(held) / (cfg.cap * run.wall_s * 1000)),
    }
    if saturated:
        handoffs = [(starts[i] - reads[i - cfg.cap]) * 1000 for i in range(cfg.cap, len(starts))]
        report["slot_handoff_ms_p50"] = r3(median(handoffs))
        report["slot_handoff_ms_p95"] = r3(percentile(handoffs, 95))
        report["slot_handoff_ms_max"] = r3(max(handoffs, default=math.nan))
    return report


def faults_injected(fal: FalFake) -> dict[str, dict[str, int]]:
    shown: dict[str, dict[str, int]] = {}
    for (endpoint, status), count in sorted(fal.faults.injected.items(), key=str):
        shown.setdefault(endpoint, {})[str(status)] = count
    return shown


# -- the phases ----------------------------------------------------------------------------------


async def direct_phase(cfg: Config, prompts: Prompts) -> dict[str, Any]:
    """The same fal jobs without the engine: `FalAdapter` under a semaphore of `cap`."""
    route = load_catalog(None)[NODE_TYPE].routes_resolved[0]
    size = cfg.image_size
    fal = BenchFal(latency=cfg.latency)
    with fal:
        # The server's own HTTP setup (clients, pools, result downloads), without the engine.
        hub = ProviderHub(
            Settings.model_validate(
                {
                    "data_dir": tempfile.gettempdir(),
                    "fal_api_key": fal.api_key,
                    "fal_base_url": fal.url,
                }
            )
        )
        try:
            adapter = hub.adapter("fal")
            gate = asyncio.Semaphore(cfg.cap)

            async def one(prompt: str) -> float:
                started = time.perf_counter()
                request_ = Request(
                    prompt=prompt, width=size, height=size, seed=7, output_format="png"
                )
                async with gate:
                    job = await adapter.start(route, request_)
                    assert not isinstance(job, Result)
                    outcome = await adapter.watch(job, WATCH_SECONDS)
                    while not isinstance(outcome, Result):
                        outcome = await adapter.watch(job, WATCH_SECONDS)
                for image in outcome.images:  # as the node: downloaded once the slot is free
                    assert image.url is not None
                    await hub.download("fal", image.url)
                return (time.perf_counter() - started) * 1000

            await one(prompts.next())  # warm-up: connections, imports
            progress(
                f"direct: {cfg.executions} fal jobs through FalAdapter, semaphore {cfg.cap} "
                f"(ideal {cfg.ideal_s:g} s)"
            )
            since = time.monotonic()
            started = time.perf_counter()
            latencies = await asyncio.gather(*(one(prompts.next()) for _ in range(cfg.executions)))
            wall = time.perf_counter() - started
            peak = fal.peak_in_flight(since)
        finally:
            await hub.aclose()
    progress(f"direct: wall {wall:.2f} s, peak in flight {peak}")
    return {
        "jobs": cfg.executions,
        "wall_s": r3(wall),
        "ideal_s": r3(cfg.ideal_s),
        "ratio_wall_to_ideal": ratio(wall, cfg.ideal_s),
        "jobs_per_s": r3(cfg.executions / wall),
        "latency_ms_p50": r3(median(latencies)),
        "latency_ms_p95": r3(percentile(latencies, 95)),
        "peak_in_flight": peak,
    }


@dataclass
class Measured:
    run: Run
    execs: list[dict[str, Any]]
    server_cpu_s: float
    client_cpu_s: float
    fal_requests: dict[str, int]  # requests per endpoint during the run


async def measure(
    cfg: Config, server: Server, fal: FalFake, prompts: Prompts, faults: bool
) -> Measured:
    """Warm up (no faults), then run every execution at once (with the faults, if asked)."""
    async with http_client(server.base_url, cfg.executions, server.api_key) as client:
        workflow_id = await create_workflow(client, workflow_document("bench-fal", steps(cfg)))
        progress(f"[{server.name}] warm-up: {cfg.warmup} executions")
        for _ in range(cfg.warmup):
            await wait_for_end(client, await submit_execution(client, workflow_id, prompts.next()))
        server.record_phase("warmup")
        if faults:
            for index, endpoint in enumerate(FAULT_ENDPOINTS):
                fal.faults.add_random(
                    endpoint, cfg.fault_probability, fault_choices(), seed=FAULT_SEED + index
                )
        progress(
            f"[{server.name}] {cfg.executions} executions at once, fal cap {cfg.cap}, "
            f"latency {cfg.latency:g} s (ideal {cfg.ideal_s:g} s)"
        )
        requests_before = Counter(fal.requests)
        server_cpu = process_cpu_seconds(server.pid)
        client_cpu = time.process_time()
        run = await run_all(
            client, workflow_id, prompts, cfg.executions, cfg.deadline_s, cfg.submit_concurrency
        )
        client_cpu = time.process_time() - client_cpu
        server_cpu = process_cpu_seconds(server.pid) - server_cpu
        fal_requests = dict(sorted((Counter(fal.requests) - requests_before).items()))
        fal.faults.clear()
        server.record_phase("run")
        progress(
            f"[{server.name}] wall {run.wall_s:.2f} s; {len(run.outcomes)} ended, "
            f"{len(run.stuck)} not; reading the records"
        )
        ids = [o.execution_id for o in run.outcomes] + run.stuck
        execs = await records(client, ids)
    return Measured(run, execs, server_cpu, client_cpu, fal_requests)


def common_report(
    cfg: Config, server: Server, fal: FalFake, m: Measured, *, faults: bool
) -> dict[str, Any]:
    run = m.run
    statuses = Counter(str(record["status"]) for record in m.execs)
    latencies = [o.latency_ms for o in run.outcomes]
    runs = generation_runs(m.execs)
    ended = len(run.outcomes)
    return {
        "executions": cfg.executions,
        "terminal": sum(statuses[s] for s in TERMINAL),
        "non_terminal": len(run.stuck),
        "non_terminal_ids": run.stuck[:20],
        "statuses": dict(sorted(statuses.items())),
        "completed": statuses["COMPLETED"],
        "failed": statuses["FAILED"],
        "wall_s": r3(run.wall_s),
        "ideal_s": r3(cfg.ideal_s),
        "ratio_wall_to_ideal": ratio(run.wall_s, cfg.ideal_s),
        "executions_per_s": r3(ended / run.wall_s) if run.wall_s > 0 else None,
        "ideal_executions_per_s": r3(cfg.cap / cfg.latency),
        "latency_ms_p50": r3(median(latencies)),
        "latency_ms_p95": r3(percentile(latencies, 95)),
        "latency_ms_max": r3(max(latencies, default=math.nan)),
        "fal": {
            "cap": cfg.cap,
            "latency_s": cfg.latency,
            "peak_in_flight": fal.peak_in_flight(run.started),
            **paid_jobs(fal, run.started, runs),
            "requests": m.fal_requests,
        },
        "generation_nodes": node_facts(runs),
        "timeline": timeline(cfg, fal, run, saturated=not faults),
        "server": {
            "cpu_s": r3(m.server_cpu_s),
            "cpu_ms_per_execution": r3(m.server_cpu_s * 1000 / max(ended, 1)),
            **server.memory_report(),
        },
        "client_process_cpu_s": r3(m.client_cpu_s),  # the client and the fake, together
    }


async def server_phase(
    cfg: Config, root: Path, prompts: Prompts, name: str, *, faults: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    fal = BenchFal(latency=cfg.latency)
    with fal:
        env = server_env(cfg, fal)
        server = Server(root, name, env)
        with running(server):
            await asyncio.sleep(0.5)
            server.record_idle()
            measured = await measure(cfg, server, fal, prompts, faults)
            report = common_report(cfg, server, fal, measured, faults=faults)
        if faults:
            report["faults"] = {
                "probability": cfg.fault_probability,
                "endpoints": list(FAULT_ENDPOINTS),
                "answers": ["429 Retry-After: 1", "503"],
                "seed": FAULT_SEED,
                "injected": faults_injected(fal),
            }
    progress(
        f"[{name}] {report['completed']} completed, {report['failed']} failed, "
        f"{report['non_terminal']} not ended; fal accepted {report['fal']['accepted']}, "
        f"{report['fal']['duplicate_paid_jobs']} duplicated, peak in flight "
        f"{report['fal']['peak_in_flight']}"
    )
    return report, env


async def benchmark(cfg: Config, root: Path) -> dict[str, Any]:
    prompts = Prompts()
    direct = await direct_phase(cfg, prompts)
    clean, env = await server_phase(cfg, root, prompts, "clean", faults=False)
    faulty, _ = await server_phase(cfg, root, prompts, "faults", faults=True)
    clean["ratio_wall_to_direct"] = ratio(clean["wall_s"] or math.nan, direct["wall_s"])
    clean_fal = clean["fal"]
    faulty_fal = faulty["fal"]
    return {
        "server_env": shown_env(env),
        "server_settings": effective_settings(env),
        "direct_baseline": direct,
        "clean": {"target_ratio": TARGET_RATIO_TO_IDEAL, **clean},
        "faults": faulty,
        "targets": {
            "clean_ratio_met": _at_most(clean["ratio_wall_to_ideal"], TARGET_RATIO_TO_IDEAL),
            "clean_cap_respected": clean_fal["peak_in_flight"] <= cfg.cap,
            "clean_cap_reached": clean_fal["peak_in_flight"] == cfg.cap,
            "clean_all_completed": clean["completed"] == cfg.executions,
            "clean_one_paid_job_per_execution": clean_fal["accepted"] == cfg.executions,
            "faults_all_terminal": faulty["terminal"] == cfg.executions,
            "faults_no_duplicate_paid_jobs": faulty_fal["duplicate_paid_jobs"] == 0,
            "faults_cap_respected": faulty_fal["peak_in_flight"] <= cfg.cap,
        },
    }


def _at_most(value: float | None, target: float) -> bool:
    return value is not None and value <= target


def _terminate(signum: int, _frame: Any) -> None:
    # Turn SIGTERM into SystemExit so the finally blocks stop the server and remove the dir.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="60 executions, cap 10, latency 0.3 s: a smoke test in under a minute",
    )
    parser.add_argument(
        "--submit-concurrency",
        type=int,
        default=None,
        metavar="N",
        help="execute requests open at once (default: every execution at the same moment)",
    )
    args = parser.parse_args(argv)
    cfg = Config.small() if args.quick else Config.full()
    if args.submit_concurrency is not None:
        cfg = dataclasses.replace(cfg, submit_concurrency=args.submit_concurrency)
    signal.signal(signal.SIGTERM, _terminate)
    # The fake (a uvicorn thread) and the load generator share this process: hand the GIL
    # over sooner than every 5 ms, or each answer of the fake waits for the client's turn.
    sys.setswitchinterval(0.0005)

    started = time.perf_counter()
    started_at = datetime.now().astimezone().isoformat(timespec="seconds")
    machine_info = machine()
    root = Path(tempfile.mkdtemp(prefix="imagegraph-bench-providers-"))
    try:
        results = asyncio.run(benchmark(cfg, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    machine_info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    server_env_shown = results.pop("server_env")
    server_settings = results.pop("server_settings")
    report = {
        "benchmark": "providers",
        "quick": cfg.quick,
        "started_at": started_at,
        "duration_s": round(time.perf_counter() - started, 1),
        "machine": machine_info,
        "settings": {
            "counts": {
                "executions": cfg.executions,
                "fal_cap": cfg.cap,
                "fal_latency_s": cfg.latency,
                "warmup": cfg.warmup,
                "fault_probability": cfg.fault_probability,
                "deadline_s": cfg.deadline_s,
            },
            "workflow": {
                "nodes": f"input:text -> {NODE_TYPE} {cfg.image_size}x{cfg.image_size} seed 7 "
                "-> output:image",
                "unique_prompt_per_execution": True,
            },
            "fake": "FalFake in this process (uvicorn thread); status stream watched, no "
            "webhooks; each size drawn once, bytes made distinct per job",
            "client": {
                "library": f"aiohttp {aiohttp.__version__} ClientSession, keep-alive",
                "concurrency": cfg.executions,
                "submit_concurrency": cfg.submit_concurrency,
                "long_poll": f"Prefer: wait={LONG_POLL_SECONDS}",
            },
            "server_env": server_env_shown,
            "server_settings": server_settings,
        },
        **results,
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
