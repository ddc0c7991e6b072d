"""A content-addressed folder of bytes: images and trajectories, named by their SHA-256.

``<root>/ab/cdef...``: the same image stored twice takes one file, a file's name proves its content,
and database rows stay small (they hold the digest). Writes go to a temporary file that is synced
and renamed into place, so a crash never leaves a half-written blob under a real name.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from data.files import write_atomically

_DIGEST = re.compile(r"[0-9a-f]{64}")


class BlobError(ValueError):
    """A digest that is malformed or names no stored blob."""


class BlobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, content: bytes) -> str:
        """Store bytes once under their SHA-256 and return it."""
        digest = hashlib.sha256(content).hexdigest()
        path = self.path(digest)
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            write_atomically(path, lambda temporary: temporary.write_bytes(content))
        return digest

    def get(self, digest: str) -> bytes:
        path = self.path(digest)
        if not path.exists():
            raise BlobError(f"blob {digest} is not in {self.root}")
        return path.read_bytes()

    def path(self, digest: str) -> Path:
        """The file for a digest; only 64 lowercase hex digits pass, so no digest can name a path outside."""
        if not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
            raise BlobError(f"{digest!r} is not a blob digest (64 lowercase hex digits of SHA-256)")
        return self.root / digest[:2] / digest[2:]
