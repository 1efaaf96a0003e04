"""Small builders for workflow documents in tests."""

from __future__ import annotations

from typing import Any


def node(node_id: str, node_type: str, label: str | None = None, **params: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"nodeType": node_type, "params": params}
    if label is not None:
        data["label"] = label
    return {"id": node_id, "type": "basedNode", "position": {"x": 0, "y": 0}, "data": data}


def edge(
    source: str, source_handle: str, target: str, target_handle: str, edge_id: str | None = None
) -> dict[str, Any]:
    return {
        "id": edge_id or f"{source}.{source_handle}-{target}.{target_handle}",
        "source": source,
        "sourceHandle": source_handle,
        "target": target,
        "targetHandle": target_handle,
    }


def workflow(
    nodes: list[dict[str, Any]], edges: list[dict[str, Any]], name: str = "test workflow"
) -> dict[str, Any]:
    return {"name": name, "nodes": nodes, "edges": edges}


def linear(
    prompt: str = "a red fox in the snow",
    *,
    seed: int | None = 7,
    size: int = 128,
    delay_ms: int = 0,
    out_format: str = "png",
) -> dict[str, Any]:
    """Prompt -> sandbox generator -> output."""
    gen_params: dict[str, Any] = {"width": size, "height": size, "delayMs": delay_ms}
    if seed is not None:
        gen_params["seed"] = seed
    return workflow(
        [
            node("prompt", "input:text", "Prompt", text=prompt),
            node("gen", "generate:sandbox", **gen_params),
            node("out", "output:image", format=out_format),
        ],
        [edge("prompt", "text", "gen", "prompt"), edge("gen", "image", "out", "image")],
        name="linear",
    )


def fan_out(delay_ms: int = 0, count: int = 4, size: int = 96) -> dict[str, Any]:
    """Prompt -> `count` generators with different seeds -> collect -> grid -> output."""
    nodes = [node("prompt", "input:text", "Prompt", text="four seasons")]
    edges = []
    for i in range(count):
        nodes.append(
            node(f"gen{i}", "generate:sandbox", width=size, height=size, seed=i, delayMs=delay_ms)
        )
        edges.append(edge("prompt", "text", f"gen{i}", "prompt"))
        edges.append(edge(f"gen{i}", "image", "collect", "images"))
    nodes += [
        node("collect", "control:collect"),
        node("grid", "image:grid", cellWidth=64, cellHeight=64),
        node("out", "output:image"),
    ]
    edges += [edge("collect", "images", "grid", "images"), edge("grid", "image", "out", "image")]
    return workflow(nodes, edges, name="fan-out")


def templated() -> dict[str, Any]:
    """Subject -> template "${subject} in ${style} style" (style defaults to watercolor,
    negative prompt "blurry") -> sandbox 64x64 -> output."""
    return workflow(
        [
            node(
                "tpl",
                "prompt:template",
                template="${subject} in ${style} style",
                negativePrompt="blurry",
                variables={"style": "watercolor"},
            ),
            node("subject", "input:text", "Subject"),
            node("gen", "generate:sandbox", width=64, height=64),
            node("out", "output:image"),
        ],
        [
            edge("subject", "text", "tpl", "subject"),
            edge("tpl", "text", "gen", "prompt"),
            edge("tpl", "negativePrompt", "gen", "negativePrompt"),
            edge("gen", "image", "out", "image"),
        ],
        name="template",
    )
