"""What a model may write into a memory tool call: the one set of argument rules and limits.

Both sides use these: the episode engine (:func:`agemem.agent.tools.validate_call`, before a
call is sent) and the memory service (every call, in-process or over HTTP). Each validator is
pure and raises :class:`ArgumentError`, a ``ValueError`` whose text the model can read and whose
``kind`` the server maps to a status code. Anything that passes can be stored by Milvus and read
back: no lone surrogates or NUL characters, integers that fit int64, finite numbers, bounded
nesting and bounded sizes.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agemem.settings import MemorySettings

# Error kinds (ToolResult.data["error"]); the server maps them to HTTP status codes.
INVALID_ARGUMENTS = "invalid_arguments"
CONTENT_TOO_LARGE = "content_too_large"
EMPTY = "empty"

# Ids and memory types; used with ``fullmatch`` only (``$`` would let a trailing newline through).
SAFE_TOKEN = re.compile(r"[A-Za-z0-9_\-]{1,64}")
# Milvus standalone stores JSON integers as int64 (milvus-lite takes up to 2**64 - 1, then fails).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class ArgumentError(ValueError):
    """A tool argument the memory tools refuse; ``str(exc)`` is meant for the model."""

    def __init__(self, text: str, kind: str = INVALID_ARGUMENTS) -> None:
        super().__init__(text)
        self.kind = kind


@dataclass(frozen=True)
class ArgumentLimits:
    """The size limits of tool arguments (from the ``memory`` settings)."""

    max_content_bytes: int
    max_metadata_bytes: int
    max_metadata_depth: int
    max_top_k: int
    default_top_k: int

    @classmethod
    def from_settings(cls, memory: MemorySettings) -> ArgumentLimits:
        return cls(
            max_content_bytes=memory.max_content_bytes,
            max_metadata_bytes=memory.max_metadata_bytes,
            max_metadata_depth=memory.max_metadata_depth,
            max_top_k=memory.max_top_k,
            default_top_k=memory.default_top_k,
        )

    @classmethod
    @functools.cache
    def defaults(cls) -> ArgumentLimits:
        """The limits of default settings (a caller without settings at hand)."""
        from agemem.settings import MemorySettings

        return cls.from_settings(MemorySettings())


def is_safe_token(value: object) -> bool:
    """True for 1-64 letters, digits, '_' or '-' (the only values spliced into a Milvus filter)."""
    return isinstance(value, str) and SAFE_TOKEN.fullmatch(value) is not None


def _shown(value: str, n: int = 40) -> str:
    # ascii(): a lone surrogate or a control character must not travel on into the reply.
    return ascii(value[:n])


def _string_problem(value: str) -> str | None:
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode (lone surrogate {ascii(value[exc.start])} at character {exc.start})"
    return None


def check_text(name: str, value: Any, limits: ArgumentLimits) -> str:
    """A text argument (content, query, ...), stripped; at most ``max_content_bytes`` of UTF-8."""
    if not isinstance(value, str):
        raise ArgumentError(f"'{name}' must be a string, got {type(value).__name__}")
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > limits.max_content_bytes:
        raise ArgumentError(
            f"'{name}' is too long: {size} bytes; the limit is {limits.max_content_bytes} bytes", CONTENT_TOO_LARGE
        )
    problem = _string_problem(value)
    if problem:
        raise ArgumentError(f"'{name}' {problem}")
    value = value.strip()
    if not value:
        raise ArgumentError(f"'{name}' must not be empty", EMPTY)
    return value


def check_memory_type(value: Any) -> str:
    if not is_safe_token(value):
        shown = _shown(value) if isinstance(value, str) else type(value).__name__
        raise ArgumentError(f"'memory_type' must be 1-64 letters, digits, '_' or '-', got {shown}")
    return value


def check_memory_id(value: Any) -> str:
    if not is_safe_token(value):
        shown = _shown(value, 80) if isinstance(value, str) else type(value).__name__
        raise ArgumentError(f"'memory_id' {shown} is not a memory id (ids are the 'Memory ID' a tool result gave)")
    return value


def check_top_k(value: Any, limits: ArgumentLimits) -> int:
    if value is None:
        return limits.default_top_k
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"'top_k' must be an integer, got {type(value).__name__}")
    if not 1 <= value <= limits.max_top_k:
        raise ArgumentError(f"'top_k' must be between 1 and {limits.max_top_k}, got {value}")
    return value


def _reject_constant(name: str) -> Any:
    raise ArgumentError(f"'metadata_json' holds {name}, which JSON does not allow; use a number or a string")


def parse_metadata_json(raw: Any, limits: ArgumentLimits) -> dict[str, Any]:
    """The metadata object a ``metadata_json`` string holds ({} for none), checked as :func:`check_metadata`."""
    if raw is None:
        return {}
    if not isinstance(raw, str):
        raise ArgumentError(f"'metadata_json' must be a JSON object written as a string, got {type(raw).__name__}")
    problem = _string_problem(raw)
    if problem:
        raise ArgumentError(f"'metadata_json' {problem}")
    if not raw.strip():
        return {}
    size = len(raw.encode("utf-8"))
    if size > limits.max_metadata_bytes:
        raise ArgumentError(
            f"'metadata_json' is too long: {size} bytes; the limit is {limits.max_metadata_bytes} bytes",
            CONTENT_TOO_LARGE,
        )
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ArgumentError(f"'metadata_json' is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:
        raise ArgumentError(f"'metadata_json' nests deeper than {limits.max_metadata_depth} levels") from None
    if not isinstance(value, dict):
        raise ArgumentError(f"'metadata_json' must be a JSON object, got {type(value).__name__}")
    return check_metadata(value, limits)


def _check_value(value: Any, depth: int, limits: ArgumentLimits, where: str) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise ArgumentError(f"metadata {where}: integer out of range (a 64-bit integer, |n| < 2**63); "
                                "write large numbers as strings")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ArgumentError(f"metadata {where}: {value} is not a finite number")
        return
    if isinstance(value, str):
        problem = _string_problem(value)
        if problem:
            raise ArgumentError(f"metadata {where}: the string {problem}")
        return
    if isinstance(value, (dict, list)):
        if depth >= limits.max_metadata_depth:
            raise ArgumentError(f"metadata nests deeper than {limits.max_metadata_depth} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ArgumentError(f"metadata {where}: keys must be strings")
                problem = _string_problem(key)
                if problem:
                    raise ArgumentError(f"metadata {where}: a key {problem}")
                _check_value(item, depth + 1, limits, f"{where}.{_shown(key, 30)}" if where else _shown(key, 30))
        else:
            for i, item in enumerate(value):
                _check_value(item, depth + 1, limits, f"{where}[{i}]")
        return
    raise ArgumentError(f"metadata {where}: unsupported value of type {type(value).__name__}")


def metadata_bytes(metadata: dict[str, Any]) -> int:
    """Size of ``metadata`` as stored (compact UTF-8 JSON)."""
    return len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def check_metadata(metadata: Any, limits: ArgumentLimits) -> dict[str, Any]:
    """``metadata`` if Milvus can store it and its compact JSON fits ``max_metadata_bytes``."""
    if not isinstance(metadata, dict):
        raise ArgumentError(f"metadata must be a JSON object, got {type(metadata).__name__}")
    _check_value(metadata, 0, limits, "")
    size = metadata_bytes(metadata)
    if size > limits.max_metadata_bytes:
        raise ArgumentError(
            f"metadata is too large: {size} bytes as JSON; the limit is {limits.max_metadata_bytes} bytes",
            CONTENT_TOO_LARGE,
        )
    return metadata


__all__ = [
    "ArgumentError",
    "ArgumentLimits",
    "CONTENT_TOO_LARGE",
    "EMPTY",
    "INT64_MAX",
    "INT64_MIN",
    "INVALID_ARGUMENTS",
    "SAFE_TOKEN",
    "check_memory_id",
    "check_memory_type",
    "check_metadata",
    "check_text",
    "check_top_k",
    "is_safe_token",
    "metadata_bytes",
    "parse_metadata_json",
]
