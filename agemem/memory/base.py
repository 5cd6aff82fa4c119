"""The memory-client interface the episode engine, the verl tools and evaluation talk to.

Two implementations share it: :class:`agemem.memory.client.InProcessMemoryClient` (embedded
default, tests) and :class:`agemem.memory.client.HttpMemoryClient` (the tool server). Tool-level
failures (unknown id, empty content, bad argument) come back as ``ToolResult(ok=False, text=...)``
so the model can read them; only transport failures raise :class:`MemoryUnavailableError`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, Field

MEMORY_TOOLS: tuple[str, ...] = ("Add_memory", "Update_memory", "Delete_memory", "Retrieve_memory")


class ToolResult(BaseModel):
    ok: bool
    text: str = Field(description="Short, model-readable result.")
    data: dict[str, Any] = Field(default_factory=dict)


class MemoryItem(BaseModel):
    memory_id: str
    content: str
    memory_type: str = "general"
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    score: float | None = None


class MemorySession(BaseModel):
    session_id: str
    session_token: str


class MemoryUnavailableError(RuntimeError):
    """The memory backend could not be reached (server down, store unreachable)."""


@runtime_checkable
class MemoryClient(Protocol):
    async def create_session(self, space: str | None = None) -> MemorySession:
        """A new session; ``space`` names a persistent memory space (:mod:`agemem.memory.spaces`)."""
        ...

    async def check_session(self, session: MemorySession) -> None:
        """Raise unless the session exists and its token opens it."""
        ...

    async def call_tool(self, session: MemorySession, tool_name: str, arguments: dict[str, Any]) -> ToolResult: ...

    async def list_memories(self, session: MemorySession) -> list[MemoryItem]: ...

    async def delete_session(self, session: MemorySession) -> None: ...

    async def aclose(self) -> None: ...
