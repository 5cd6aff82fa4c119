"""Short memory ids for the model: ``M1``, ``M2``, ... in the order an episode first sees each memory.

The store's ids are random (32 hex characters derived from the random session id). Shown to the
model as they are, they make every turn after the first memory write differ between two runs of
the same seed, and a small model cannot copy them back into ``Update_memory`` / ``Delete_memory``.
With ``episode.alias_memory_ids`` the engine shows aliases instead and translates them back before a
call reaches the store; an id the model writes that is no alias (a store id it copied from elsewhere)
passes through unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

ALIAS_PREFIX = "M"


def ids_in(data: Mapping[str, Any] | None) -> list[str]:
    """The memory ids a tool result's data names (Add / Update / Delete: one; Retrieve: each hit)."""
    data = data or {}
    ids = [data["memory_id"]] if isinstance(data.get("memory_id"), str) else []
    for hit in data.get("memories") or []:
        if isinstance(hit, Mapping) and isinstance(hit.get("memory_id"), str):
            ids.append(hit["memory_id"])
    return ids


@dataclass
class MemoryIdAliases:
    """One episode's (or conversation's) alias <-> store id table."""

    _alias: dict[str, str] = field(default_factory=dict)  # store id -> alias
    _store_id: dict[str, str] = field(default_factory=dict)  # alias -> store id

    def alias(self, store_id: str) -> str:
        if store_id not in self._alias:
            name = f"{ALIAS_PREFIX}{len(self._alias) + 1}"
            self._alias[store_id], self._store_id[name] = name, store_id
        return self._alias[store_id]

    def store_id(self, memory_id: str) -> str:
        """The store id behind ``memory_id`` (itself when it is no alias of this episode)."""
        return self._store_id.get(memory_id.strip(), memory_id)

    def shown(self, text: str, store_ids: Iterable[str]) -> str:
        """``text`` with each of ``store_ids`` replaced by its alias where the memory service names an
        id: ``(Memory ID: <id>)`` and ``with id '<id>'``. Only there: an imported memory may have a
        short id that also occurs as a word of some content."""
        for store_id in dict.fromkeys(store_ids):
            found = re.escape(store_id)
            text = re.sub(rf"(?<=\(Memory ID: ){found}(?=\))|(?<=with id '){found}(?=')", self.alias(store_id), text)
        return text

    def call_arguments(self, args: dict[str, Any]) -> dict[str, Any]:
        """``args`` with an aliased ``memory_id`` translated to the store's id."""
        memory_id = args.get("memory_id")
        if not isinstance(memory_id, str):
            return args
        return {**args, "memory_id": self.store_id(memory_id)}


__all__ = ["ALIAS_PREFIX", "MemoryIdAliases", "ids_in"]
