"""Read and write ``scripts.jsonl`` / ``episodes.jsonl`` (one :class:`EpisodeScript` per line).

Writes are crash-safe: whole files go to a temporary name then ``os.replace`` (atomic on POSIX);
incremental work is appended line by line with a flush, and a reader skips a torn last line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from pydantic import ValidationError

from agemem.data.records import EpisodeScript

logger = logging.getLogger(__name__)


class EpisodeFileError(ValueError):
    """An episodes/scripts file is missing or has a malformed line."""


def dump_line(episode: EpisodeScript) -> str:
    """The canonical one-line JSON of an episode (stable field order, so reruns are byte-identical)."""
    return episode.model_dump_json() + "\n"


def _first_problem(exc: ValidationError) -> str:
    """One line about a line that is not an episode: its first error, and how many more there are."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": str(exc).splitlines()[0]}
    where = ".".join(str(p) for p in first.get("loc", ())) or "line"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


def iter_episodes(path: Path | str) -> Iterator[EpisodeScript]:
    """Episodes of a JSONL file, in file order.

    A malformed or non-UTF-8 line raises ONE line naming ``path:line``; a torn last line (no
    newline at the end of the file, as a crash mid-append leaves it) that does not parse is
    skipped with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise EpisodeFileError(f"{path}: no such episodes file")
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            torn = not raw.endswith(b"\n")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if torn:
                    logger.warning("%s:%d: skipping a torn last line (%d bytes)", path, n, len(raw))
                    return
                raise EpisodeFileError(
                    f"{path}:{n}: not UTF-8 text (byte {exc.start} of the line is {raw[exc.start]:#04x}); "
                    "the file is corrupt: rebuild it"
                ) from None
            if not line.strip():
                continue
            try:
                episode = EpisodeScript.model_validate_json(line)
            except ValidationError as exc:
                if torn:
                    logger.warning("%s:%d: skipping a torn last line (%d bytes)", path, n, len(raw))
                    return
                raise EpisodeFileError(f"{path}:{n}: not an episode script: {_first_problem(exc)}") from None
            yield episode


def read_episodes(path: Path | str) -> list[EpisodeScript]:
    """All episodes of ``scripts.jsonl`` or ``episodes.jsonl``."""
    return list(iter_episodes(path))


def write_episodes(episodes: Iterable[EpisodeScript], path: Path | str) -> str:
    """Write atomically (temp file + rename); return the sha256 of the bytes written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for ep in episodes:
            line = dump_line(ep)
            digest.update(line.encode())
            fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return digest.hexdigest()


def write_json(data: Any, path: Path | str) -> None:
    """Small JSON side files (stats, metadata), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path | str) -> Any | None:
    """A JSON side file, or None when it is missing or unreadable (then the work is redone)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def recover_partial(path: Path | str) -> dict[str, EpisodeScript]:
    """Completed episodes of an append-only partial file, by episode id.

    A crash can leave a torn last line; it is dropped and the file truncated to the last complete
    line, so appending resumes cleanly. Unparseable complete lines are dropped too (and redone).
    """
    path = Path(path)
    done: dict[str, EpisodeScript] = {}
    if not path.exists():
        return done
    good_bytes = 0
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                logger.warning("%s: dropping a torn last line (%d bytes)", path, len(raw))
                break
            try:
                ep = EpisodeScript.model_validate_json(raw)
            except ValidationError:
                logger.warning("%s: dropping a malformed line at byte %d", path, good_bytes)
                break
            done[ep.episode_id] = ep
            good_bytes += len(raw)
    with path.open("r+b") as fh:
        fh.truncate(good_bytes)
    return done


def append_line(fh: IO[str], episode: EpisodeScript) -> None:
    """Append one completed episode and flush, so a crash loses at most the line being written."""
    fh.write(dump_line(episode))
    fh.flush()
