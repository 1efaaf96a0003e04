"""The orchestration benchmark runs end to end in --quick mode and reports every number.

Only the shape and types of its JSON are checked, never how fast anything was.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "orchestration.py"
Number = (int, float)


def number(value: Any, *, positive: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, Number) or not math.isfinite(value):
        return False
    return value > 0 if positive else True


def check_throughput(section: dict[str, Any]) -> None:
    for key in (
        "executions_per_s",
        "wall_s",
        "latency_ms_p50",
        "latency_ms_p95",
        "server_cpu_ms_per_execution",
    ):
        assert number(section[key], positive=True), (key, section[key])
    assert number(section["ratio_to_direct"], positive=True)
    assert number(section["ratio_to_target"], positive=True)
    assert section["failed"] == 0
    assert section["executions"] > 0
    assert section["concurrency"] > 0


def check_overhead(section: dict[str, Any]) -> None:
    assert section["nodes"] == 5
    assert section["runs"] > 0
    assert section["failed"] == 0
    for key in ("engine_latency_ms_median", "engine_latency_ms_p95", "server_side_ms_median"):
        assert number(section[key], positive=True), (key, section[key])
    for key in (
        "overhead_ms_per_node_median",
        "overhead_ms_per_node_p95",
        "end_to_end_overhead_ms_per_node_median",
        "end_to_end_overhead_ms_per_node_p95",
    ):
        assert number(section[key]), (key, section[key])  # may be negative in theory
    assert number(section["ratio_engine_to_direct"], positive=True)


def check_memory(section: dict[str, Any], phases: list[str]) -> None:
    assert number(section["idle_rss_mb"], positive=True)
    assert number(section["peak_rss_mb"], positive=True)
    assert number(section["ratio_peak_to_idle"], positive=True)
    assert [p["phase"] for p in section["phases"]] == phases
    for phase in section["phases"]:
        assert number(phase["rss_mb"], positive=True)
        assert phase["peak_rss_mb"] >= phase["rss_mb"]


@pytest.mark.e2e
def test_quick_benchmark_reports_every_measurement(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout)  # exactly one JSON object on stdout

    assert report["benchmark"] == "orchestration"
    assert report["quick"] is True
    assert number(report["duration_s"], positive=True)
    assert isinstance(report["started_at"], str)

    machine = report["machine"]
    assert isinstance(machine["cpu_count"], int)
    assert machine["cpu_count"] >= 1
    assert isinstance(machine["python_version"], str)
    assert len(machine["load_average_at_start"]) == 3
    assert len(machine["load_average_at_end"]) == 3

    settings = report["settings"]
    assert settings["counts"]["chain_ks"] == [1, 8, 32]
    assert settings["server_env"]["normal"]["IMAGEGRAPH_SQLITE_SYNCHRONOUS"] == "NORMAL"
    assert settings["server_env"]["full"]["IMAGEGRAPH_SQLITE_SYNCHRONOUS"] == "FULL"
    assert settings["server_settings"]["full"]["sqlite_synchronous"] == "FULL"

    throughput = report["throughput"]
    assert number(throughput["direct_baseline"]["executions_per_s"], positive=True)
    assert number(throughput["direct_baseline"]["ms_median"], positive=True)
    check_throughput(throughput["sqlite_normal"])
    check_throughput(throughput["sqlite_full"])
    assert number(throughput["sqlite_full"]["ratio_to_normal"], positive=True)

    overhead = report["overhead"]
    assert number(overhead["direct_baseline"]["ms_p95"], positive=True)
    check_overhead(overhead["sqlite_normal"])
    check_overhead(overhead["sqlite_full"])

    delayed = report["delayed"]
    assert delayed["failed"] == 0
    assert delayed["executions"] == settings["counts"]["delayed_executions"]
    for key in ("wall_s", "ideal_s", "ratio_wall_to_ideal", "ideal_plus_node_cpu_s"):
        assert number(delayed[key], positive=True), (key, delayed[key])
    assert number(delayed["ratio_wall_to_ideal_plus_node_cpu"], positive=True)

    chains = report["chains"]
    assert [row["k"] for row in chains["per_k"]] == [1, 8, 32]
    assert chains["largest_k"] == 32
    for row in chains["per_k"]:
        assert row["failed"] == 0
        assert row["nodes"] == row["k"] + 3
        for key in ("direct_ms_median", "engine_latency_ms_median", "server_side_ms_median"):
            assert number(row[key], positive=True), (key, row)
        assert number(row["overhead_ms_per_node"]), row
        assert number(row["end_to_end_overhead_ms_per_node"]), row
    assert chains["per_k"][0]["marginal_overhead_ms_per_added_node"] is None
    assert all(number(r["marginal_overhead_ms_per_added_node"]) for r in chains["per_k"][1:])
    assert number(chains["ratio_overhead_per_node_largest_k_to_k8"])

    memory = report["memory"]
    check_memory(memory["sqlite_normal"], ["overhead", "throughput", "delayed", "chains"])
    check_memory(memory["sqlite_full"], ["overhead", "throughput"])

    targets = report["targets"]
    assert set(targets) == {
        "throughput_met",
        "overhead_met",
        "delayed_met",
        "chains_flat_met",
        "idle_rss_met",
    }
    assert all(isinstance(value, bool) for value in targets.values())
