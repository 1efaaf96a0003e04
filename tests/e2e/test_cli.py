"""The `imagegraph` command as a user runs it: in a subprocess, on the shipped examples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.builders import edge, node, workflow

pytestmark = pytest.mark.e2e
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def imagegraph(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagegraph", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("name", ["linear.json", "fan-out.yaml", "branch.json"])
def test_examples_validate(name: str) -> None:
    result = imagegraph("validate", str(EXAMPLES / name))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ")


def test_run_linear_example_writes_the_image(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = imagegraph(
        "run", str(EXAMPLES / "linear.json"), "--input", "Product=a red kettle", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    written = Path(result.stdout.strip())
    assert written == out / "product.webp"
    with Image.open(written) as image:
        assert (image.format, image.size) == ("WEBP", (384, 384))


def test_run_fan_out_example_writes_every_output(tmp_path: Path) -> None:
    result = imagegraph("run", str(EXAMPLES / "fan-out.yaml"), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(Path(line).name for line in result.stdout.split()) == [
        "sheet.png",
        "variant-1.jpg",
    ]


def test_run_branch_example_takes_one_route(tmp_path: Path) -> None:
    high = imagegraph(
        "run", str(EXAMPLES / "branch.json"), "-i", "Priority=0.9", "--out", str(tmp_path / "high")
    )
    low = imagegraph(
        "run", str(EXAMPLES / "branch.json"), "-i", "Priority=0.1", "--out", str(tmp_path / "low")
    )
    assert high.returncode == 0, high.stderr
    assert low.returncode == 0, low.stderr
    assert [Path(p).name for p in high.stdout.split()] == ["hero.webp"]
    assert [Path(p).name for p in low.stdout.split()] == ["thumbnail.jpg"]
    assert "skipped" in low.stderr


def test_run_reports_bad_input_and_exits_nonzero(tmp_path: Path) -> None:
    out_of_range = imagegraph(
        "run", str(EXAMPLES / "branch.json"), "-i", "Priority=2", "--out", str(tmp_path)
    )
    assert out_of_range.returncode == 1
    assert "value 2 is above the maximum 1" in out_of_range.stderr
    assert "Traceback" not in out_of_range.stderr
    unknown = imagegraph("run", str(EXAMPLES / "linear.json"), "-i", "Colour=red")
    assert unknown.returncode == 1
    assert "no input node has id or label 'Colour'" in unknown.stderr
    missing = imagegraph("run", str(tmp_path / "nope.json"))
    assert missing.returncode == 1
    assert "cannot read" in missing.stderr


def test_run_reports_a_failed_node(tmp_path: Path) -> None:
    document = workflow(
        [
            node("p", "input:text", text="x"),
            node("g", "generate:sandbox", width=64, height=64),
            node("c", "image:crop", width=100, height=100),
            node("o", "output:image"),
        ],
        [
            edge("p", "text", "g", "prompt"),
            edge("g", "image", "c", "image"),
            edge("c", "image", "o", "image"),
        ],
    )
    path = tmp_path / "failing.json"
    path.write_text(json.dumps(document))
    result = imagegraph("run", str(path), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "node c (image:crop) failed" in result.stderr
    assert "outside the 64x64 image" in result.stderr
    assert not (tmp_path / "out").exists()


def test_validate_lists_every_problem(tmp_path: Path) -> None:
    document = workflow(
        [node("a", "image:resize"), node("b", "image:crop"), node("x", "generate:nope")],
        [edge("a", "image", "b", "image"), edge("b", "image", "a", "image")],
    )
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(document))  # JSON is valid YAML
    result = imagegraph("validate", str(path))
    assert result.returncode == 1
    assert "unknown node type 'generate:nope'" in result.stderr
    assert "a -> b -> a" in result.stderr


def test_nodes_lists_every_type_as_json() -> None:
    result = imagegraph("nodes", "--json")
    assert result.returncode == 0
    types = {n["type"] for n in json.loads(result.stdout)}
    assert {"input:text", "generate:sandbox", "output:image", "control:branch"} <= types


def test_serve_help_lists_the_options() -> None:
    result = imagegraph("serve", "--help")
    assert result.returncode == 0
    for option in ("--host", "--port", "--data-dir"):
        assert option in result.stdout
