"""What a workflow document is: React-Flow-shaped JSON (or the same as YAML).

The editor saves exactly what the engine runs. Fields the editor adds for itself (node
`width`, `selected`, a `viewport`) are kept as they are; everything the engine reads is
typed here and checked in `graph.validate`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from imagegraph.errors import InvalidInput, Issue

NODE_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"

# Fields a client may send back after a GET; they describe the stored workflow and are ignored.
READ_ONLY_FIELDS = frozenset({"id", "version", "createdAt", "updatedAt", "latestVersion"})


class Position(BaseModel):
    model_config = ConfigDict(extra="allow")

    x: float = 0.0
    y: float = 0.0


class NodeData(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    node_type: str = Field(alias="nodeType", min_length=1, max_length=200)
    label: str | None = Field(default=None, max_length=200)
    category: str | None = Field(default=None, max_length=100)
    params: dict[str, Any] = Field(default_factory=dict)


class GraphNode(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str = Field(pattern=NODE_ID_PATTERN)
    type: str = "basedNode"
    position: Position = Field(default_factory=Position)
    data: NodeData

    @property
    def node_type(self) -> str:
        return self.data.node_type

    @property
    def label(self) -> str | None:
        return self.data.label


class GraphEdge(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    id: str | None = Field(default=None, max_length=256)
    source: str = Field(min_length=1, max_length=128)
    target: str = Field(min_length=1, max_length=128)
    source_handle: str | None = Field(default=None, alias="sourceHandle", max_length=128)
    target_handle: str | None = Field(default=None, alias="targetHandle", max_length=128)

    @property
    def key(self) -> str:
        """The edge id, or a stable description when the document gave none."""
        if self.id:
            return self.id
        return (
            f"{self.source}.{self.source_handle or '?'}->{self.target}.{self.target_handle or '?'}"
        )


class WorkflowDoc(BaseModel):
    """A workflow as saved, exported and executed.

    >>> WorkflowDoc.model_validate({"name": "x", "nodes": [], "edges": []}).name
    'x'
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="Untitled workflow", min_length=1, max_length=200)
    description: str = Field(default="", max_length=5000)
    nodes: list[GraphNode] = Field(default_factory=list)
    edges: list[GraphEdge] = Field(default_factory=list)
    viewport: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip() or "Untitled workflow"

    def to_json(self) -> dict[str, Any]:
        """The document as sent (explicit nulls from an editor included), with its name."""
        data = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        data["name"] = self.name
        data.setdefault("edges", [])
        return data

    def node(self, node_id: str) -> GraphNode | None:
        for node in self.nodes:
            if node.id == node_id:
                return node
        return None


def parse_workflow(
    raw: bytes | str | Mapping[str, Any], fmt: Literal["json", "yaml", "auto"] = "auto"
) -> WorkflowDoc:
    """Parse a workflow from JSON or YAML text, or from an already decoded mapping.

    Raises `InvalidInput` naming the line of a syntax error or the path of each bad field.
    """
    data = raw if isinstance(raw, Mapping) else decode_document(raw, fmt)
    if not isinstance(data, Mapping):
        raise InvalidInput(
            "a workflow must be an object with 'nodes' and 'edges'",
            [Issue("invalid_document", "a workflow must be an object with 'nodes' and 'edges'")],
        )
    cleaned = {k: v for k, v in data.items() if k not in READ_ONLY_FIELDS}
    try:
        return WorkflowDoc.model_validate(cleaned)
    except ValidationError as exc:
        issues = issues_from_validation_error(exc, cleaned)
        raise InvalidInput(f"workflow document is malformed: {issues[0].message}", issues) from None


def decode_document(raw: bytes | str, fmt: Literal["json", "yaml", "auto"] = "auto") -> Any:
    """Decode JSON or YAML text into Python data, with errors that name the line."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    if fmt == "json" or (fmt == "auto" and text.lstrip().startswith(("{", "["))):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            message = f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            error = InvalidInput(message, [Issue("invalid_json", message)])
        if fmt == "json":
            raise error
        try:  # `{name: x}` is a YAML flow mapping, not broken JSON
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise error from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        message = f"invalid YAML{where}: {problem}"
        raise InvalidInput(message, [Issue("invalid_yaml", message)]) from None


def issues_from_validation_error(exc: ValidationError, data: Mapping[str, Any]) -> list[Issue]:
    """Turn pydantic errors into issues with a readable path and, when known, the node id."""
    issues = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        path = format_loc(loc)
        node_id = _id_at(data, "nodes", loc)
        edge_id = _id_at(data, "edges", loc)
        issues.append(
            Issue(
                "invalid_field",
                f"{path}: {error_message(error)}",
                node_id=node_id,
                edge_id=edge_id,
                field=path or None,
            )
        )
    return issues


def _id_at(data: Mapping[str, Any], kind: str, loc: tuple[int | str, ...]) -> str | None:
    """The `id` of the node or edge an error location points into, if it has one."""
    if len(loc) < 2 or loc[0] != kind or not isinstance(loc[1], int):
        return None
    items = data.get(kind)
    if not isinstance(items, list) or loc[1] >= len(items) or not isinstance(items[loc[1]], dict):
        return None
    value = items[loc[1]].get("id")
    return value if isinstance(value, str) else None


def error_message(error: Mapping[str, Any]) -> str:
    """A pydantic error message without the "Value error, " prefix custom validators get."""
    message = str(error.get("msg", "invalid"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def format_loc(loc: tuple[int | str, ...]) -> str:
    """('nodes', 2, 'data', 'nodeType') -> 'nodes[2].data.nodeType'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
