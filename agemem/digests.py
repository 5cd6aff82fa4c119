"""Streaming sha256 of files (data-file hashes, Prefect cache keys, registry content hashes) and stable seeds."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def update_with_file(digest: Any, path: Path | str) -> None:
    """Feed the bytes of ``path`` into ``digest`` (a ``hashlib`` object), 1 MiB at a time."""
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)


def file_sha256(path: Path | str) -> str:
    """The sha256 hex digest of one file's bytes."""
    digest = hashlib.sha256()
    update_with_file(digest, path)
    return digest.hexdigest()


def _stable_u64(text: str) -> int:
    """The first 8 bytes of ``text``'s sha256: the same in every process (Python's ``hash`` of a str is not)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def stable_fraction(key: str) -> float:
    """A number in [0, 1) from ``key``, the same in every process."""
    return _stable_u64(key) / 2**64


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``, the same in every process."""
    return _stable_u64(":".join(map(str, parts))) >> 1


__all__ = ["file_sha256", "stable_fraction", "stable_seed", "update_with_file"]
