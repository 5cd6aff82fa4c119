"""The three-stage AgeMem episode engine, shared by training (verl, local) and evaluation.

Stage 1 injects the facts (memory writes expected), stage 2 the distractors (context control
expected), stage 3 the question (retrieve and answer). Long-term memory persists across the
stages of an episode; the context is reset between stages 1 and 2, as in the reference, and
stage 3 runs on top of the stage-2 context.

Behaviour worth knowing:
- A round is one model call. A reply with neither a tool call nor an answer is counted
  (``no_action_rounds`` and format error ``no_action``) and the next round opens a new
  assistant turn with nothing injected: the model gets another chance, bounded by the round limit,
  and nothing fabricated enters its context. (The reference continued the same assistant message.)
- Tool calls run in order before an ``<answer>`` in the same reply is honoured.
- Every tool or format problem becomes a ``tool`` message for the model and a counter in the
  statistics; nothing raises into the rollout, including an unreachable memory backend.
- Token mode emits segments: a new segment starts whenever the context is rewritten (summary,
  filter, overflow truncation, the stage-1 -> 2 reset). Within a segment the response ids are model
  turns (mask 1) and injected turns (mask 0) in order, so the next prompt is always the segment's
  prompt plus the response so far, exactly what the model saw.
- The budget is ``episode.max_context_tokens`` prompt tokens, counted with the policy tokenizer. On
  overflow the ``truncate`` policy drops the oldest rewritable messages (never the system prompt or
  the current stage message) and ``end_stage`` ends the stage; either way an overflow event is kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agemem.agent import tools as T
from agemem.agent.context import ChatTokenizer, ContextWindow, EmbeddingCache, extractive_summary
from agemem.agent.parsing import ParsedResponse, parse_response
from agemem.agent.prompts import SUMMARY_PROMPT, system_prompt
from agemem.agent.stats import EpisodeStats, OverflowEvent, ToolEvent
from agemem.memory.base import MemoryClient, MemorySession, MemoryUnavailableError, ToolResult
from agemem.reward.metrics import coverage

if TYPE_CHECKING:
    from agemem.data.records import EpisodeScript
    from agemem.llm import LLMClient
    from agemem.reward.judge import Judge
    from agemem.settings import Settings

logger = logging.getLogger(__name__)


# Memory calls that may run together when consecutive and of the SAME name: adds never read
# what another add wrote, retrieves only read. A retrieve after an add (or an update/delete
# of an id added earlier in the reply) must see the earlier call, so mixed runs stay sequential.
_BATCHABLE = frozenset({T.ADD, T.RETRIEVE})


class EpisodeEnded(Exception):
    """Internal: the current stage cannot continue (overflow with the end_stage policy)."""


@dataclass
class Segment:
    """One token sequence for training: a prompt and the turns that followed it."""

    prompt_ids: list[int]
    reason: str = "start"
    stage: int = 1
    response_ids: list[int] = field(default_factory=list)
    response_mask: list[int] = field(default_factory=list)
    response_logprobs: list[float] | None = field(default_factory=list)

    def extend(self, ids: list[int], mask: int, logprobs: list[float] | None = None) -> None:
        self.response_ids.extend(ids)
        self.response_mask.extend([mask] * len(ids))
        if self.response_logprobs is not None:
            if mask == 1 and (logprobs is None or len(logprobs) != len(ids)):
                self.response_logprobs = None  # the policy gave none: drop rather than invent
            else:
                self.response_logprobs.extend(logprobs if mask == 1 and logprobs else [0.0] * len(ids))

    @property
    def num_model_tokens(self) -> int:
        return sum(self.response_mask)

    def as_dict(self) -> dict[str, Any]:
        return {
            "prompt_ids": self.prompt_ids,
            "response_ids": self.response_ids,
            "response_mask": self.response_mask,
            "response_logprobs": self.response_logprobs,
            "reason": self.reason,
            "stage": self.stage,
        }


@dataclass
class EpisodeResult:
    episode_id: str
    segments: list[Segment]
    stats: EpisodeStats
    transcript: list[dict[str, Any]]

    @property
    def answer(self) -> str | None:
        return self.stats.final_answer

    def extra_fields(self) -> dict[str, Any]:
        """JSON-able statistics for verl's ``compute_score(extra_info=...)`` (flat keys)."""
        return self.stats.model_dump(mode="json")

    def transcript_text(self) -> str:
        lines = []
        for item in self.transcript:
            lines.append(f"[stage {item['stage']} round {item['round']}] {item['role']} ({item['kind']}):")
            lines.append(item["content"])
        return "\n".join(lines)


def _token_ids(out: Any) -> tuple[list[int], list[float] | None]:
    if isinstance(out, dict):
        return list(out.get("token_ids") or []), out.get("log_probs")
    ids = getattr(out, "token_ids", None)
    if ids is None and isinstance(out, (list, tuple)):
        return [int(i) for i in out], None
    return list(ids or []), getattr(out, "log_probs", None)


class _Run:
    """State of one episode (one rollout)."""

    def __init__(self, engine: "EpisodeEngine", script: "EpisodeScript", *, mode: str, policy: Any,
                 request_id: str, session: MemorySession | None, sampling: dict[str, Any]) -> None:
        self.e = engine
        self.cfg = engine.settings.episode
        self.script = script
        self.mode = mode
        self.policy = policy
        self.request_id = request_id
        self.session = session
        self.sampling = sampling
        self.allowed = tuple(s["function"]["name"] for s in engine.schemas)
        self.ctx = ContextWindow(engine.tokenizer, engine.system_prompt, self.cfg.max_context_tokens)
        self.stats = EpisodeStats(
            episode_id=script.episode_id,
            record_id=script.record_id,
            question=script.question,
            gold_answer=script.gold_answer,
            stage3_max_rounds=self.cfg.stage3_max_rounds,
            max_context_tokens=self.cfg.max_context_tokens,
            reward_preset=self.cfg.reward_preset,
            reward_overrides=dict(self.cfg.reward_overrides),
        )
        self.segments: list[Segment] = []
        self.segment: Segment | None = None
        self.dirty_reason: str | None = "start"
        self.pending: list[dict[str, str]] = []
        self.transcript: list[dict[str, Any]] = []
        self.stage = 0
        self.round_id = -1
        self.stage_round = 0
        self.generate_s = 0.0
        self._delta: list[int] | None = None

    # -- context bookkeeping ------------------------------------------------------------------
    def _add(self, role: str, content: str, kind: str) -> None:
        self.ctx.append(role, content, kind, stage=self.stage, round_id=self.round_id if kind != "stage" else -1)
        if role != "assistant":
            self.pending.append({"role": role, "content": content})
        self.transcript.append(
            {"stage": self.stage, "round": self.stage_round, "role": role, "kind": kind, "content": content}
        )

    def _rewritten(self, reason: str) -> None:
        self.dirty_reason = reason
        self.transcript.append(
            {"stage": self.stage, "round": self.stage_round, "role": "engine", "kind": "rewrite",
             "content": f"[context rewritten: {reason}; {self.ctx.token_count()} tokens]"}
        )

    def _close_segment(self) -> None:
        if self.segment is not None and self.segment.response_ids:
            self.segments.append(self.segment)
        self.segment = None

    def _prompt_len(self) -> int:
        """Tokens the model would see now (exact for the token stream; rendered for chat)."""
        if self.mode == "chat" or self.segment is None or self.dirty_reason is not None:
            return self.ctx.token_count()
        delta = self.e.tokenizer.delta_ids(self.pending, last_response_ids=self.segment.response_ids)
        self._delta = delta
        return len(self.segment.prompt_ids) + len(self.segment.response_ids) + len(delta)

    # -- budget -------------------------------------------------------------------------------
    def _enforce_budget(self) -> None:
        self._delta: list[int] | None = None
        tokens = self._prompt_len()
        self.stats.prompt_tokens_max = max(self.stats.prompt_tokens_max, tokens)
        budget = self.cfg.max_context_tokens
        if tokens <= budget:
            return
        event = OverflowEvent(stage=self.stage, round=self.stage_round, tokens=tokens, budget=budget,
                              action=self.cfg.overflow_policy)
        self.stats.overflow_events.append(event)
        self.stats.overflow_count += 1
        if self.cfg.overflow_policy == "end_stage":
            event.fits = False
            raise EpisodeEnded("overflow")
        dropped, fits = self.ctx.truncate_oldest(budget)
        event.dropped_messages, event.fits = dropped, fits
        logger.info("episode %s: overflow at %d/%d tokens, dropped %d messages", self.script.episode_id,
                    tokens, budget, dropped)
        if not fits:
            raise EpisodeEnded("overflow")
        self._rewritten("overflow")

    # -- generation ---------------------------------------------------------------------------
    def _count_pending(self) -> None:
        """Count the messages injected since the last model turn as this stage's injected tokens
        (chat mode and the first turn of a new segment; otherwise the segment's delta is counted)."""
        if self.pending:
            ids = self.e.tokenizer.delta_ids(self.pending, last_response_ids=[])
            self.stats.add_tokens(self.stage, injected=len(ids))

    async def _generate(self) -> str:
        self._enforce_budget()
        if self.mode == "chat":
            start = time.perf_counter()
            text = await self.policy.chat(self.ctx.messages(), dict(self.sampling))
            self.generate_s += time.perf_counter() - start
            text = text if isinstance(text, str) else str(text or "")
            self._count_pending()
            self.pending = []
            self.stats.add_tokens(self.stage, model=len(self.e.tokenizer.encode(text)))
            return text
        if self.segment is None or self.dirty_reason is not None:
            self._close_segment()
            self.segment = Segment(self.e.tokenizer.prompt_ids(self.ctx.messages()),
                                   reason=self.dirty_reason or "start", stage=self.stage)
            self.dirty_reason = None
            self._count_pending()
        else:
            delta = self._delta if self._delta is not None else self.e.tokenizer.delta_ids(
                self.pending, last_response_ids=self.segment.response_ids)
            self.segment.extend(delta, 0)
            self.stats.add_tokens(self.stage, injected=len(delta))
        self.pending = []
        prompt = self.segment.prompt_ids + self.segment.response_ids
        start = time.perf_counter()
        out = await self.policy.generate(self.request_id, prompt_ids=prompt, sampling_params=dict(self.sampling))
        self.generate_s += time.perf_counter() - start
        ids, logprobs = _token_ids(out)
        ids = ids[: self.cfg.max_turn_tokens] if len(ids) > self.cfg.max_turn_tokens else ids
        self.segment.extend(ids, 1, list(logprobs)[: len(ids)] if logprobs is not None else None)
        self.stats.add_tokens(self.stage, model=len(ids))
        return self.e.tokenizer.decode(ids, skip_special_tokens=True)

    # -- tools --------------------------------------------------------------------------------
    def _record(self, name: str, outcome: str, args: dict[str, Any], result: str,
                data: dict[str, Any] | None = None, count: bool = True) -> None:
        self.stats.events.append(ToolEvent(
            stage=self.stage, round=self.stage_round, name=name, ok=outcome == "ok", outcome=outcome,
            arguments=dict(args), result=result[: self.cfg.max_tool_result_chars], context_tokens=self.ctx.token_count(), data=data or {},
        ))
        if count:
            self.stats.count_tool(name, outcome)

    def _tool_message(self, text: str) -> None:
        limit = self.cfg.max_tool_result_chars
        if len(text) > limit:
            text = text[:limit] + " ...[truncated]"
        self._add("tool", text, "tool")

    async def _memory_call(self, name: str, args: dict[str, Any]) -> tuple[str, ToolResult | None]:
        if self.session is None:
            return "unavailable", None
        try:
            result = await self.e.memory.call_tool(self.session, name, args)
        except MemoryUnavailableError as exc:
            logger.warning("memory backend unavailable during %s: %s", name, exc)
            self.stats.memory_unavailable += 1
            return "unavailable", None
        return ("ok" if result.ok else "error"), result

    async def _run_memory_tool(self, v: T.Validated) -> None:
        args = T.memory_call_arguments(v, self.stage)
        self._memory_outcome(v, args, *await self._memory_call(v.name, args))

    async def _run_memory_batch(self, batch: list[T.Validated]) -> None:
        """Independent memory calls of one reply at once, so the embedder batches their texts.

        Results enter the statistics and the context in call order, after all have finished, so
        every event and tool message is what the sequential loop would have produced.
        """
        args = [T.memory_call_arguments(v, self.stage) for v in batch]
        done = await asyncio.gather(*(self._memory_call(v.name, a) for v, a in zip(batch, args)),
                                    return_exceptions=True)
        for v, a, res in zip(batch, args, done):
            if isinstance(res, BaseException):
                raise res  # as the sequential loop would have, at the same call
            self._memory_outcome(v, a, *res)

    def _memory_outcome(self, v: T.Validated, args: dict[str, Any], outcome: str, result: ToolResult | None) -> None:
        if result is None:
            text = f"[tool error] {v.name}: the memory service is unavailable; try again later"
        elif v.name == T.RETRIEVE:
            # The memory service already formats hits as "[retrieved memories]\n- ..." (reference format).
            text = result.text if result.ok else f"[tool error] {v.name}: {result.text}"
        else:
            text = f"[memory tool result] {v.name}: {result.text}" if result.ok else \
                f"[tool error] {v.name}: {result.text}"
        if outcome == "ok":
            if v.name == T.ADD:
                self.stats.memory_adds_ok += 1
            elif v.name == T.UPDATE:
                self.stats.memory_updates_ok += 1
            elif v.name == T.DELETE:
                self.stats.memory_deletes_ok += 1
        self._record(v.name, outcome, args, result.text if result else text, result.data if result else None)
        self._tool_message(text)

    async def _summarise(self, texts: list[str]) -> tuple[str, str]:
        llm = self.e.llm
        if llm is not None and not llm.offline:
            from agemem.llm import LLMError

            try:
                reply = await llm.chat([{"role": "user", "content": SUMMARY_PROMPT.format(excerpt="\n".join(texts))}],
                                       max_tokens=self.cfg.summary_max_tokens)
                if reply.text.strip():
                    return reply.text.strip(), "llm"
            except LLMError as exc:
                logger.warning("summary LLM failed, using the extractive summary: %s", exc)
        return extractive_summary(texts, self.e.embed.encode), "extractive"

    async def _run_context_tool(self, v: T.Validated) -> None:
        before = self.ctx.token_count()
        data: dict[str, Any] = {}
        if v.name == T.SUMMARY:
            sel = self.ctx.select_span(v.arguments["span"], self.round_id)
            if sel.error:
                outcome, text = "error", f"[tool error] Summary_context: {sel.error}"
            elif not sel.indices:
                outcome, text = "error", "[tool error] Summary_context: no earlier messages to summarise in that span"
            else:
                texts = [f"{self.ctx.entries[i].role}: {self.ctx.entries[i].content}" for i in sel.indices]
                summary, source = await self._summarise(texts)
                self.ctx.replace_with_summary(sel.indices, summary, stage=self.stage)
                after = self.ctx.token_count()
                data = {"replaced": len(sel.indices), "source": source, "tokens_before": before, "tokens_after": after}
                outcome = "ok"
                text = (f"[context tool result] Summary_context: replaced {len(sel.indices)} messages with a summary "
                        f"({before} -> {after} tokens)")
                self._rewritten("summary")
        else:
            criteria = v.arguments["criteria"]
            candidates = self.ctx.filter_candidates(self.round_id)
            removed = 0
            if candidates:
                vecs = self.e.embed.encode([criteria] + [self.ctx.entries[i].content for i in candidates])
                sims = vecs[1:] @ vecs[0]
                drop = [i for i, s in zip(candidates, sims.tolist()) if s >= self.cfg.filter_threshold]
                removed = self.ctx.remove(drop) if drop else 0
            after = self.ctx.token_count()
            data = {"removed": removed, "tokens_before": before, "tokens_after": after}
            outcome = "ok"
            text = (f"[context tool result] Filter_context: removed {removed} messages "
                    f"({before} -> {after} tokens)")
            if removed:
                self._rewritten("filter")
        if outcome == "ok" and self.stats.overflow_count == 0 and before <= self.cfg.max_context_tokens:
            self.stats.preventive_context_tools += 1
        self._record(v.name, outcome, dict(v.arguments), text, data)
        self._tool_message(text)

    async def _execute(self, parsed: ParsedResponse) -> None:
        for issue in parsed.errors:
            self.stats.count_format_error(issue.kind)
            self._tool_message(f"[format error] {issue.message}")
        self.stats.tool_calls_ignored_in_think += parsed.ignored_in_think
        calls = parsed.tool_calls
        limit = self.cfg.max_tool_calls_per_turn
        batch: list[T.Validated] = []
        for call in calls[:limit]:
            v = T.validate_call(call, allowed=self.allowed, default_top_k=self.e.settings.memory.default_top_k)
            if v.ok and v.name in _BATCHABLE and (not batch or batch[0].name == v.name):
                batch.append(v)
                continue
            await self._flush(batch)
            batch = []
            if not v.ok:
                outcome = "disabled" if "disabled" in (v.error or "") else "error"
                self._record(v.name, outcome, call.arguments if isinstance(call.arguments, dict) else {},
                             v.error or "")
                self._tool_message(f"[tool error] {v.error}")
            elif v.name in _BATCHABLE:
                batch = [v]
            elif v.name in T.MEMORY_TOOL_NAMES:
                await self._run_memory_tool(v)
            else:
                await self._run_context_tool(v)
        await self._flush(batch)
        for call in calls[limit:]:
            self._record(str(call.name)[:60], "skipped", {}, "too many calls")
        if len(calls) > limit:
            self._tool_message(f"[tool error] only the first {limit} tool calls of a reply are executed; "
                               f"{len(calls) - limit} skipped")

    async def _flush(self, batch: list[T.Validated]) -> None:
        if len(batch) == 1:
            await self._run_memory_tool(batch[0])
        elif batch:
            await self._run_memory_batch(batch)

    async def _auto_retrieve(self, query: str) -> None:
        """Ablation without context tools: retrieve for every injected user message (reference s. 8)."""
        args = {"query": query[:2000], "top_k": self.cfg.manual_retrieve_top_k}
        outcome, result = await self._memory_call(T.RETRIEVE, args)
        text = result.text if result is not None else "memory service unavailable"
        self._record(T.RETRIEVE, outcome, args, text, {"auto": True, **(result.data if result else {})}, count=False)
        if outcome == "ok":
            self._add("tool", f"[manual] {text}", "auto_retrieve")

    # -- stages -------------------------------------------------------------------------------
    async def _turn(self, message: str, max_rounds: int) -> str:
        """Inject one stage message and run rounds until an answer, the round limit or overflow."""
        self.stage_round = 0
        self._add("user", message, "stage")
        if not self.cfg.use_context_tools and self.session is not None:
            await self._auto_retrieve(message)
        for r in range(max_rounds):
            self.stage_round = r
            self.round_id += 1
            try:
                text = await self._generate()
            except EpisodeEnded as ended:
                return str(ended)
            key = str(self.stage)
            self.stats.rounds[key] = self.stats.rounds.get(key, 0) + 1
            self.stats.total_rounds += 1
            if self.stage == 3:
                self.stats.stage3_rounds += 1
            self._add("assistant", text, "assistant")
            parsed = parse_response(text)
            await self._execute(parsed)
            if parsed.answer is not None:
                if self.stage == 3:
                    self.stats.final_answer = parsed.answer
                    self.stats.answered = True
                    gold = self.script.supporting_sentences
                    self.stats.key_info_in_context = coverage(gold, [self.ctx.text()], self.cfg.coverage_threshold)
                return "answer"
            if not parsed.has_action and not parsed.errors:
                self.stats.no_action_rounds += 1
                self.stats.count_format_error("no_action")
        return "round_limit"

    async def run(self) -> None:
        s = self.script
        self.stage = 1
        ends = []
        for message in s.stage1_turns:
            ends.append(await self._turn(message, self.cfg.stage1_max_rounds))
        self.stats.stage_end["1"] = ends[-1] if ends else "skipped"

        # Reference: the whole context is cleared between stages 1 and 2; memory is kept.
        self.ctx.reset()
        self.pending = []
        self._rewritten("stage_reset")
        self.stage = 2
        distractors = [d.text for d in s.distractors if d.text.strip()]
        if self.cfg.enable_stage2 and distractors:
            ends = [await self._turn(d, self.cfg.stage2_max_rounds) for d in distractors]
            self.stats.stage_end["2"] = ends[-1]
        else:
            self.stats.stage_end["2"] = "skipped"

        self.stage = 3
        end = await self._turn(s.question, self.cfg.stage3_max_rounds)
        self.stats.stage_end["3"] = end
        self.stats.round_limit_hit = end == "round_limit" and not self.stats.answered
        self._close_segment()


class EpisodeEngine:
    """Runs episodes against a token-level or chat-level policy and a memory client."""

    def __init__(
        self,
        settings: "Settings",
        *,
        tokenizer: ChatTokenizer | Any | None = None,
        memory: MemoryClient | None = None,
        llm: "LLMClient | None" = None,
        judge: "Judge | None" = None,
        encode: Any | None = None,
    ) -> None:
        self.settings = settings
        cfg = settings.episode
        if tokenizer is None:
            self.tokenizer = ChatTokenizer.from_path(cfg.tokenizer)
        elif isinstance(tokenizer, ChatTokenizer):
            self.tokenizer = tokenizer
        else:
            self.tokenizer = ChatTokenizer(tokenizer)
        self.memory = memory
        self.llm = llm
        self.judge = judge
        if encode is None:
            def encode(texts: list[str]) -> Any:
                from agemem.memory.embedder import get_embedder

                return get_embedder(settings.memory.embedding_model, settings.memory.embedding_device).encode(texts)
        self.embed = EmbeddingCache(encode)
        self.schemas = T.tool_schemas(cfg.use_context_tools)
        self.system_prompt = system_prompt(self.schemas, cfg.max_context_tokens)

    def sampling_params(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg = self.settings.episode
        params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_turn_tokens}
        return {**params, **(overrides or {})}

    async def run_tokens(
        self,
        script: "EpisodeScript",
        policy: Any,
        *,
        request_id: str | None = None,
        session: MemorySession | None = None,
        sampling_overrides: dict[str, Any] | None = None,
    ) -> EpisodeResult:
        """One episode against a token-level policy (verl server-manager shape)."""
        return await self._run(script, policy, "tokens", request_id or uuid.uuid4().hex, session,
                               self.sampling_params(sampling_overrides))

    async def run_chat(
        self,
        script: "EpisodeScript",
        policy: Any,
        *,
        session: MemorySession | None = None,
        sampling_overrides: dict[str, Any] | None = None,
    ) -> EpisodeResult:
        """One episode against a chat-level policy (messages in, text out); no segments."""
        return await self._run(script, policy, "chat", uuid.uuid4().hex, session,
                               self.sampling_params(sampling_overrides))

    async def _run(self, script: "EpisodeScript", policy: Any, mode: str, request_id: str,
                   session: MemorySession | None, sampling: dict[str, Any]) -> EpisodeResult:
        start = time.perf_counter()
        owned = False
        if session is None and self.memory is not None:
            try:
                session = await self.memory.create_session()
                owned = True
            except MemoryUnavailableError as exc:
                logger.warning("episode %s runs without memory: %s", script.episode_id, exc)
        run = _Run(self, script, mode=mode, policy=policy, request_id=request_id, session=session,
                   sampling=sampling)
        try:
            await run.run()
            await self._finish(run)
        finally:
            if owned and session is not None and self.memory is not None:
                try:
                    await self.memory.delete_session(session)
                except MemoryUnavailableError as exc:
                    logger.warning("could not delete memory session %s: %s", session.session_id, exc)
        stats = run.stats
        stats.wall_s = time.perf_counter() - start
        stats.generate_s = run.generate_s
        stats.overhead_s = max(0.0, stats.wall_s - stats.generate_s - stats.judge_s)
        return EpisodeResult(script.episode_id, run.segments, stats, run.transcript)

    async def _finish(self, run: _Run) -> None:
        stats, script = run.stats, run.script
        stats.context_tokens_final = run.ctx.token_count()
        stats.context_ratio_final = stats.context_tokens_final / self.settings.episode.max_context_tokens
        if run.session is not None and self.memory is not None:
            try:
                items = await self.memory.list_memories(run.session)
                stats.memories_final = [
                    {"memory_id": m.memory_id, "content": m.content, "memory_type": m.memory_type,
                     "stage": str(m.metadata.get("stage", ""))}
                    for m in items
                ]
            except MemoryUnavailableError as exc:
                logger.warning("could not list memories: %s", exc)
        gold = script.supporting_sentences
        threshold = self.settings.episode.coverage_threshold
        written = [str(e.arguments.get("content", "")) for e in stats.events if e.ok and e.name in (T.ADD, T.UPDATE)]
        stats.storage_recall = coverage(gold, written, threshold)
        retrieved = [e.result for e in stats.events if e.ok and e.name == T.RETRIEVE and e.stage == 3]
        stats.retrieved_any = bool(retrieved)
        stats.retrieval_recall = coverage(gold, retrieved, threshold) if gold else None
        if self.judge is None:
            from agemem.reward.judge import Judge

            # No judge given: the offline one (EM/F1, embedding memory quality) keeps stats meaningful.
            self.judge = Judge(None, encode=self.embed.encode)
        t0 = time.perf_counter()
        js = await self.judge.score_answer(script.question, script.gold_answer, stats.final_answer)
        stats.judge_score, stats.em, stats.f1 = js.score, js.em, js.f1
        stats.judge_source, stats.judge_fallback = js.source, js.fallback
        mq = await self.judge.memory_quality_report([m["content"] for m in stats.memories_final], gold)
        stats.memory_quality, stats.memory_quality_source = mq.score, mq.source
        stats.memory_quality_fallback = mq.fallback
        stats.judge_s = time.perf_counter() - t0


__all__ = ["EpisodeEngine", "EpisodeResult", "LLMChatPolicy", "Segment"]


class LLMChatPolicy:
    """A chat-level policy over an :class:`agemem.llm.LLMClient` (any OpenAI-compatible endpoint, DashScope)."""

    def __init__(self, client: "LLMClient") -> None:
        self.client = client

    async def chat(self, messages: Any, sampling_params: dict[str, Any]) -> str:
        result = await self.client.chat(
            list(messages), temperature=sampling_params.get("temperature"), max_tokens=sampling_params.get("max_tokens")
        )
        return result.text
