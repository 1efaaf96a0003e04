"""API keys: their format, and how they are checked and stored.

A key looks like `sk-live-<40 random base62 characters><6-character checksum>`: 238 random
bits, a prefix that says what it is (`sk-test-` for test keys), and a CRC32 checksum that
lets anyone (a secret scanner, our own server) tell a mistyped or made-up key from a real
one without a database. Only the key's SHA-256 is stored, with its prefix and last four
characters so a person can tell keys apart.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

ALPHABET = string.digits + string.ascii_letters
RANDOM_CHARS = 40
CHECKSUM_CHARS = 6
Mode = Literal["live", "test"]


class Scope(StrEnum):
    WORKFLOWS_READ = "workflows:read"
    WORKFLOWS_WRITE = "workflows:write"
    EXECUTIONS_WRITE = "executions:write"
    ADMIN = "admin"


ALL_SCOPES = tuple(Scope)


@dataclass(frozen=True)
class NewKey:
    """A freshly made key: `secret` is shown once and never stored."""

    secret: str
    mode: Mode
    key_hash: str
    prefix: str
    last4: str


def generate(mode: Mode) -> NewKey:
    body = "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS))
    secret = f"sk-{mode}-{body}{_checksum(body)}"
    return NewKey(secret, mode, hash_key(secret), secret[: len(f"sk-{mode}-") + 4], secret[-4:])


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse(secret: str) -> Mode | None:
    """The key's mode if it is well formed with a valid checksum, else None."""
    for mode in ("live", "test"):
        prefix = f"sk-{mode}-"
        if secret.startswith(prefix):
            rest = secret[len(prefix) :]
            body, checksum = rest[:-CHECKSUM_CHARS], rest[-CHECKSUM_CHARS:]
            if len(body) == RANDOM_CHARS and all(c in ALPHABET for c in rest):
                return mode if secrets.compare_digest(checksum, _checksum(body)) else None
    return None


def _checksum(body: str) -> str:
    value = zlib.crc32(body.encode())
    out = []
    for _ in range(CHECKSUM_CHARS):
        value, digit = divmod(value, len(ALPHABET))
        out.append(ALPHABET[digit])
    return "".join(reversed(out))
