"""The provider benchmark runs end to end in --quick mode and reports every number.

Only the shape of its JSON and the correctness facts are checked (every execution ends, no
paid job is duplicated, the fal cap holds), never how fast anything was.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "providers.py"
Number = (int, float)


def number(value: Any, *, positive: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, Number) or not math.isfinite(value):
        return False
    return value > 0 if positive else True


def check_phase(section: dict[str, Any], executions: int, cap: int) -> None:
    """What both phases report, and the facts that must hold in both."""
    assert section["executions"] == executions
    assert section["terminal"] == executions, section  # every execution ended
    assert section["non_terminal"] == 0
    assert section["non_terminal_ids"] == []
    assert section["completed"] + section["failed"] == executions
    assert sum(section["statuses"].values()) == executions
    for key in (
        "wall_s",
        "ideal_s",
        "ratio_wall_to_ideal",
        "executions_per_s",
        "ideal_executions_per_s",
        "latency_ms_p50",
        "latency_ms_p95",
        "latency_ms_max",
    ):
        assert number(section[key], positive=True), (key, section[key])

    fal = section["fal"]
    assert fal["cap"] == cap
    assert 1 <= fal["peak_in_flight"] <= cap  # the cap held
    assert fal["duplicate_paid_jobs"] == 0, fal  # no job paid for twice
    assert fal["duplicate_job_ids"] == []
    assert fal["recorded_not_accepted"] == 0
    assert fal["recorded_twice"] == 0
    assert fal["accepted_consistent"] is True
    assert fal["accepted"] == fal["recorded_by_node_runs"]
    assert fal["accepted"] <= fal["requests"]["submit"]

    nodes = section["generation_nodes"]
    assert sum(nodes["states"].values()) == executions
    assert nodes["attempts_total"] >= executions
    assert sum(nodes["failed_error_codes"].values()) == nodes["states"].get("FAILED", 0)

    timeline = section["timeline"]
    for key in (
        "slot_ms_per_job",
        "slot_utilization",
        "mean_in_flight",
        "job_accepted_to_result_read_ms_p50",
        "all_submitted_after_ms",
        "cap_filled_after_ms",
    ):
        assert number(timeline[key], positive=True), (key, timeline[key])
    assert number(timeline["overhead_ms_per_job"])

    server = section["server"]
    assert number(server["cpu_s"], positive=True)
    assert number(server["cpu_ms_per_execution"], positive=True)
    assert number(server["idle_rss_mb"], positive=True)
    assert number(server["peak_rss_mb"], positive=True)
    assert [p["phase"] for p in server["phases"]] == ["warmup", "run"]


@pytest.mark.e2e
def test_quick_provider_benchmark_reports_every_measurement(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout)  # exactly one JSON object on stdout

    assert report["benchmark"] == "providers"
    assert report["quick"] is True
    assert number(report["duration_s"], positive=True)
    assert len(report["machine"]["load_average_at_start"]) == 3
    assert len(report["machine"]["load_average_at_end"]) == 3

    settings = report["settings"]
    counts = settings["counts"]
    executions, cap = counts["executions"], counts["fal_cap"]
    assert (executions, cap, counts["fal_latency_s"]) == (60, 10, 0.3)
    assert settings["server_settings"]["provider_concurrency"]["fal"] == cap
    assert settings["server_settings"]["max_concurrent_nodes"] > cap
    assert "IMAGEGRAPH_FAL_API_KEY" not in settings["server_env"]

    direct = report["direct_baseline"]
    assert direct["jobs"] == executions
    assert 1 <= direct["peak_in_flight"] <= cap
    for key in ("wall_s", "ideal_s", "ratio_wall_to_ideal", "jobs_per_s"):
        assert number(direct[key], positive=True), (key, direct[key])

    clean = report["clean"]
    check_phase(clean, executions, cap)
    # Without faults every execution completes on one paid job.
    assert clean["completed"] == executions
    assert clean["fal"]["accepted"] == executions
    assert clean["generation_nodes"]["attempts_total"] == executions
    assert number(clean["ratio_wall_to_direct"], positive=True)
    for key in ("slot_handoff_ms_p50", "slot_handoff_ms_p95", "slot_handoff_ms_max"):
        assert number(clean["timeline"][key]), (key, clean["timeline"])
    assert clean["target_ratio"] == 1.10

    faults = report["faults"]
    check_phase(faults, executions, cap)
    plan = faults["faults"]
    assert plan["probability"] == 0.1
    assert plan["endpoints"] == ["submit", "status"]
    injected = plan["injected"]
    assert set(injected) <= {"submit", "status"}
    assert all(set(by_status) <= {"429", "503"} for by_status in injected.values())
    assert sum(sum(by_status.values()) for by_status in injected.values()) > 0
    # A faulted submit was never accepted: accepted jobs are at most the good submits.
    assert faults["fal"]["accepted"] <= (
        faults["fal"]["requests"]["submit"] - sum(injected.get("submit", {}).values())
    )

    targets = report["targets"]
    assert set(targets) == {
        "clean_ratio_met",
        "clean_cap_respected",
        "clean_cap_reached",
        "clean_all_completed",
        "clean_one_paid_job_per_execution",
        "faults_all_terminal",
        "faults_no_duplicate_paid_jobs",
        "faults_cap_respected",
    }
    assert all(isinstance(value, bool) for value in targets.values())
    for fact in (
        "clean_cap_respected",
        "clean_all_completed",
        "clean_one_paid_job_per_execution",
        "faults_all_terminal",
        "faults_no_duplicate_paid_jobs",
        "faults_cap_respected",
    ):
        assert targets[fact] is True, fact
