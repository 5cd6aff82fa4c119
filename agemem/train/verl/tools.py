"""verl ``BaseTool`` adapters for the four memory tools, and the tool-config YAML verl loads.

verl runs create -> execute -> release around EVERY call and shares one tool object between all
trajectories of a worker, so these tools keep no per-trajectory state: the memory session comes
with each call (``memory_session=`` in the execute kwargs, or ``agent_data.extra_fields`` when
verl's own ``ToolAgentLoop`` drives them). Failures come back as text the model can read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from agemem.agent.tools import (
    MEMORY_TOOL_NAMES,
    TOOL_SCHEMAS,
    ToolCall,
    memory_call_arguments,
    tool_schemas,
    validate_call,
)
from agemem.memory.base import MemorySession, MemoryUnavailableError
from agemem.memory.client import build_memory_client
from agemem.settings import load_settings

logger = logging.getLogger(__name__)

SESSION_KEY = "memory_session"
TOOL_CLASS = f"{__name__}.MemoryTool"


def _session_from(kwargs: dict[str, Any]) -> MemorySession | None:
    raw = kwargs.get(SESSION_KEY)
    if raw is None:
        agent_data = kwargs.get("agent_data")
        extra = getattr(agent_data, "extra_fields", None) or {}
        raw = extra.get(SESSION_KEY)
    if raw is None:
        return None
    if isinstance(raw, MemorySession):
        return raw
    try:
        return MemorySession.model_validate(raw)
    except ValueError:
        return None


class MemoryTool(BaseTool):
    """One memory tool (name from its schema) calling the tool server through a MemoryClient.

    ``config`` may carry ``server_url``; otherwise the settings (env ``AGEMEM_MEMORY__SERVER_URL``,
    propagated to Ray workers) decide. ``client`` injects a ready MemoryClient (tests, local use).
    """

    def __init__(self, config: dict, tool_schema: OpenAIFunctionToolSchema | None, client: Any | None = None):
        if tool_schema is None:
            name = (config or {}).get("name")
            if name not in MEMORY_TOOL_NAMES:
                raise ValueError(f"MemoryTool needs a tool_schema or config.name in {MEMORY_TOOL_NAMES}")
            tool_schema = OpenAIFunctionToolSchema.model_validate(TOOL_SCHEMAS[name])
        super().__init__(config or {}, tool_schema)
        if self.name not in MEMORY_TOOL_NAMES:
            raise ValueError(f"{self.name!r} is not a memory tool; context tools run inside the episode engine")
        self._client = client

    def _memory_client(self) -> Any:
        if self._client is None:
            overrides = {"memory": {"server_url": self.config["server_url"]}} if self.config.get("server_url") else None
            settings = load_settings(overrides=overrides)
            if not settings.memory.server_url:
                raise MemoryUnavailableError("no tool server configured (set AGEMEM_MEMORY__SERVER_URL)")
            self._client = build_memory_client(settings)
        return self._client

    async def execute(self, instance_id: str, parameters: dict[str, Any], **kwargs: Any) -> tuple[ToolResponse, float, dict]:
        session = _session_from(kwargs)
        if session is None:
            return ToolResponse(text=f"{self.name} failed: no memory session for this trajectory"), 0.0, {"ok": False}
        validated = validate_call(ToolCall(self.name, parameters), allowed=MEMORY_TOOL_NAMES)
        if not validated.ok:
            return ToolResponse(text=validated.error), 0.0, {"ok": False}
        stage = int(kwargs.get("stage", 0) or 0)
        try:
            result = await self._memory_client().call_tool(
                session, validated.name, memory_call_arguments(validated, stage)
            )
        except MemoryUnavailableError as exc:
            logger.warning("memory tool %s: %s", self.name, exc)
            return ToolResponse(text=f"{self.name} failed: memory service unavailable ({exc})"), 0.0, {"ok": False}
        return ToolResponse(text=result.text), 0.0, {"ok": bool(result.ok)}


def tool_config(*, server_url: str | None = None, use_context_tools: bool = True) -> dict[str, Any]:
    """verl's tool config (``multi_turn.tool_config_path`` content), from agemem's own schemas.

    ``use_context_tools=False`` (the ablation) drops Retrieve_memory as the episode engine does.
    """
    shown = {s["function"]["name"] for s in tool_schemas(use_context_tools)}
    config: dict[str, Any] = {"type": "native"}
    if server_url:
        config["server_url"] = server_url
    return {
        "tools": [
            {"class_name": TOOL_CLASS, "config": dict(config), "tool_schema": TOOL_SCHEMAS[name]}
            for name in MEMORY_TOOL_NAMES
            if name in shown
        ]
    }


def write_tool_config(path: Path, *, server_url: str | None = None, use_context_tools: bool = True) -> Path:
    """Write the tool config YAML verl loads; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tool_config(server_url=server_url, use_context_tools=use_context_tools), sort_keys=False))
    return path
