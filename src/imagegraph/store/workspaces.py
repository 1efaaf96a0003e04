"""Workspaces, their API keys and their credits."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from imagegraph.engine.lru import LRU
from imagegraph.errors import Conflict, InvalidInput, NotFound
from imagegraph.ids import new_id
from imagegraph.keys import Mode, NewKey
from imagegraph.store.db import Database
from imagegraph.store.tables import DEFAULT_WORKSPACE, api_keys, credit_ledger, workspaces


@dataclass(frozen=True)
class KeyRecord:
    id: str
    workspace_id: str
    name: str
    mode: Mode
    prefix: str
    last4: str
    scopes: tuple[str, ...]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class WorkspaceRecord:
    id: str
    name: str
    plan: str
    credits_balance: float
    credits_held: float
    webhook_secret: str
    created_at: datetime

    @property
    def credits_available(self) -> float:
        return round(self.credits_balance - self.credits_held, 6)


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: 32 random bytes, base64, with the `whsec_` prefix."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def create_workspace(
    db: Database, name: str, plan: str, now: datetime, workspace_id: str | None = None
) -> WorkspaceRecord:
    with db.write() as conn:
        workspace_id = workspace_id or new_id("ws")
        conn.execute(
            insert(workspaces).values(
                id=workspace_id,
                name=name,
                plan=plan,
                credits_balance=0.0,
                credits_held=0.0,
                webhook_secret=new_webhook_secret(),
                created_at=now,
            )
        )
        return _workspace(conn, workspace_id)


def get_workspace(db: Database, workspace_id: str) -> WorkspaceRecord:
    with db.read() as conn:
        return _workspace(conn, workspace_id)


def _workspace(conn: Connection, workspace_id: str) -> WorkspaceRecord:
    row = conn.execute(select(workspaces).where(workspaces.c.id == workspace_id)).first()
    if row is None:
        raise NotFound(f"workspace {workspace_id} does not exist")
    return WorkspaceRecord(
        row.id,
        row.name,
        row.plan,
        row.credits_balance,
        row.credits_held,
        row.webhook_secret,
        row.created_at,
    )


def set_plan(db: Database, workspace_id: str, plan: str) -> WorkspaceRecord:
    with db.write() as conn:
        done = conn.execute(
            update(workspaces).where(workspaces.c.id == workspace_id).values(plan=plan)
        ).rowcount
        if not done:
            raise NotFound(f"workspace {workspace_id} does not exist")
        return _workspace(conn, workspace_id)


def add_key(
    db: Database,
    workspace_id: str,
    key: NewKey,
    name: str,
    scopes: Sequence[str],
    now: datetime,
) -> KeyRecord:
    with db.write() as conn:
        key_id = new_id("key")
        conn.execute(
            insert(api_keys).values(
                id=key_id,
                workspace_id=workspace_id,
                name=name,
                mode=key.mode,
                prefix=key.prefix,
                last4=key.last4,
                key_hash=key.key_hash,
                scopes=list(scopes),
                created_at=now,
            )
        )
        row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one()
        return _key(row)


def _key(row: Any) -> KeyRecord:
    return KeyRecord(
        row.id,
        row.workspace_id,
        row.name,
        row.mode,
        row.prefix,
        row.last4,
        tuple(row.scopes),
        row.created_at,
        row.last_used_at,
        row.revoked_at,
    )


@dataclass(frozen=True)
class KeyOwner:
    """What a valid key may do, and where."""

    key_id: str
    workspace_id: str
    mode: Mode
    scopes: frozenset[str]
    plan: str


def find_key(db: Database, key_hash: str) -> KeyOwner | None:
    """The owner of a key that exists and is not revoked."""
    with db.read() as conn:
        row = conn.execute(
            select(
                api_keys.c.id,
                api_keys.c.workspace_id,
                api_keys.c.mode,
                api_keys.c.scopes,
                api_keys.c.revoked_at,
                workspaces.c.plan,
            )
            .join(workspaces, workspaces.c.id == api_keys.c.workspace_id)
            .where(api_keys.c.key_hash == key_hash)
        ).first()
    if row is None or row.revoked_at is not None:
        return None
    return KeyOwner(row.id, row.workspace_id, row.mode, frozenset(row.scopes), row.plan)


def touch_key(db: Database, key_id: str, now: datetime) -> None:
    with db.write() as conn:
        conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=now))


def list_keys(db: Database, workspace_id: str) -> list[KeyRecord]:
    with db.read() as conn:
        rows = conn.execute(
            select(api_keys)
            .where(api_keys.c.workspace_id == workspace_id)
            .order_by(api_keys.c.created_at, api_keys.c.id)
        ).all()
    return [_key(r) for r in rows]


def revoke_key(db: Database, workspace_id: str, key_id: str, now: datetime) -> KeyRecord:
    with db.write() as conn:
        row = conn.execute(
            select(api_keys).where(api_keys.c.id == key_id, api_keys.c.workspace_id == workspace_id)
        ).first()
        if row is None:
            raise NotFound(f"key {key_id} does not exist")
        if row.revoked_at is None and "admin" in row.scopes:
            admins = [
                r
                for r in conn.execute(
                    select(api_keys.c.id, api_keys.c.scopes).where(
                        api_keys.c.workspace_id == workspace_id,
                        api_keys.c.revoked_at.is_(None),
                    )
                ).all()
                if "admin" in r.scopes
            ]
            if len(admins) <= 1:
                raise Conflict(
                    f"key {key_id} is the workspace's last admin key; create another admin "
                    "key before revoking it"
                )
        if row.revoked_at is None:
            conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=now))
        return _key(conn.execute(select(api_keys).where(api_keys.c.id == key_id)).one())


def count_keys(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(api_keys)).scalar() or 0)


def grant_credits(
    db: Database, workspace_id: str, amount: float, note: str | None, now: datetime
) -> WorkspaceRecord:
    """Add (or, negative, take away) credits; recorded in the ledger."""
    if amount == 0:
        raise InvalidInput("amount must not be zero")
    with db.write() as conn:
        done = conn.execute(
            update(workspaces)
            .where(workspaces.c.id == workspace_id)
            .values(credits_balance=workspaces.c.credits_balance + amount)
        ).rowcount
        if not done:
            raise NotFound(f"workspace {workspace_id} does not exist")
        conn.execute(
            insert(credit_ledger).values(
                workspace_id=workspace_id, kind="grant", amount=amount, note=note, created_at=now
            )
        )
        return _workspace(conn, workspace_id)


@dataclass(frozen=True)
class Bootstrapped:
    workspace: WorkspaceRecord
    key: NewKey


def bootstrap(
    db: Database, key: NewKey, plan: str, credits: float, now: datetime
) -> Bootstrapped | None:
    """On a database without any key: the default workspace (made by the migrations) gets
    an admin key and its starting credits. Returns None when keys exist already."""
    with db.write() as conn:
        if conn.execute(select(func.count()).select_from(api_keys)).scalar():
            return None
        exists = conn.execute(
            select(workspaces.c.id).where(workspaces.c.id == DEFAULT_WORKSPACE)
        ).first()
        if exists is None:
            conn.execute(
                insert(workspaces).values(
                    id=DEFAULT_WORKSPACE,
                    name="Default",
                    plan=plan,
                    credits_balance=0.0,
                    credits_held=0.0,
                    webhook_secret=new_webhook_secret(),
                    created_at=now,
                )
            )
        else:
            conn.execute(
                update(workspaces).where(workspaces.c.id == DEFAULT_WORKSPACE).values(plan=plan)
            )
        if credits:
            conn.execute(
                update(workspaces)
                .where(workspaces.c.id == DEFAULT_WORKSPACE)
                .values(credits_balance=workspaces.c.credits_balance + credits)
            )
            conn.execute(
                insert(credit_ledger).values(
                    workspace_id=DEFAULT_WORKSPACE,
                    kind="grant",
                    amount=credits,
                    note="starting credits",
                    created_at=now,
                )
            )
        conn.execute(
            insert(api_keys).values(
                id=new_id("key"),
                workspace_id=DEFAULT_WORKSPACE,
                name="admin (bootstrap)",
                mode=key.mode,
                prefix=key.prefix,
                last4=key.last4,
                key_hash=key.key_hash,
                scopes=["admin"],
                created_at=now,
            )
        )
        return Bootstrapped(_workspace(conn, DEFAULT_WORKSPACE), key)


# A key found in the database is trusted this long without looking again; revoking a key
# through a process forgets it there at once, other processes stop accepting it after this.
KEY_CACHE_SECONDS = 5.0
# last_used_at is written at most this often per key.
TOUCH_SECONDS = 60.0


@dataclass
class _Cached:
    owner: KeyOwner
    fetched: float


class KeyCache:
    """Recently seen keys by hash, so a busy client does not cost a database read per
    request."""

    def __init__(self) -> None:
        self._entries: LRU[str, _Cached] = LRU(max_weight=10_000)
        self._touched: LRU[str, float] = LRU(max_weight=10_000)

    def get(self, key_hash: str) -> KeyOwner | None:
        entry = self._entries.get(key_hash)
        if entry is None or time.monotonic() - entry.fetched > KEY_CACHE_SECONDS:
            return None
        return entry.owner

    def put(self, key_hash: str, owner: KeyOwner) -> None:
        self._entries.put(key_hash, _Cached(owner, time.monotonic()))

    def forget_key(self, key_id: str) -> None:
        for key_hash, entry in list(self._entries.items()):
            if entry.owner.key_id == key_id:
                self._entries.pop(key_hash)

    def forget_workspace(self, workspace_id: str) -> None:
        for key_hash, entry in list(self._entries.items()):
            if entry.owner.workspace_id == workspace_id:
                self._entries.pop(key_hash)

    def due_for_touch(self, key_id: str) -> bool:
        now = time.monotonic()
        last = self._touched.get(key_id)
        if last is not None and now - last < TOUCH_SECONDS:
            return False
        self._touched.put(key_id, now)
        return True
