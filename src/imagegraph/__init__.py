"""imagegraph: a self-hosted engine for AI image workflows."""

__version__ = "0.1.0"
