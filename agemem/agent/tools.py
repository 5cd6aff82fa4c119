"""The six AgeMem tools: OpenAI function schemas (flat parameters) and argument validation.

verl keeps only ``type``, ``description`` and ``enum`` of each property, so every parameter is a
flat scalar; structured metadata travels as a JSON string (``metadata_json``). Validation never
raises: :func:`validate_call` returns either clean arguments or a short, model-readable error
that the engine sends back to the model as the tool result. What a value may hold (sizes,
Unicode, numbers, nesting, ids) is decided by :mod:`agemem.memory.arguments`, the rules the
memory service applies too, so a call this accepts is not refused there for its values.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from agemem.memory import arguments as A
from agemem.memory.arguments import ArgumentError, ArgumentLimits

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
# The default limits, for the schema text; validation takes the settings' limits.
MAX_TOP_K = ArgumentLimits.defaults().max_top_k


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


def _text(args: dict[str, Any], key: str, limits: ArgumentLimits, *, required: bool) -> str | None:
    value = args.get(key)
    if value is None:
        if required:
            raise ArgumentError(f"missing required argument '{key}'")
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a numeric id or query is harmless; coerce rather than reject
    return A.check_text(key, value, limits)


def _memory_id(args: dict[str, Any]) -> str:
    value = args.get("memory_id")
    if value is None:
        raise ArgumentError("missing required argument 'memory_id'")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        value = value.strip()
    return A.check_memory_id(value)


# Added to every stored memory's metadata by memory_call_arguments; checked with the model's.
_ENGINE_METADATA = {"stage": "0"}


def _metadata(args: dict[str, Any], limits: ArgumentLimits) -> dict[str, Any]:
    raw = args.get("metadata_json", args.get("metadata"))
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        meta = A.check_metadata(raw, limits)  # the reference's object form; accepted for robustness
    elif isinstance(raw, str):
        meta = A.parse_metadata_json(raw, limits)
    else:
        raise ArgumentError("argument 'metadata_json' must be a JSON object string")
    # Flat scalars only: the store filters on them and nested values would not round-trip.
    clean: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            clean[key[:64]] = value
        else:
            clean[key[:64]] = json.dumps(value, ensure_ascii=False)[:512]
    A.check_metadata({**clean, **_ENGINE_METADATA}, limits)
    return clean


def _top_k(args: dict[str, Any], limits: ArgumentLimits, default: int) -> int:
    raw = args.get("top_k")
    if raw is None or raw == "":
        return default
    if isinstance(raw, str):
        try:
            raw = int(raw.strip())
        except ValueError:
            raise ArgumentError(f"argument 'top_k' must be an integer, got {ascii(raw[:40])}") from None
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    return A.check_top_k(raw, limits)


def validate_call(
    call: ToolCall,
    *,
    allowed: tuple[str, ...] = TOOL_NAMES,
    default_top_k: int | None = None,
    limits: ArgumentLimits | None = None,
) -> Validated:
    """Check one call's name and arguments; never raises.

    ``limits`` are the memory settings' (``ArgumentLimits.from_settings(settings.memory)``);
    without them the default settings' limits apply. ``default_top_k`` overrides theirs.
    """
    limits = limits or ArgumentLimits.defaults()
    name = canonical_name(call.name)
    shown = ascii(str(call.name)[:60])[1:-1] if call.name is not None else "<none>"
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
        except RecursionError:
            return Validated(name, error=f"arguments of {name} nest too deeply")
    if not isinstance(args, dict):
        return Validated(name, error=f"arguments of {name} must be a JSON object, got {type(args).__name__}")
    try:
        clean: dict[str, Any]
        if name == ADD:
            memory_type = args.get("memory_type")
            clean = {
                "content": _text(args, "content", limits, required=True),
                "memory_type": "general" if memory_type in (None, "") else A.check_memory_type(memory_type),
                "metadata": _metadata(args, limits),
            }
        elif name == UPDATE:
            clean = {
                "memory_id": _memory_id(args),
                "content": _text(args, "content", limits, required=True),
                "metadata": _metadata(args, limits),
            }
        elif name == DELETE:
            clean = {"memory_id": _memory_id(args)}
        elif name == RETRIEVE:
            top_k = _top_k(args, limits, limits.default_top_k if default_top_k is None else default_top_k)
            clean = {"query": _text(args, "query", limits, required=True), "top_k": top_k}
        elif name == SUMMARY:
            clean = {"span": _text(args, "span", limits, required=False) or "all"}
        else:
            clean = {"criteria": _text(args, "criteria", limits, required=True)}
    except ValueError as exc:  # ArgumentError, or a number too long to turn into text
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
