"""The README's curl walkthrough, run as written against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(
        r"<!-- walkthrough:start -->\n```bash\n(.*?)```\n<!-- walkthrough:end -->", text, re.DOTALL
    )
    assert match, "README has no walkthrough block"
    return match.group(1)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "data").start()
    yield process
    process.stop()


def test_readme_walkthrough_works_as_written(server: ServerProcess, tmp_path: Path) -> None:
    script = walkthrough()
    assert "IG=http://127.0.0.1:8000\n" in script
    script = script.replace("IG=http://127.0.0.1:8000\n", f"IG={server.url}\n", 1)
    script = script.replace("~/.imagegraph", str(server.data_dir))
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "examples").symlink_to(ROOT / "examples")
    (workdir / ".venv").symlink_to(Path(sys.executable).parents[1])
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"status": "COMPLETED"' in result.stdout
    assert (workdir / "teapot.webp").read_bytes()[8:12] == b"WEBP"
    events = [line for line in result.stdout.splitlines() if line.startswith("event:")]
    assert events[0] == "event: execution.queued"
    assert "event: node.progress" in events
    assert events[-1] == "event: execution.completed"
    out = result.stdout.lower()
    # 7: the retry was a replay of the first answer.
    locations = re.findall(r"^location: (\S+)", out, re.MULTILINE)
    assert len(locations) == 2
    assert locations[0] == locations[1]
    assert "idempotent-replayed: true" in out
    # 8: a 402 with the price of each node.
    assert '"status": 402' in result.stdout
    assert '"requiredcredits": 5000' in out
    assert '"nodeid": "generate"' in out
    # 9: the trigger started an execution.
    assert re.search(r'\{"executionid":"exec_\w+","status":"queued"\}', out)
    # 10: ten requests pass, the eleventh is refused, and the next says when to come back.
    assert "200 200 200 200 200 200 200 200 200 200 429" in out
    assert re.search(r"^retry-after: \d+", out, re.MULTILINE)
    assert '"requests";q=10;w=60' in out
