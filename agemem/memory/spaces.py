"""Named memory spaces: memory sessions that persist across chats.

A space is a memory session whose id is ``space-<name>`` (a random session id is 32 hex digits,
so the two never collide). It is created like any session (``POST /sessions`` with ``{"space":
name}``, guarded by ``memory.server_token`` when the server has one) and is never deleted by the
idle sweeper; deleting it is explicit (its owner, or the admin view).

Who may open a space again: whoever holds its session token. The server keeps only a hash of it,
so the client keeps the token, in ``memory.spaces_file`` (default ``<runs_dir>/memory-spaces.json``,
mode 0600, one entry per store or server and name). This keeps the tool server's trust model as
it is (a session token opens only its own session; the server token only creates sessions and
guards the admin view) instead of adding a second way in by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agemem.memory.arguments import ArgumentError
from agemem.memory.base import MemoryClient, MemorySession

if TYPE_CHECKING:
    from agemem.settings import Settings

logger = logging.getLogger(__name__)

SPACE_PREFIX = "space-"
# The whole id must stay a 1-64 character safe token (what the store splices into a filter).
_NAME = re.compile(r"[A-Za-z0-9_\-]{1,%d}" % (64 - len(SPACE_PREFIX)))
_FILE_VERSION = 1


def check_space_name(name: Any) -> str:
    """``name`` if it can name a space (1-58 letters, digits, '_' or '-'); else :class:`ArgumentError`."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise ArgumentError(f"a memory space name is 1-{64 - len(SPACE_PREFIX)} letters, digits, '_' or '-', "
                            f"got {ascii(str(name)[:70])}")
    return name


def space_session_id(name: str) -> str:
    """The session id of the space ``name``."""
    return SPACE_PREFIX + check_space_name(name)


def space_name(session_id: str) -> str | None:
    """The space a session id belongs to, or None for an ordinary (rollout) session."""
    if isinstance(session_id, str) and session_id.startswith(SPACE_PREFIX):
        name = session_id[len(SPACE_PREFIX):]
        return name if _NAME.fullmatch(name) else None
    return None


def backend_key(settings: "Settings") -> str:
    """Which store a space lives in: the tool server's URL, else the store URI."""
    return settings.memory.server_url.rstrip("/") if settings.memory.server_url else settings.memory_uri


class SpaceTokens:
    """The session tokens of this machine's spaces on one backend, in a 0600 JSON file.

    Writes replace the file atomically under an advisory lock, so two chats opening spaces at
    once do not lose each other's entries.
    """

    def __init__(self, path: Path, backend: str) -> None:
        self.path = Path(path)
        self.backend = backend

    @classmethod
    def from_settings(cls, settings: "Settings") -> "SpaceTokens":
        return cls(settings.path(settings.memory.spaces_file), backend_key(settings))

    def _read(self) -> dict[str, Any]:
        try:
            mode = self.path.stat().st_mode
        except FileNotFoundError:
            return {"version": _FILE_VERSION, "backends": {}}
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("%s was readable by others (mode %o); restricting it to its owner", self.path,
                           stat.S_IMODE(mode))
            os.chmod(self.path, 0o600)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.path} is not valid JSON ({exc.msg}, line {exc.lineno}); fix or remove it "
                             "(memory.spaces_file)") from None
        if not isinstance(data, dict) or not isinstance(data.get("backends"), dict):
            raise ValueError(f"{self.path} is not a memory-spaces file (memory.spaces_file)")
        return data

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".spaces-", dir=self.path.parent)  # mkstemp files are 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.path.with_name(self.path.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            yield data
            self._write(data)
        finally:
            os.close(lock)

    def get(self, name: str) -> MemorySession | None:
        entry = self._read()["backends"].get(self.backend, {}).get(name)
        return MemorySession.model_validate(entry) if entry else None

    def put(self, name: str, session: MemorySession) -> None:
        with self._locked() as data:
            data["backends"].setdefault(self.backend, {})[name] = session.model_dump()

    def forget(self, name: str) -> bool:
        """Drop the token of ``name``; whether there was one."""
        with self._locked() as data:
            spaces = data["backends"].get(self.backend, {})
            return spaces.pop(name, None) is not None

    def names(self) -> list[str]:
        return sorted(self._read()["backends"].get(self.backend, {}))


async def open_space(client: MemoryClient, tokens: SpaceTokens, name: str) -> MemorySession:
    """The session of the space ``name``: the kept token if it still opens the space, else a new space.

    Raises ``LookupError`` when the space exists but this machine holds no valid token for it.
    """
    from agemem.memory.service import SessionAuthError, SpaceExistsError, UnknownSessionError

    check_space_name(name)
    known = tokens.get(name)
    if known is not None:
        try:
            await client.check_session(known)
            return known
        except UnknownSessionError:
            # Deleted (by its owner or the admin view): start it afresh, empty.
            logger.warning("memory space %r is gone from %s; starting it anew", name, tokens.backend)
            tokens.forget(name)
        except SessionAuthError:
            raise LookupError(f"the token kept for memory space {name!r} in {tokens.path} no longer opens it on "
                              f"{tokens.backend} (the space was re-created elsewhere); use another space name, "
                              f"or `agemem memory delete {name}` to drop it") from None
    try:
        session = await client.create_session(space=name)
    except SpaceExistsError:
        raise LookupError(f"memory space {name!r} exists on {tokens.backend} but {tokens.path} holds no token for "
                          f"it; use another space name, or export it with `agemem memory export {name}` and "
                          "import it under a new name (both need memory.server_token on a tool server)") from None
    tokens.put(name, session)
    logger.info("created memory space %r on %s", name, tokens.backend)
    return session


__all__ = [
    "SPACE_PREFIX",
    "SpaceTokens",
    "backend_key",
    "check_space_name",
    "open_space",
    "space_name",
    "space_session_id",
]
