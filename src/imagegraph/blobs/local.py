"""Blobs as files in a directory: `<root>/ab/<sha256>`.

One level of 256 folders (as git does): folders fill evenly, and after the first few
hundred writes every folder exists, so a write is one create and one rename.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from pathlib import Path

from imagegraph.blobs.base import sha256_hex

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class LocalBlobStore:
    """Content-addressed files. Writes go to a temporary file and are renamed into place, so a
    crash never leaves a partial blob under its final name.

    >>> import tempfile
    >>> store = LocalBlobStore(Path(tempfile.mkdtemp()))
    >>> store.get(store.put(b"abc"))
    b'abc'
    """

    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.root = root
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = str(root)
        self._folders: set[str] = set()
        self._counter = itertools.count()

    def path(self, sha256: str) -> Path:
        # The name is checked, never joined blindly: nothing outside the root can be addressed.
        if not _SHA256.match(sha256):
            raise KeyError(sha256)
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes, sha256: str | None = None) -> str:
        digest = sha256 or sha256_hex(data)
        if not _SHA256.match(digest):
            raise KeyError(digest)
        # Plain strings and os calls: this runs for every image a node makes.
        folder = os.path.join(self._root, digest[:2])
        target = os.path.join(folder, digest)
        if os.path.exists(target):
            return digest
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        # A unique temporary name in the same folder, then an atomic rename.
        tmp = os.path.join(folder, f".tmp-{digest[:16]}-{os.getpid()}-{next(self._counter)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return digest

    def get(self, sha256: str) -> bytes:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise KeyError(sha256) from None

    def exists(self, sha256: str) -> bool:
        try:
            return self.path(sha256).exists()
        except KeyError:
            return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
