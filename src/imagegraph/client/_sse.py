"""A decoder of `text/event-stream` lines into events (the WHATWG HTML parsing rules)."""

from __future__ import annotations

import json
from typing import Any

from imagegraph.client.models import Event


class SSEDecoder:
    """Feed it the stream's lines (without their line endings); it returns an `Event` at each
    blank line that ends one. Comments (`: ping`) and `retry:` are ignored. `last_id` is the
    id to resume from with `Last-Event-ID`: that of the last complete event, never of one
    cut off mid-way."""

    def __init__(self, last_id: str | None = None) -> None:
        self.last_id = last_id
        self._id = last_id
        self._type = ""
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> Event | None:
        self.last_id = self._id
        data, kind = "\n".join(self._data), self._type or "message"
        has_data = bool(self._data)
        self._data, self._type = [], ""
        if not has_data:
            return None
        return Event(id=self.last_id, type=kind, data=_payload(data))


def _payload(data: str) -> dict[str, Any]:
    """The event's JSON object; anything else is kept under `"value"`."""
    try:
        parsed = json.loads(data)
    except ValueError:
        return {"value": data}
    return parsed if isinstance(parsed, dict) else {"value": parsed}
