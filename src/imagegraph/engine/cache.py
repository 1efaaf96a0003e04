"""Keys of the node output cache.

A key is the hash of (workspace, node type, node version, canonical params, content hash of
each input). Inputs are hashed by what they are, not by where they came from, so computing a
key costs the same for the first node of a chain as for the thousandth. Cached outputs point
at the workspace's own assets, so workspaces never share entries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from imagegraph.nodes.base import NodeParams
from imagegraph.nodes.values import content_hash


def cache_key(
    workspace_id: str,
    node_type: str,
    version: str,
    params: NodeParams | Mapping[str, Any],
    inputs: Mapping[str, Any],
) -> str:
    if isinstance(params, NodeParams):
        params = params.model_dump(mode="json", by_alias=True)
    material = {
        "workspace": workspace_id,
        "type": node_type,
        "version": version,
        "params": params,
        "inputs": {port: content_hash(value) for port, value in sorted(inputs.items())},
    }
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
