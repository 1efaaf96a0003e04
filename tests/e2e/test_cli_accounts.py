"""`imagegraph serve` bootstrap and the key, credit and workspace commands, as a user runs
them: a real server, the CLI in subprocesses, the key read from the data directory."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagegraph import keys
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.e2e


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "data").start()
    yield process
    process.stop()


def imagegraph(
    server: ServerProcess, *args: str, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGRAPH_")}
    env["IMAGEGRAPH_URL"] = server.url
    env["IMAGEGRAPH_DATA_DIR"] = str(server.data_dir)
    if key is not None:
        env["IMAGEGRAPH_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "imagegraph", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_first_start_prints_the_admin_key_once_and_saves_it_privately(
    server: ServerProcess,
) -> None:
    secret = server.api_key
    assert keys.parse(secret) == "live"
    path = server.data_dir / "admin.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    log = server.log.read_text()
    assert log.count(secret) == 1
    server.stop()
    server.start()
    assert server.log.read_text().count(secret) == 1  # not printed again
    assert server.api_key == secret
    status, _ = server.request("GET", "/api/v1/workspace")
    assert status == 200


def test_keys_create_list_and_revoke(server: ServerProcess) -> None:
    created = imagegraph(server, "keys", "create", "render farm", "--scope", "executions:write")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert keys.parse(secret) == "live"
    assert "shown this once" in created.stderr

    listed = imagegraph(server, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert secret not in listed.stdout
    [entry] = [k for k in json.loads(listed.stdout) if k["name"] == "render farm"]
    assert entry["last4"] == secret[-4:]
    assert entry["scopes"] == ["executions:write"]
    table = imagegraph(server, "keys", "list")
    assert entry["id"] in table.stdout

    status, _ = server.request(
        "GET", "/api/v1/workflows", headers={"Authorization": f"Bearer {secret}"}
    )
    assert status == 200
    revoked = imagegraph(server, "keys", "revoke", entry["id"])
    assert revoked.returncode == 0, revoked.stderr
    status, body = server.request(
        "GET", "/api/v1/workflows", headers={"Authorization": f"Bearer {secret}"}
    )
    assert status == 401
    assert body["code"] == "unauthorized"

    # A key without admin rights cannot manage keys: one clear line, exit 1.
    refused = imagegraph(server, "keys", "list", key=created.stdout.strip())
    assert refused.returncode == 1
    assert "401 unauthorized" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_test_keys_and_credits(server: ServerProcess) -> None:
    test_key = imagegraph(server, "keys", "create", "ci", "--test")
    assert test_key.stdout.strip().startswith("sk-test-")
    added = imagegraph(server, "credits", "add", "250", "--note", "invoice 12")
    assert added.returncode == 0, added.stderr
    assert "balance 1250" in added.stdout
    shown = imagegraph(server, "credits", "show")
    assert shown.returncode == 0, shown.stderr
    assert "available 1250" in shown.stdout


def test_workspaces_create_makes_an_isolated_workspace_with_its_own_admin_key(
    server: ServerProcess,
) -> None:
    made = imagegraph(server, "workspaces", "create", "Acme", "--plan", "free", "--credits", "5")
    assert made.returncode == 0, made.stderr
    acme_key = made.stdout.strip()
    status, body = server.request(
        "GET", "/api/v1/workspace", headers={"Authorization": f"Bearer {acme_key}"}
    )
    assert status == 200
    assert body["name"] == "Acme"
    assert body["plan"]["name"] == "free"
    assert body["credits"]["balance"] == 5
    status, body = server.request(
        "GET", "/api/v1/workflows", headers={"Authorization": f"Bearer {acme_key}"}
    )
    assert body["items"] == []
    unknown = imagegraph(server, "workspaces", "create", "X", "--plan", "platinum")
    assert unknown.returncode == 1
    assert "unknown plan 'platinum'" in unknown.stderr


def test_without_a_key_the_cli_says_how_to_give_one(server: ServerProcess, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGRAPH_")}
    env["HOME"] = str(tmp_path)  # no ~/.imagegraph/admin.key there
    result = subprocess.run(
        [sys.executable, "-m", "imagegraph", "keys", "list", "--url", server.url],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "no API key" in result.stderr
