"""Fakes for testing code that uses imagegraph, shipped with it.

`MemoryContext` runs a node type without an engine, database or network: write a node, call
its `run` with a `MemoryContext`, and look at what it stored. Never imported by the engine.
"""

from imagegraph.testing.context import MemoryContext, StoredImage

__all__ = ["MemoryContext", "StoredImage"]
