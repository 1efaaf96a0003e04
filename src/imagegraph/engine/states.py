"""The small vocabulary of execution and node run states."""

from __future__ import annotations

from enum import StrEnum


class ExecutionStatus(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class RunState(StrEnum):
    PENDING = "PENDING"  # waiting for its inputs
    QUEUED = "QUEUED"  # runnable (now, or at next_attempt_at when waiting for a retry)
    RUNNING = "RUNNING"  # claimed by a worker holding a lease
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"  # only reachable through a branch route that was not taken
    CANCELLED = "CANCELLED"


TERMINAL_EXECUTION = frozenset(
    {ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.CANCELLED}
)
TERMINAL_RUN = frozenset(
    {RunState.SUCCEEDED, RunState.FAILED, RunState.SKIPPED, RunState.CANCELLED}
)
