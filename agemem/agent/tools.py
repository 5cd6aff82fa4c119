"""The six AgeMem tools: OpenAI function schemas (flat parameters) and argument validation.

verl keeps only ``type``, ``description`` and ``enum`` of each property, so every parameter is a
flat scalar; structured metadata travels as a JSON string (``metadata_json``). Validation never
raises: :func:`validate_call` returns either clean arguments or a short, model-readable error
that the engine sends back to the model as the tool result.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

ADD, UPDATE, DELETE, RETRIEVE = "Add_memory", "Update_memory", "Delete_memory", "Retrieve_memory"
SUMMARY, FILTER = "Summary_context", "Filter_context"
MEMORY_TOOL_NAMES: tuple[str, ...] = (ADD, UPDATE, DELETE, RETRIEVE)
CONTEXT_TOOL_NAMES: tuple[str, ...] = (SUMMARY, FILTER)
TOOL_NAMES: tuple[str, ...] = (ADD, UPDATE, DELETE, RETRIEVE, SUMMARY, FILTER)
# Tools removed from the schema by the "no short-term-memory tools" ablation (reference section 8).
STM_TOOL_NAMES: tuple[str, ...] = (SUMMARY, FILTER, RETRIEVE)
# The reference (and its paper) call FILTER "Clear_context"; accept it so either spelling works.
ALIASES: dict[str, str] = {"Clear_context": FILTER}

MEMORY_TYPES: tuple[str, ...] = ("general", "knowledge", "chat_info", "user_info", "task_pipeline", "preference")
MAX_ARGUMENT_CHARS = 8192
MAX_TOP_K = 20


def _fn(name: str, description: str, properties: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    ADD: _fn(
        ADD,
        "Store a fact in long-term memory so it can be retrieved later, even after the conversation is cleared.",
        {
            "content": {"type": "string", "description": "The fact to remember, self-contained."},
            "memory_type": {"type": "string", "description": "Kind of memory.", "enum": list(MEMORY_TYPES)},
            "metadata_json": {"type": "string", "description": 'Optional JSON object, e.g. {"topic": "film"}.'},
        },
        ["content"],
    ),
    UPDATE: _fn(
        UPDATE,
        "Replace the content of an existing memory.",
        {
            "memory_id": {"type": "string", "description": "ID returned by Add_memory or Retrieve_memory."},
            "content": {"type": "string", "description": "The new content."},
            "metadata_json": {"type": "string", "description": "Optional JSON object merged into the metadata."},
        },
        ["memory_id", "content"],
    ),
    DELETE: _fn(
        DELETE,
        "Delete a memory that is wrong or no longer useful.",
        {"memory_id": {"type": "string", "description": "ID of the memory to delete."}},
        ["memory_id"],
    ),
    RETRIEVE: _fn(
        RETRIEVE,
        "Search long-term memory for facts related to a query.",
        {
            "query": {"type": "string", "description": "What to look for."},
            "top_k": {"type": "integer", "description": f"How many memories to return (1-{MAX_TOP_K}, default 3)."},
        },
        ["query"],
    ),
    SUMMARY: _fn(
        SUMMARY,
        "Replace earlier conversation messages with a short summary to free context space.",
        {
            "span": {
                "type": "string",
                "description": "'all' (every earlier message), 'N' (the last N earlier messages) or 'a-b' "
                "(messages a..b, 1-based, counted after the system prompt).",
            }
        },
        [],
    ),
    FILTER: _fn(
        FILTER,
        "Remove earlier conversation messages that are similar to a description of irrelevant content.",
        {"criteria": {"type": "string", "description": "Keywords or a description of what to remove."}},
        ["criteria"],
    ),
}


def tool_schemas(use_context_tools: bool = True) -> list[dict[str, Any]]:
    """The schemas shown to the policy; the ablation drops Summary/Filter/Retrieve."""
    return [s for n, s in TOOL_SCHEMAS.items() if use_context_tools or n not in STM_TOOL_NAMES]


def canonical_name(name: Any) -> str | None:
    """The tool's canonical name (aliases resolved), or None when it is not one of ours."""
    if not isinstance(name, str):
        return None
    name = name.strip()
    name = ALIASES.get(name, name)
    return name if name in TOOL_SCHEMAS else None


@dataclass
class ToolCall:
    """One parsed call as the model wrote it (name not yet validated)."""

    name: str
    arguments: Any
    raw: str = ""


@dataclass
class Validated:
    """Result of :func:`validate_call`: clean ``arguments`` or a model-readable ``error``."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _text(args: dict[str, Any], key: str, *, required: bool, allow_empty: bool = False) -> str | None:
    value = args.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing required argument '{key}'")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a numeric id or query is harmless; coerce rather than reject
    if not isinstance(value, str):
        raise ValueError(f"argument '{key}' must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value and not allow_empty:
        raise ValueError(f"argument '{key}' must not be empty")
    if len(value) > MAX_ARGUMENT_CHARS:
        raise ValueError(f"argument '{key}' is too long ({len(value)} characters, limit {MAX_ARGUMENT_CHARS})")
    return value


def _metadata(args: dict[str, Any]) -> dict[str, Any]:
    raw = args.get("metadata_json", args.get("metadata"))
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        meta = raw  # the reference's object form; accepted for robustness
    elif isinstance(raw, str):
        if len(raw) > MAX_ARGUMENT_CHARS:
            raise ValueError(f"argument 'metadata_json' is too long (limit {MAX_ARGUMENT_CHARS} characters)")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"argument 'metadata_json' is not valid JSON ({exc.msg})") from None
        if not isinstance(meta, dict):
            raise ValueError("argument 'metadata_json' must be a JSON object")
    else:
        raise ValueError("argument 'metadata_json' must be a JSON object string")
    # Flat scalars only: the store filters on them and nested values would not round-trip.
    clean: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            clean[str(key)[:64]] = value
        else:
            clean[str(key)[:64]] = json.dumps(value, ensure_ascii=False)[:512]
    return clean


def _top_k(args: dict[str, Any], default: int) -> int:
    raw = args.get("top_k")
    if raw is None or raw == "":
        return default
    if isinstance(raw, bool):
        raise ValueError("argument 'top_k' must be an integer")
    if isinstance(raw, str):
        try:
            raw = int(raw.strip())
        except ValueError:
            raise ValueError(f"argument 'top_k' must be an integer, got {raw[:40]!r}") from None
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if not isinstance(raw, int):
        raise ValueError(f"argument 'top_k' must be an integer, got {type(raw).__name__}")
    if not 1 <= raw <= MAX_TOP_K:
        raise ValueError(f"argument 'top_k' must be between 1 and {MAX_TOP_K}, got {raw}")
    return raw


def validate_call(call: ToolCall, *, allowed: tuple[str, ...] = TOOL_NAMES, default_top_k: int = 3) -> Validated:
    """Check one call's name and arguments; never raises."""
    name = canonical_name(call.name)
    shown = str(call.name)[:60] if call.name is not None else "<none>"
    if name is None:
        return Validated(shown, error=f"unknown tool '{shown}'; available tools: {', '.join(allowed)}")
    if name not in allowed:
        return Validated(name, error=f"tool '{name}' is disabled in this episode; available: {', '.join(allowed)}")
    args = call.arguments
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            return Validated(name, error=f"arguments of {name} are not valid JSON ({exc.msg})")
    if not isinstance(args, dict):
        return Validated(name, error=f"arguments of {name} must be a JSON object, got {type(args).__name__}")
    try:
        clean: dict[str, Any]
        if name == ADD:
            memory_type = _text(args, "memory_type", required=False) or "general"
            clean = {
                "content": _text(args, "content", required=True),
                "memory_type": memory_type[:40],
                "metadata": _metadata(args),
            }
        elif name == UPDATE:
            clean = {
                "memory_id": _text(args, "memory_id", required=True),
                "content": _text(args, "content", required=True),
                "metadata": _metadata(args),
            }
        elif name == DELETE:
            clean = {"memory_id": _text(args, "memory_id", required=True)}
        elif name == RETRIEVE:
            clean = {"query": _text(args, "query", required=True), "top_k": _top_k(args, default_top_k)}
        elif name == SUMMARY:
            clean = {"span": _text(args, "span", required=False) or "all"}
        else:
            clean = {"criteria": _text(args, "criteria", required=True)}
    except ValueError as exc:
        return Validated(name, error=f"{name}: {exc}")
    return Validated(name, clean)


def memory_call_arguments(validated: Validated, stage: int) -> dict[str, Any]:
    """Arguments for ``MemoryClient.call_tool`` in the schema's flat form, with the stage recorded."""
    args = dict(validated.arguments)
    if validated.name in (ADD, UPDATE):
        meta = dict(args.pop("metadata", {}) or {})
        meta["stage"] = str(stage)  # the engine, not the model, records provenance
        args["metadata_json"] = json.dumps(meta, ensure_ascii=False)
    return args


__all__ = [
    "ADD",
    "ALIASES",
    "CONTEXT_TOOL_NAMES",
    "DELETE",
    "FILTER",
    "MEMORY_TOOL_NAMES",
    "RETRIEVE",
    "STM_TOOL_NAMES",
    "SUMMARY",
    "TOOL_NAMES",
    "TOOL_SCHEMAS",
    "ToolCall",
    "UPDATE",
    "Validated",
    "canonical_name",
    "memory_call_arguments",
    "tool_schemas",
    "validate_call",
]
