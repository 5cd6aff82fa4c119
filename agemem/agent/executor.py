"""Tool dispatch for one episode: validate each call of a reply, run it, tell the model the result.

Every problem becomes a ``tool`` message the model reads and a counter in the statistics; nothing
raises into the rollout: not a malformed call, not an unreachable memory backend, not a value the
memory client chokes on. Memory tools go to the memory client; context tools (Summary_context,
Filter_context) rewrite the context window and open a new segment. Consecutive Add or Retrieve
calls of one reply run concurrently (the embedder batches their texts) and are recorded in call
order, so the event log reads as if they had run one after another.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from agemem.agent import tools as T
from agemem.agent.context import extractive_summary
from agemem.agent.memory_ids import ids_in
from agemem.agent.parsing import ParsedResponse
from agemem.agent.prompts import SUMMARY_PROMPT
from agemem.agent.state import EpisodeState
from agemem.llm import LLMClient, LLMError
from agemem.memory.base import MemoryClient, MemoryUnavailableError, ToolResult

if TYPE_CHECKING:
    from agemem.settings import Settings

logger = logging.getLogger(__name__)

# Memory calls that may run together when consecutive and of the SAME name: adds never read
# what another add wrote, retrieves only read. A retrieve after an add (or an update/delete
# of an id added earlier in the reply) must see the earlier call, so mixed runs stay sequential.
_BATCHABLE = frozenset({T.ADD, T.RETRIEVE})
_OK_COUNTERS = {T.ADD: "memory_adds_ok", T.UPDATE: "memory_updates_ok", T.DELETE: "memory_deletes_ok"}

Outcome = tuple[str, ToolResult | None, str | None]  # (ok|error|unavailable, result, failure text)


class ToolExecutor:
    """Runs the tool calls of model replies against one episode's state."""

    def __init__(self, settings: "Settings", state: EpisodeState, *, memory: MemoryClient | None,
                 llm: LLMClient | None, encode: Callable[[list[str]], np.ndarray], allowed: tuple[str, ...]) -> None:
        self.settings = settings
        self.cfg = settings.episode
        self.state = state
        self.memory = memory
        self.llm = llm
        self.encode = encode
        self.allowed = allowed

    # -- one reply ----------------------------------------------------------------------------
    async def execute(self, parsed: ParsedResponse) -> None:
        s = self.state
        for issue in parsed.errors:
            s.stats.count_format_error(issue.kind)
            s.tool_message(f"[format error] {issue.message}")
        s.stats.tool_calls_ignored_in_think += parsed.ignored_in_think
        calls = parsed.tool_calls
        limit = self.cfg.max_tool_calls_per_turn
        batch: list[T.Validated] = []
        for call in calls[:limit]:
            v = T.validate_call(call, allowed=self.allowed, default_top_k=self.settings.memory.default_top_k)
            if v.ok and v.name in _BATCHABLE and (not batch or batch[0].name == v.name):
                batch.append(v)
                continue
            await self._memory_batch(batch)
            batch = []
            if not v.ok:
                outcome = "disabled" if "disabled" in (v.error or "") else "error"
                s.record_event(v.name, outcome, call.arguments if isinstance(call.arguments, dict) else {},
                               v.error or "")
                s.tool_message(f"[tool error] {v.error}")
            elif v.name in _BATCHABLE:
                batch = [v]
            elif v.name in T.MEMORY_TOOL_NAMES:
                await self._memory_batch([v])
            else:
                await self._context_tool(v)
        await self._memory_batch(batch)
        for call in calls[limit:]:
            s.record_event(str(call.name)[:60], "skipped", {}, "too many calls")
        if len(calls) > limit:
            s.tool_message(f"[tool error] only the first {limit} tool calls of a reply are executed; "
                           f"{len(calls) - limit} skipped")

    # -- memory tools -------------------------------------------------------------------------
    async def memory_call(self, name: str, args: dict[str, Any]) -> Outcome:
        """One memory call; every failure is an outcome, never an exception."""
        s = self.state
        if s.session is None or self.memory is None:
            return "unavailable", None, "the memory service is unavailable; try again later"
        try:
            result = await self.memory.call_tool(s.session, name, args)
        except MemoryUnavailableError as exc:
            logger.warning("memory backend unavailable during %s: %s", name, exc)
            s.stats.memory_unavailable += 1
            return "unavailable", None, "the memory service is unavailable; try again later"
        except Exception as exc:  # noqa: BLE001 - a model-written value must not end the rollout
            logger.warning("episode %s: %s failed in the memory client (%s: %s)", s.script.episode_id, name,
                           type(exc).__name__, exc)
            return "error", None, f"the memory service could not process these arguments ({type(exc).__name__})"
        return ("ok" if result.ok else "error"), result, None

    async def _memory_batch(self, batch: list[T.Validated]) -> None:
        """Independent memory calls of one reply at once; results recorded in call order."""
        if not batch:
            return
        args = [T.memory_call_arguments(v, self.state.stage) for v in batch]
        sent = [self._to_store(a) for a in args]
        done = await asyncio.gather(*(self.memory_call(v.name, a) for v, a in zip(batch, sent)))
        for v, a, store_args, outcome in zip(batch, args, sent, done):
            self._memory_outcome(v, a, store_args, outcome)

    def _to_store(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.state.memory_ids.call_arguments(args) if self.cfg.alias_memory_ids else args

    def _shown(self, text: str, store_ids: list[str]) -> str:
        """What the model reads: store ids as the episode's aliases (``episode.alias_memory_ids``)."""
        return self.state.memory_ids.shown(text, store_ids) if self.cfg.alias_memory_ids else text

    def _memory_outcome(self, v: T.Validated, args: dict[str, Any], store_args: dict[str, Any],
                        outcome: Outcome) -> None:
        kind, result, failure = outcome
        s = self.state
        named = [store_args["memory_id"]] if isinstance(store_args.get("memory_id"), str) else []
        reply = self._shown(result.text if result is not None else str(failure),
                            named + ids_in(result.data if result is not None else None))
        if result is None or not result.ok:
            text = f"[tool error] {v.name}: {reply}"
        elif v.name == T.RETRIEVE:
            text = reply  # already "[retrieved memories]\n- ..." (the reference format)
        else:
            text = f"[memory tool result] {v.name}: {reply}"
        if kind == "ok" and v.name in _OK_COUNTERS:
            counter = _OK_COUNTERS[v.name]
            setattr(s.stats, counter, getattr(s.stats, counter) + 1)
        # The event keeps what the model wrote and read; its data keeps the store's ids.
        s.record_event(v.name, kind, args, reply if result is not None else text, result.data if result else None)
        s.tool_message(text)

    async def auto_retrieve(self, query: str) -> None:
        """Ablation without context tools: retrieve for every injected user message (reference s. 8)."""
        args = {"query": query[:2000], "top_k": self.cfg.manual_retrieve_top_k}
        kind, result, failure = await self.memory_call(T.RETRIEVE, args)
        text = self._shown(result.text, ids_in(result.data)) if result is not None else str(failure)
        self.state.record_event(T.RETRIEVE, kind, args, text, {"auto": True, **(result.data if result else {})},
                                count=False)
        if kind == "ok":
            self.state.add("tool", f"[manual] {text}", "auto_retrieve")

    # -- context tools ------------------------------------------------------------------------
    async def _embed(self, texts: list[str]) -> np.ndarray:
        # Embedding is synchronous CPU work; off the event loop, other trajectories keep running.
        return await asyncio.to_thread(self.encode, texts)

    async def _summarise(self, texts: list[str]) -> tuple[str, str]:
        if self.llm is not None and not self.llm.offline:
            try:
                reply = await self.llm.chat([{"role": "user", "content": SUMMARY_PROMPT.format(excerpt="\n".join(texts))}],
                                            max_tokens=self.cfg.summary_max_tokens)
                if reply.text.strip():
                    return reply.text.strip(), "llm"
            except LLMError as exc:
                logger.warning("summary LLM failed, using the extractive summary: %s", exc)
        return await asyncio.to_thread(extractive_summary, texts, self.encode), "extractive"

    async def _summary(self, v: T.Validated, before: int) -> tuple[str, str, dict[str, Any]]:
        s = self.state
        sel = s.ctx.select_span(v.arguments["span"], s.round_id)
        if sel.error:
            return "error", f"[tool error] Summary_context: {sel.error}", {}
        if not sel.indices:
            return "error", "[tool error] Summary_context: no earlier messages to summarise in that span", {}
        texts = [f"{s.ctx.entries[i].role}: {s.ctx.entries[i].content}" for i in sel.indices]
        summary, source = await self._summarise(texts)
        s.ctx.replace_with_summary(sel.indices, summary, stage=s.stage)
        after = s.ctx.token_count()
        s.rewritten("summary")
        text = (f"[context tool result] Summary_context: replaced {len(sel.indices)} messages with a summary "
                f"({before} -> {after} tokens)")
        return "ok", text, {"replaced": len(sel.indices), "source": source, "tokens_before": before,
                            "tokens_after": after}

    async def _filter(self, v: T.Validated, before: int) -> tuple[str, str, dict[str, Any]]:
        s = self.state
        criteria = v.arguments["criteria"]
        candidates = s.ctx.filter_candidates(s.round_id)
        removed = 0
        if candidates:
            vecs = await self._embed([criteria] + [s.ctx.entries[i].content for i in candidates])
            sims = vecs[1:] @ vecs[0]
            drop = [i for i, sim in zip(candidates, sims.tolist()) if sim >= self.cfg.filter_threshold]
            removed = s.ctx.remove(drop) if drop else 0
        after = s.ctx.token_count()
        if removed:
            s.rewritten("filter")
        text = f"[context tool result] Filter_context: removed {removed} messages ({before} -> {after} tokens)"
        return "ok", text, {"removed": removed, "tokens_before": before, "tokens_after": after}

    async def _context_tool(self, v: T.Validated) -> None:
        s = self.state
        before = s.ctx.token_count()
        handler = self._summary if v.name == T.SUMMARY else self._filter
        outcome, text, data = await handler(v, before)
        if outcome == "ok" and s.stats.overflow_count == 0 and before <= self.cfg.max_context_tokens:
            s.stats.preventive_context_tools += 1
        s.record_event(v.name, outcome, dict(v.arguments), text, data)
        s.tool_message(text)


__all__ = ["ToolExecutor"]
