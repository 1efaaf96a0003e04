"""The blob store interface."""

from __future__ import annotations

import hashlib
from typing import Protocol


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore(Protocol):
    """Immutable bytes addressed by their sha256. Writing the same bytes twice stores them once.

    Methods are synchronous and thread-safe; async callers run them in a thread.
    """

    def put(self, data: bytes, sha256: str | None = None) -> str:
        """Store bytes and return their sha256 (pass it if already known)."""
        ...

    def get(self, sha256: str) -> bytes:
        """The stored bytes; raises `KeyError` if there are none."""
        ...

    def exists(self, sha256: str) -> bool: ...
