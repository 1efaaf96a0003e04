"""The batch benchmark runs end to end in --quick mode and reports every number.

Only the shape and the counts are checked, never how fast anything was.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "batch.py"


def positive(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


@pytest.mark.e2e
def test_quick_batch_benchmark_reports_every_measurement(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout)
    assert report["benchmark"] == "batch"
    assert report["quick"] is True
    settings = report["settings"]

    batch = report["batch"]
    assert batch["status"] == "COMPLETED"
    assert batch["counts"]["completed"] == settings["items"]
    assert batch["executions"] == settings["items"]
    assert 0 < batch["peak_running_seen"] <= settings["concurrency"]
    for key in ("wall_s", "ideal_s", "direct_baseline_s", "ratio_to_ideal", "ratio_to_direct"):
        assert positive(batch[key]), (key, batch[key])
    assert positive(batch["memory"]["peak_rss_mb"])

    memory = report["memory"]
    assert memory["items_big"] == settings["memory_items"]
    for key in (
        "peak_rss_mb_small",
        "peak_rss_mb_big",
        "ratio_big_to_small",
        "accept_request_s_big",
    ):
        assert positive(memory[key]), (key, memory[key])

    dedupe = report["dedupe"]
    assert dedupe["executions_with_duplicates"] == settings["dedupe_items"] // 2
    assert dedupe["executions_distinct"] == settings["dedupe_items"]
    assert dedupe["work_ratio"] == 0.5
    assert dedupe["completed_with_duplicates"] == settings["dedupe_items"]
    assert report["targets"]["every_item_completed"] is True
    assert report["targets"]["dedupe_half_the_work"] is True
