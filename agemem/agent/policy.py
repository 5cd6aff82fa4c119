"""The policy interfaces the episode engine drives.

``TokenPolicy`` has the shape of verl's ``LLMServerClient.generate`` (token ids in, token ids out),
so the same engine runs under verl's agent loop, under the local trainer's token server and under
a scripted policy in tests. ``ChatPolicy`` is for evaluating any chat endpoint (vLLM server,
DashScope) where token ids are not available.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from pydantic import BaseModel


class GenerationOutput(BaseModel):
    """What a token-level policy returns: the field names match verl's ``TokenOutput``."""

    token_ids: list[int]
    log_probs: list[float] | None = None
    stop_reason: str | None = None


@runtime_checkable
class TokenPolicy(Protocol):
    async def generate(
        self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any], **kwargs: Any
    ) -> Any:
        """Return an object with ``token_ids`` (and optionally ``log_probs``), e.g. GenerationOutput."""
        ...


@runtime_checkable
class ChatPolicy(Protocol):
    async def chat(self, messages: Sequence[dict[str, str]], sampling_params: dict[str, Any]) -> str: ...


class LLMChatPolicy:
    """A :class:`ChatPolicy` over an :class:`agemem.llm.LLMClient`: any OpenAI-compatible endpoint
    (a vLLM server), DashScope, or the offline backend."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def chat(self, messages: Sequence[dict[str, str]], sampling_params: dict[str, Any]) -> str:
        reply = await self.client.chat(
            list(messages), temperature=sampling_params.get("temperature"), max_tokens=sampling_params.get("max_tokens")
        )
        return reply.text


__all__ = ["ChatPolicy", "GenerationOutput", "LLMChatPolicy", "TokenPolicy"]
