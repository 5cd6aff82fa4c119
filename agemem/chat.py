"""The memory agent outside training: a policy, the episode engine and a named memory space.

``agemem chat`` and the registry's served model (:mod:`agemem.tracking.agent_model`) both build a
:class:`MemoryAgent`: the policy from ``settings.chat`` (a checkpoint directory, a ``models:/``
URI, an OpenAI-compatible endpoint, DashScope or the scripted agent; the loader evaluation uses),
the episode engine with its memory client (embedded milvus-lite, ``memory.uri`` on Milvus, or the
tool server at ``memory.server_url``), and conversations over named memory spaces
(:mod:`agemem.memory.spaces`) that persist across chats.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from agemem.agent.conversation import Conversation
from agemem.agent.episode import EpisodeEngine
from agemem.agent.stats import ToolEvent
from agemem.eval.policies import PolicyHandle, build_policy
from agemem.memory.base import MemoryClient, MemorySession
from agemem.memory.spaces import SpaceTokens, open_space

if TYPE_CHECKING:
    from agemem.settings import Settings

logger = logging.getLogger(__name__)


class MemoryAgent:
    """Conversations with one policy over named memory spaces; ``await agent.aclose()`` when done."""

    def __init__(self, settings: "Settings", handle: PolicyHandle, engine: EpisodeEngine, tokens: SpaceTokens) -> None:
        self.settings = settings
        self.handle = handle
        self.engine = engine
        self.tokens = tokens

    @classmethod
    def from_settings(cls, settings: "Settings", model: Path | str | None = None, *,
                      handle: PolicyHandle | None = None) -> "MemoryAgent":
        """``model`` overrides ``chat.model``; ``handle``: an already loaded policy (the served model's)."""
        handle = handle or build_policy(settings, model, section=settings.chat)
        engine = EpisodeEngine.from_settings(settings, tokenizer=handle.tokenizer)
        return cls(settings, handle, engine, SpaceTokens.from_settings(settings))

    @property
    def memory(self) -> MemoryClient:
        assert self.engine.memory is not None  # from_settings always builds one
        return self.engine.memory

    @property
    def label(self) -> str:
        return self.handle.label

    async def space(self, name: str | None = None) -> MemorySession:
        """The session of the memory space ``name`` (default ``chat.space``), created on first use."""
        from agemem.memory.service import SessionAuthError

        try:
            return await open_space(self.memory, self.tokens, name or self.settings.chat.space)
        except SessionAuthError as exc:  # the server token (memory.server_token) was refused
            raise PermissionError(f"{self.tokens.backend}: {exc}") from None

    async def conversation(self, space: str | None = None, *, on_event: Callable[[ToolEvent], None] | None = None,
                           sampling_overrides: dict[str, Any] | None = None,
                           label: str | None = None) -> Conversation:
        """A new conversation whose long-term memory is the space ``space``."""
        session = await self.space(space)
        return Conversation(self.engine, self.handle.conversation_policy(), mode=self.handle.mode, session=session,
                            max_rounds=self.settings.chat.max_rounds, label=label, on_event=on_event,
                            sampling_overrides=sampling_overrides)

    async def aclose(self) -> None:
        try:
            await self.engine.aclose()
        finally:
            if self.handle.close is not None:
                await self.handle.close()


__all__ = ["MemoryAgent"]
