"""Where image bytes live: content-addressed by sha256, behind one small interface.

Embedded deployments use a local directory; scaled-out ones an S3-compatible bucket. Blob
stores know nothing of assets, executions or the database.
"""

from imagegraph.blobs.base import BlobStore, sha256_hex
from imagegraph.blobs.local import LocalBlobStore

__all__ = ["BlobStore", "LocalBlobStore", "sha256_hex"]
