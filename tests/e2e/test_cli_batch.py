"""`imagegraph batch` and `imagegraph reproduce` as a user runs them: in a subprocess, in
this process or against a server; resumed after Ctrl-C and SIGKILL; refusing bad items by
line."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import pytest

from imagegraph import cli_batch
from imagegraph.batches import expand
from tests.builders import edge, linear, node, workflow
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.e2e
FOLDER = re.compile(r"^batch-\d{4}-\d{2}-\d{2}-batch_[0-9A-Z]+$")


def imagegraph(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagegraph", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value))
    return path


def query(database: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(database, timeout=10) as conn:
        return conn.execute(sql, params).fetchall()


@dataclass
class Done:
    """A batch the CLI ran in-process, and what it was given."""

    root: Path
    workflow: Path
    items: Path
    out: Path
    result: subprocess.CompletedProcess[str]

    @property
    def folder(self) -> Path:
        return Path(self.result.stdout.strip())

    @property
    def manifest(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.folder / "manifest.json").read_text())
        return loaded

    @property
    def database(self) -> Path:
        return self.out / ".imagegraph" / "imagegraph.db"

    def again(self, *extra: str | Path) -> subprocess.CompletedProcess[str]:
        return imagegraph("batch", self.workflow, self.items, "--out", self.out, *extra)


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Done:
    root = tmp_path_factory.mktemp("batch")
    workflow = write_json(root / "linear.json", linear(seed=None, size=64))
    items = root / "items.csv"
    items.write_text("Prompt\na red fox\na blue heron\na grey wolf\nan owl\na red fox\n")
    out = root / "out"
    result = imagegraph("batch", workflow, items, "--out", out, "--concurrency", "2")
    assert result.returncode == 0, result.stderr
    return Done(root, workflow, items, out, result)


def test_in_process_batch_writes_the_layout_and_the_manifest(done: Done) -> None:
    folder = done.folder
    assert folder.parent == done.out
    assert FOLDER.match(folder.name), folder.name
    assert sorted(p.name for p in (folder / "pending-review").iterdir()) == [
        f"{i:05d}-out.png" for i in range(5)
    ]
    assert list((folder / "approved").iterdir()) == list((folder / "rejected").iterdir()) == []
    assert "5 completed, 0 failed" in done.result.stderr
    assert "(1 deduplicated)" in done.result.stderr

    manifest = done.manifest
    state = json.loads((done.out / ".imagegraph-batch.json").read_text())
    assert manifest["batchId"] == state["batchId"]
    assert folder.name == manifest["folder"]
    assert (manifest["status"], manifest["workflowVersion"], manifest["mode"]) == (
        "COMPLETED",
        1,
        "live",
    )
    assert manifest["counts"]["completed"] == 5
    assert manifest["options"]["concurrency"] == 2
    entries = manifest["items"]
    assert [e["inputs"] for e in entries] == [
        {"Prompt": p} for p in ("a red fox", "a blue heron", "a grey wolf", "an owl", "a red fox")
    ]
    for entry in entries:
        assert entry["status"] == "COMPLETED"
        (output,) = entry["outputs"]
        assert output["sha256"] == sha256(folder / output["file"])
        assert output["seed"] == entry["seed"] is not None
        assert output["reviewState"] == "pending-review"
    assert entries[4]["duplicateOf"] == entries[0]["itemId"]
    assert entries[4]["outputs"][0]["sha256"] == entries[0]["outputs"][0]["sha256"]

    assert state["dataDir"] == str((done.out / ".imagegraph").resolve())
    assert state["server"] is None
    assert state["items"]["sha256"] == sha256(done.items)
    assert state["workflow"]["id"] == manifest["workflowId"]


def test_the_same_command_follows_the_same_batch_and_other_input_is_refused(
    done: Done,
) -> None:
    batch_id = done.manifest["batchId"]
    again = done.again("--concurrency", "2")
    assert again.returncode == 0, again.stderr
    assert f"following batch {batch_id} again" in again.stderr
    assert again.stdout == done.result.stdout
    assert query(done.database, "SELECT id FROM batches") == [(batch_id,)]

    other_items = done.root / "other.csv"
    other_items.write_text("Prompt\na hare\n")
    refused = imagegraph("batch", done.workflow, other_items, "--out", done.out)
    assert refused.returncode == 2
    assert f"already holds batch {batch_id}" in refused.stderr
    assert "the items file is not the same" in refused.stderr
    assert "Pick a new --out" in refused.stderr

    other_workflow = write_json(done.root / "bigger.json", linear(seed=None, size=96))
    refused = imagegraph("batch", other_workflow, done.items, "--out", done.out)
    assert refused.returncode == 2
    assert "the workflow is not the same" in refused.stderr
    refused = done.again("--runs", "2")
    assert refused.returncode == 2
    assert "runsPerItem was 1, now 2" in refused.stderr
    assert query(done.database, "SELECT COUNT(*) FROM batches") == [(1,)]


def test_reproduce_makes_the_same_image_again(done: Done, tmp_path: Path) -> None:
    # Without cached outputs, the generator really runs again.
    query(done.database, "DELETE FROM node_cache")
    manifest_path = done.folder / "manifest.json"
    result = imagegraph("reproduce", manifest_path, "--item", "2", "--out", tmp_path / "again")
    assert result.returncode == 0, result.stderr
    made = tmp_path / "again" / "00002-out.png"
    assert result.stdout.split() == [str(made)]
    assert made.read_bytes() == (done.folder / "pending-review" / "00002-out.png").read_bytes()
    assert "reproduced exactly" in result.stderr
    (cached,) = query(
        done.database,
        "SELECT r.cached FROM node_runs r JOIN executions e ON e.id = r.execution_id "
        "WHERE e.batch_id IS NULL AND r.node_id = 'gen'",
    )
    assert cached == (0,)

    tampered = json.loads(manifest_path.read_text())
    tampered["items"][2]["outputs"][0]["sha256"] = "0" * 64
    copy = write_json(done.folder.parent / "tampered.json", tampered)
    not_there = imagegraph("reproduce", copy, "--item", "2", "--data-dir", done.out)
    assert not_there.returncode == 2  # the data directory is --out/.imagegraph, not --out
    assert "no imagegraph database in" in not_there.stderr
    assert not (done.out / "imagegraph.db").exists()
    differs = imagegraph(
        "reproduce",
        copy,
        "--item-id",
        str(tampered["items"][2]["itemId"]),
        "--out",
        tmp_path / "again",
        "--data-dir",
        done.out / ".imagegraph",
    )
    assert differs.returncode == 3, differs.stderr
    assert "did not come out the same" in differs.stderr
    missing = imagegraph("reproduce", manifest_path, "--item", "9")
    assert missing.returncode == 2
    assert "the manifest has no item 9, run 0" in missing.stderr


def interrupt_when(
    command: list[str], out: Path, completed: int, signum: signal.Signals
) -> subprocess.CompletedProcess[str]:
    """Run the CLI; once `completed` items are done and others are running, send `signum`."""
    database = out / ".imagegraph" / "imagegraph.db"
    process = subprocess.Popen(
        [sys.executable, "-m", "imagegraph", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    try:
        while True:
            assert process.poll() is None, "the batch ended before it could be interrupted"
            assert time.monotonic() < deadline
            counts = []
            if (out / ".imagegraph-batch.json").exists():
                counts = query(database, "SELECT completed, running FROM batches")
            if counts and counts[0][0] >= completed and counts[0][1] > 0:
                break
            time.sleep(0.05)
    finally:
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=30)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_ctrl_c_then_sigkill_then_the_same_command_finishes_the_batch(tmp_path: Path) -> None:
    total = 24
    workflow = write_json(tmp_path / "slow.json", linear(seed=None, size=64, delay_ms=400))
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"Prompt": f"item {i}"}) + "\n" for i in range(total)))
    out = tmp_path / "out"
    command = ["batch", str(workflow), str(items), "--out", str(out), "--concurrency", "4"]
    database = out / ".imagegraph" / "imagegraph.db"

    first = interrupt_when(command, out, 4, signal.SIGINT)
    assert first.returncode == 130, first.stderr
    assert "stops with this process and goes on where it was" in first.stderr
    assert f"--out {out}" in first.stderr
    assert query(database, "SELECT status FROM batches") == [("RUNNING",)]

    second = interrupt_when(command, out, 12, signal.SIGKILL)
    assert second.returncode == -signal.SIGKILL
    assert query(database, "SELECT status FROM batches") == [("RUNNING",)]

    third = imagegraph(*command)
    assert third.returncode == 0, third.stderr
    assert "following batch" in third.stderr
    folder = Path(third.stdout.strip())
    manifest = json.loads((folder / "manifest.json").read_text())
    entries = manifest["items"]
    assert len(entries) == total
    assert len({e["executionId"] for e in entries}) == total
    assert all(e["status"] == "COMPLETED" for e in entries)
    assert len(list((folder / "pending-review").iterdir())) == total
    # One execution per item: none started twice, none lost.
    assert query(
        database,
        "SELECT COUNT(*), COUNT(DISTINCT batch_item_id) FROM executions WHERE batch_id = ?",
        manifest["batchId"],
    ) == [(total, total)]


def test_bad_items_exit_2_naming_the_line_with_nothing_queued(tmp_path: Path) -> None:
    workflow = write_json(tmp_path / "linear.json", linear(seed=None, size=64))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("Prompt,gen.steps\na fox,3\na crow\na hare,4\n")
    result = imagegraph("batch", workflow, ragged, "--out", tmp_path / "one")
    assert result.returncode == 2
    assert "ragged.csv line 3: has 1 cells, the header has 2 (Prompt, gen.steps)" in result.stderr
    assert "nothing was queued" in result.stderr
    assert not (tmp_path / "one").exists()

    unknown = tmp_path / "unknown.csv"
    unknown.write_text("Prompt,Colour\na fox,red\n")
    result = imagegraph("batch", workflow, unknown, "--out", tmp_path / "two")
    assert result.returncode == 2
    assert "line 2: column 'Colour' is not an input" in result.stderr
    assert not (tmp_path / "two" / ".imagegraph-batch.json").exists()
    database = tmp_path / "two" / ".imagegraph" / "imagegraph.db"
    assert query(database, "SELECT COUNT(*) FROM batches") == [(0,)]

    elsewhere = imagegraph("batch", workflow, tmp_path / "items.txt", "--out", tmp_path / "x")
    assert elsewhere.returncode == 2


def test_failed_items_exit_1_and_retry_failed_runs_them_again(tmp_path: Path) -> None:
    cropping = workflow(
        [
            node("prompt", "input:text", "Prompt", text="x"),
            node("gen", "generate:sandbox", width=64, height=64),
            node("crop", "image:crop", width=32, height=32),
            node("out", "output:image"),
        ],
        [
            edge("prompt", "text", "gen", "prompt"),
            edge("gen", "image", "crop", "image"),
            edge("crop", "image", "out", "image"),
        ],
    )
    path = write_json(tmp_path / "crop.json", cropping)
    items = tmp_path / "items.json"
    items.write_text(json.dumps([{"Prompt": "fits"}, {"Prompt": "too wide", "crop.width": 100}]))
    out = tmp_path / "out"
    result = imagegraph("batch", path, items, "--out", out)
    assert result.returncode == 1, result.stderr
    assert "1 of 2 items failed" in result.stderr
    assert "--retry-failed" in result.stderr
    folder = Path(result.stdout.strip())
    entries = json.loads((folder / "manifest.json").read_text())["items"]
    assert [e["status"] for e in entries] == ["COMPLETED", "FAILED"]
    assert "outside the 64x64 image" in entries[1]["error"]["message"]

    again = imagegraph("batch", path, items, "--out", out, "--retry-failed")
    assert again.returncode == 1, again.stderr
    assert "1 failed items run again" in again.stderr
    entries = json.loads((folder / "manifest.json").read_text())["items"]
    assert [e["attempts"] for e in entries] == [1, 2]


def test_against_a_server(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server").start()
    try:
        remote = ("--server", server.url, "--key", server.api_key)
        workflow = write_json(tmp_path / "linear.json", linear(seed=None, size=64))
        items = tmp_path / "items.csv"
        items.write_text("Prompt\na red fox\na blue heron\na grey wolf\n")
        out = tmp_path / "out"
        result = imagegraph("batch", workflow, items, "--out", out, *remote)
        assert result.returncode == 0, result.stderr
        folder = Path(result.stdout.strip())
        assert folder.parent == out
        assert FOLDER.match(folder.name)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["counts"]["completed"] == 3
        for entry in manifest["items"]:
            (output,) = entry["outputs"]
            assert output["file"] == f"pending-review/{entry['index']:05d}-out.png"
            assert output["sha256"] == sha256(folder / output["file"])
        state = json.loads((out / ".imagegraph-batch.json").read_text())
        assert (state["server"], state["dataDir"]) == (server.url, None)
        assert not (out / ".imagegraph").exists()
        assert [p.name for p in out.iterdir() if p.name.endswith(".zip")] == []

        # The same workflow file again: the saved workflow, not a new one or a new version.
        status, workflows = server.request("GET", "/api/v1/workflows")
        assert [(w["id"], w["version"]) for w in workflows["items"]] == [
            (manifest["workflowId"], 1)
        ]
        by_id = imagegraph("batch", manifest["workflowId"], items, "--out", tmp_path / "b", *remote)
        assert by_id.returncode == 0, by_id.stderr
        assert (
            json.loads((tmp_path / "b" / ".imagegraph-batch.json").read_text())["workflow"][
                "version"
            ]
            == 1
        )

        bad = tmp_path / "bad.csv"
        bad.write_text('Prompt\na fox\n"unclosed\na hare,extra\n')
        refused = imagegraph("batch", workflow, bad, "--out", tmp_path / "bad", *remote)
        assert refused.returncode == 2
        assert "bad.csv line" in refused.stderr
        missing = tmp_path / "missing.csv"
        missing.write_text("Colour\nred\n")
        refused = imagegraph("batch", workflow, missing, "--out", tmp_path / "bad", *remote)
        assert refused.returncode == 2
        assert "line 2: column 'Colour' is not an input" in refused.stderr
        status, batches = server.request("GET", "/api/v1/batches")
        assert len(batches["items"]) == 2  # nothing queued by the refused ones

        result = imagegraph(
            "reproduce", folder / "manifest.json", "--item", "1", "--out", tmp_path / "r", *remote
        )
        assert result.returncode == 0, result.stderr
        made = tmp_path / "r" / "00001-out.png"
        assert made.read_bytes() == (folder / "pending-review" / "00001-out.png").read_bytes()

        # A variant's run with its own seed, made again on the server.
        status, created = server.request(
            "POST",
            "/api/v1/batches",
            {
                "workflowId": manifest["workflowId"],
                "items": [{"Prompt": "a lynx"}, {"Prompt": "a stoat"}],
                "runsPerItem": 2,
                "variants": [
                    {"name": "few", "nodes": [{"id": "gen", "data": {"params": {"steps": 4}}}]},
                    {"name": "many", "nodes": [{"id": "gen", "data": {"params": {"steps": 40}}}]},
                ],
            },
        )
        assert status == 201, created
        deadline = time.monotonic() + 30
        while server.request("GET", f"/api/v1/batches/{created['batchId']}")[1]["status"] != (
            "COMPLETED"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, variants = server.request("GET", f"/api/v1/batches/{created['batchId']}/manifest")
        path = write_json(tmp_path / "variants.json", variants)
        ambiguous = imagegraph("reproduce", path, "--item", "1", "--run", "1", *remote)
        assert ambiguous.returncode == 2
        assert "choose one with --variant" in ambiguous.stderr
        result = imagegraph(
            "reproduce",
            path,
            *("--item", "1", "--run", "1", "--variant", "many", "--out", tmp_path / "v"),
            *remote,
        )
        assert result.returncode == 0, result.stderr
        (entry,) = [
            e for e in variants["items"] if (e["index"], e["run"], e["variant"]) == (1, 1, "many")
        ]
        assert (
            sha256(tmp_path / "v" / Path(entry["outputs"][0]["file"]).name)
            == (entry["outputs"][0]["sha256"])
        )
    finally:
        server.stop()


def test_the_seed_strategies_are_the_engine_s() -> None:
    assert get_args(cli_batch.SeedStrategy) == get_args(expand.SeedStrategy)
    assert expand.SEED_LIMIT == cli_batch.SEED_LIMIT
