"""In-process notification of execution events, for live streams and waiters.

Recorded events live in the database; the bus only says "something happened to execution X"
(and carries progress notices, which are not recorded). A subscriber that hears a notice
reads the database from its last seen event id, so events arrive in commit order and a
reconnecting client that sends `Last-Event-ID` misses nothing. A scaled-out deployment swaps
this for Redis pub/sub behind the same methods.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

EXECUTION_END_EVENTS = frozenset({"execution.completed", "execution.failed", "execution.cancelled"})


@dataclass(frozen=True)
class Event:
    """A state change recorded in the database, or a progress notice (`recorded=False`),
    which is never stored. `id` is set on events read back from the database; published
    copies of recorded events only tell subscribers to read from where they are."""

    id: int | None
    execution_id: str
    type: str
    node_id: str | None
    data: Mapping[str, Any]
    created_at: datetime
    recorded: bool = True

    @property
    def terminal(self) -> bool:
        return self.type in EXECUTION_END_EVENTS

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "executionId": self.execution_id,
            "nodeId": self.node_id,
            "createdAt": self.created_at.isoformat(),
            **self.data,
        }


class Subscription:
    def __init__(self, execution_id: str) -> None:
        self.execution_id = execution_id
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=1000)

    def offer(self, event: Event) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            # A slow reader loses only progress notices and duplicate wake-ups: recorded
            # events are re-read from the database.
            self.queue.put_nowait(event)


class EventBus:
    """Fan-out of events to subscribers of one execution (or of all, with `"*"`)."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_end: list[Callable[[Event], None]] = []

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @contextlib.contextmanager
    def subscribe(self, execution_id: str) -> Iterator[Subscription]:
        subscription = Subscription(execution_id)
        self._subscribers[execution_id].add(subscription)
        try:
            yield subscription
        finally:
            subscribers = self._subscribers.get(execution_id)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscribers[execution_id]

    def listening(self, execution_id: str) -> bool:
        """Whether anyone here hears this execution's events now (callable from any thread)."""
        return bool(self._subscribers.get(execution_id) or self._subscribers.get("*"))

    def on_end(self, callback: Callable[[Event], None]) -> None:
        """Call `callback` with every event that ends an execution."""
        self._on_end.append(callback)

    def publish(self, events: Iterable[Event]) -> None:
        """Deliver events; call from the event loop thread."""
        for event in events:
            for key in (event.execution_id, "*"):
                for subscription in self._subscribers.get(key, ()):
                    subscription.offer(event)
            if event.terminal:
                for callback in self._on_end:
                    callback(event)

    def publish_threadsafe(self, events: Iterable[Event]) -> None:
        """Deliver events from any thread."""
        batch = list(events)
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self.publish, batch)
