"""The registry's model: an MLflow ``ResponsesAgent`` whose ``predict`` runs the memory agent.

What ``agemem chat`` does, behind MLflow's serving: a request's ``input`` messages (OpenAI
Responses schema: ``{"input": [{"role": "user", "content": "..."}]}``) are the conversation, the
last one the user's new message; the episode engine answers it with its system prompt, tool
schemas, parser and budget, the six tools executed for real against long-term memory in a named
space (``custom_inputs.space``, else ``context.user_id``, else ``chat.space``). The response lists
each tool call and its result (``function_call`` / ``function_call_output`` items) before the
reply. ``custom_inputs.mode = "generate"`` is plain text generation instead: the messages as they
are, no system prompt, no tools, no memory (``custom_inputs.max_new_tokens``); ``"describe"``
answers with the agent's configuration (JSON text) without loading the policy.

Settings: the profile and episode section recorded at registration (``model_config``), under env
vars ``AGEMEM_...`` for the rest: the memory backend (embedded milvus-lite under ``runs_dir`` by
default, ``AGEMEM_MEMORY__SERVER_URL`` for a tool server), the space, the policy (the logged
checkpoint unless ``AGEMEM_CHAT__POLICY`` names another).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import threading
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mlflow.pyfunc import ResponsesAgent
from mlflow.types.responses import ResponsesAgentRequest, ResponsesAgentResponse

if TYPE_CHECKING:
    from agemem.chat import MemoryAgent
    from agemem.eval.policies import PolicyHandle
    from agemem.settings import Settings

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
MODES = ("agent", "generate", "describe")
#: The input example MLflow runs when the model is logged: ``describe`` loads nothing (registering a
#: large policy must not load it); ``mlflow.models.predict`` with a chat input is the real check.
CHECK_EXAMPLE = {"input": [{"role": "user", "content": "What are you?"}], "custom_inputs": {"mode": "describe"}}


def model_config(settings: "Settings") -> dict[str, Any]:
    """What the served agent keeps of the registering settings: the profile and the episode section
    (prompt, tools, budget, parser limits must be the ones the policy was trained with)."""
    episode = settings.episode.model_dump(mode="json", exclude={"tokenizer"})
    return {"profile": settings.profile, "settings": {"episode": episode}}


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def request_messages(request: ResponsesAgentRequest) -> list[dict[str, str]]:
    """The request's user / assistant / system messages as ``{"role", "content"}`` (tool items skipped:
    the agent's own tool calls are in its memory, not replayed)."""
    out = []
    for item in request.input:
        data = item.model_dump() if hasattr(item, "model_dump") else dict(item)
        role = data.get("role")
        if role in ("user", "assistant", "system") and data.get("type") in (None, "message"):
            out.append({"role": role, "content": _text(data.get("content"))})
    return out


class AgememAgent(ResponsesAgent):
    """The memory agent as an MLflow model (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        from agemem.settings import load_settings

        cfg = dict(context.model_config or {})
        self.settings = load_settings(cfg.get("profile"), cfg.get("settings") or {})
        arts = dict(context.artifacts or {})
        self.model_path: str | None = arts.get("model") or arts.get("adapter")
        self._agent: "MemoryAgent | None" = None
        self._handle: "PolicyHandle | None" = None
        self._guard = threading.Lock()
        self._loop = asyncio.new_event_loop()
        # One loop for the agent's clients (memory, endpoint, token server); requests from MLflow's
        # server threads are submitted to it.
        threading.Thread(target=self._loop.run_forever, name="agemem-agent-loop", daemon=True).start()

    # -- plumbing ---------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _policy(self) -> "PolicyHandle":
        from agemem.eval.policies import build_policy

        with self._guard:
            if self._handle is None:
                chat = self.settings.chat
                model = self.model_path if chat.policy == "checkpoint" else None
                self._handle = build_policy(self.settings, model, section=chat)
                logger.info("served agent policy: %s", self._handle.label)
            return self._handle

    def _memory_agent(self) -> "MemoryAgent":
        from agemem.chat import MemoryAgent

        handle = self._policy()
        with self._guard:
            if self._agent is None:
                self._agent = MemoryAgent.from_settings(self.settings, handle=handle)
                # MLflow never closes a model: at exit, release the memory store (milvus-lite's file
                # lock, for the next process) and the endpoint clients.
                atexit.register(self.close)
            return self._agent

    def close(self) -> None:
        """Close the memory agent (idempotent); the model can still answer afterwards (it reopens)."""
        with self._guard:
            agent, self._agent = self._agent, None
        if agent is not None and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(agent.aclose(), self._loop).result(timeout=60)
            except Exception as exc:  # noqa: BLE001 - closing at exit must not raise
                logger.warning("closing the served agent: %s", exc)

    # -- predict ----------------------------------------------------------------------------
    def predict(self, request: ResponsesAgentRequest) -> ResponsesAgentResponse:
        custom = dict(request.custom_inputs or {})
        mode = custom.get("mode", "agent")
        if mode not in MODES:
            raise ValueError(f"custom_inputs.mode must be one of {MODES}, got {mode!r}")
        messages = request_messages(request)
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("the last input message must be the user's (role 'user')")
        if mode == "describe":
            return ResponsesAgentResponse(output=[self.create_text_output_item(json.dumps(self.describe()), _id("msg"))],
                                          custom_outputs={"mode": mode})
        if mode == "generate":
            max_new = int(custom.get("max_new_tokens") or self.settings.episode.max_turn_tokens)
            text = self._run(self._generate(self._policy(), messages, max_new))
            return ResponsesAgentResponse(output=[self.create_text_output_item(text, _id("msg"))],
                                          custom_outputs={"mode": mode})
        space = custom.get("space") or (request.context.user_id if request.context else None) or \
            self.settings.chat.space
        return self._run(self._answer(self._memory_agent(), messages, str(space)))

    def describe(self) -> dict[str, Any]:
        """The served agent's configuration: policy, memory backend, space, budget."""
        from agemem.memory.spaces import backend_key

        s = self.settings
        return {"policy": s.chat.policy, "model": self.model_path if s.chat.policy == "checkpoint" else s.chat.model,
                "profile": s.profile, "memory": backend_key(s), "space": s.chat.space,
                "max_context_tokens": s.episode.max_context_tokens, "context_tools": s.episode.use_context_tools}

    async def _generate(self, handle: "PolicyHandle", messages: list[dict[str, str]], max_new_tokens: int) -> str:
        from agemem.agent.context import ChatTokenizer
        from agemem.agent.segments import Generation

        policy = handle.conversation_policy()
        params = {"temperature": 0.0, "max_tokens": max_new_tokens}
        if handle.mode != "tokens":
            return str(await policy.chat(messages, params))
        tokenizer = ChatTokenizer(handle.tokenizer)
        out = await policy.generate(_id("gen"), prompt_ids=tokenizer.prompt_ids(messages), sampling_params=params)
        return tokenizer.decode(Generation.of(out).token_ids, skip_special_tokens=True)

    async def _answer(self, agent: "MemoryAgent", messages: list[dict[str, str]], space: str) -> ResponsesAgentResponse:
        convo = await agent.conversation(space)
        for message in messages[:-1]:
            if message["role"] != "system":  # the agent's system prompt is the episode's
                convo.add_history(message["role"], message["content"])
        turn = await convo.say(messages[-1]["content"])
        items: list[dict[str, Any]] = []
        for event in turn.events:
            call_id = _id("call")
            items.append(self.create_function_call_item(_id("fc"), call_id, event.name,
                                                        json.dumps(event.arguments, ensure_ascii=False)))
            items.append(self.create_function_call_output_item(call_id, event.result))
        reply = turn.reply or f"(no answer after {turn.rounds} rounds: {turn.end})"
        items.append(self.create_text_output_item(reply, _id("msg")))
        return ResponsesAgentResponse(output=items, custom_outputs={
            "mode": "agent", "space": space, "end": turn.end, "answered": turn.answered,
            "context_tokens": turn.context_tokens, "budget": turn.budget, "policy": agent.label,
        })


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def log_agent_model(artifacts: dict[str, str], settings: "Settings", *, name: str = "policy") -> Any:
    """``mlflow.pyfunc.log_model`` of the agent over ``artifacts`` (``model`` and/or ``adapter``
    directories); MLflow loads it and runs :data:`CHECK_EXAMPLE` before it is logged."""
    import mlflow

    return mlflow.pyfunc.log_model(
        name=name,
        # Models from code (no pickle of a live agent): MLflow copies this file into the model.
        python_model=str(Path(__file__).with_name("served_agent.py")),
        artifacts=artifacts,
        model_config=model_config(settings),
        input_example=CHECK_EXAMPLE,
        # Explicit requirements: inference would import and probe the whole environment.
        pip_requirements=["agemem", "transformers", "peft", "torch"],
    )


__all__ = ["AgememAgent", "CHECK_EXAMPLE", "log_agent_model", "model_config", "request_messages"]
