"""The three-stage AgeMem episode engine, shared by training (verl, local), evaluation and chat.

Stage 1 injects the facts (memory writes expected), stage 2 the distractors (context control
expected), stage 3 the question (retrieve and answer). Long-term memory persists across the
stages of an episode; the context is reset between stages 1 and 2, as in the reference, and
stage 3 runs on top of the stage-2 context.

The engine reads like verl's ``ToolAgentLoop``: :class:`EpisodeState` holds the episode, the
:class:`~agemem.agent.segments.SegmentRecorder` keeps the token segments, the
:class:`~agemem.agent.executor.ToolExecutor` runs tool calls, and :class:`StageDriver` below is the
state machine: per stage message, rounds of generate -> parse -> execute until an answer, the
round limit, the auto-summary threshold or an overflow.

Behaviour worth knowing:
- A round is one model call. A reply with neither a tool call nor an answer is counted
  (``no_action_rounds`` and format error ``no_action``) and the next round opens a new
  assistant turn with nothing injected (the reference continued the same assistant message).
- Tool calls run in order before an ``<answer>`` in the same reply is honoured.
- A conversation (``agemem chat``, the served agent) is the same machine: one :meth:`StageDriver.turn`
  per user message, on a context that keeps growing under the same budget.
- Nothing raises into the rollout: tool and format problems are tool messages and counters, an
  unreachable memory backend is a tool error (and no session at all is a warning).
- The budget is ``episode.max_context_tokens`` prompt tokens, counted with the policy tokenizer. On
  overflow the ``truncate`` policy drops the oldest rewritable messages (never the system prompt or
  the current stage message) and ``end_stage`` ends the stage; either way an overflow event is kept.
- ``episode.auto_summary_threshold`` (the reference's 0.8 in the ``official-code`` preset): after a
  round without an answer, a context above that share of the budget ends the stage message.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import numpy as np

from agemem.agent import tools as T
from agemem.agent.context import ChatTokenizer, ContextWindow, EmbeddingCache
from agemem.agent.executor import ToolExecutor
from agemem.agent.parsing import parse_response
from agemem.agent.prompts import episode_system_prompt
from agemem.agent.segments import Generation, Segment, SegmentRecorder
from agemem.agent.state import EpisodeState
from agemem.agent.stats import EpisodeStats, OverflowEvent
from agemem.llm import build_llm_client
from agemem.memory.base import MemoryClient, MemorySession, MemoryUnavailableError
from agemem.memory.client import build_memory_client
from agemem.memory.embedder import get_embedder
from agemem.reward.components import auto_summary_threshold
from agemem.reward.judge import Judge
from agemem.reward.metrics import coverage

if TYPE_CHECKING:
    from agemem.data.records import EpisodeScript
    from agemem.llm import LLMClient
    from agemem.settings import Settings

logger = logging.getLogger(__name__)

Closer = Callable[[], Awaitable[None]]


class EpisodeEnded(Exception):
    """Internal: the current stage cannot continue (overflow with the end_stage policy)."""


@dataclass
class EpisodeResult:
    episode_id: str
    segments: list[Segment]
    stats: EpisodeStats
    transcript: list[dict[str, Any]]
    generation_fields: dict[str, Any] = field(default_factory=dict)

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


class StageDriver:
    """The state machine of one episode (or conversation): stage messages, rounds, budget, answers.

    :meth:`run` plays the three stages of a script; :meth:`turn` is one injected message and the
    rounds that answer it, which a conversation (:mod:`agemem.agent.conversation`) calls per user
    message.
    """

    def __init__(self, engine: "EpisodeEngine", state: EpisodeState, *, mode: str, policy: Any,
                 request_id: str, sampling: dict[str, Any]) -> None:
        self.engine = engine
        self.state = state
        self.cfg = state.cfg
        self.mode = mode
        self.policy = policy
        self.request_id = request_id
        self.sampling = sampling
        self.tools = ToolExecutor(engine.settings, state, memory=engine.memory, llm=engine.llm,
                                  encode=engine.embed.encode, allowed=engine.tool_names)
        self.threshold = auto_summary_threshold(self.cfg)
        self.generate_s = 0.0
        self.teacher_cut_warned = False
        self.turns = 0

    # -- budget -------------------------------------------------------------------------------
    def _enforce_budget(self) -> None:
        s = self.state
        tokens = s.ctx.token_count() if self.mode == "chat" else s.recorder.prompt_len(s.ctx)
        s.stats.prompt_tokens_max = max(s.stats.prompt_tokens_max, tokens)
        budget = self.cfg.max_context_tokens
        if tokens <= budget:
            return
        event = OverflowEvent(stage=s.stage, round=s.stage_round, tokens=tokens, budget=budget,
                              action=self.cfg.overflow_policy)
        s.stats.overflow_events.append(event)
        s.stats.overflow_count += 1
        if self.cfg.overflow_policy == "end_stage":
            event.fits = False
            raise EpisodeEnded("overflow")
        dropped, fits = s.ctx.truncate_oldest(budget)
        event.dropped_messages, event.fits = dropped, fits
        logger.info("episode %s: overflow at %d/%d tokens, dropped %d messages", s.script.episode_id,
                    tokens, budget, dropped)
        if not fits:
            raise EpisodeEnded("overflow")
        s.rewritten("overflow")

    # -- generation ---------------------------------------------------------------------------
    async def _generate(self) -> str:
        self._enforce_budget()
        s = self.state
        start = time.perf_counter()
        if self.mode == "chat":
            text = await self.policy.chat(s.ctx.messages(), dict(self.sampling))
            self.generate_s += time.perf_counter() - start
            text = text if isinstance(text, str) else str(text or "")
            s.stats.add_tokens(s.stage, injected=s.recorder.pending_tokens(),
                               model=len(self.engine.tokenizer.encode(text)))
            s.recorder.forget_pending()
            return text
        messages = s.ctx.messages() if self.mode == "teacher" else None
        prompt, injected = s.recorder.next_prompt(s.ctx, s.stage)
        s.stats.add_tokens(s.stage, injected=injected)
        start = time.perf_counter()
        if messages is not None:
            generation = self._teacher_turn(await self.policy.chat(messages, dict(self.sampling)))
        else:
            out = await self.policy.generate(self.request_id, prompt_ids=prompt, sampling_params=self._turn_sampling())
            generation = Generation.of(out)
        self.generate_s += time.perf_counter() - start
        ids = s.recorder.record(generation, self.cfg.max_turn_tokens)
        s.stats.add_tokens(s.stage, model=len(ids))
        return self.engine.tokenizer.decode(ids, skip_special_tokens=True)

    def _turn_sampling(self) -> dict[str, Any]:
        """This turn's sampling parameters; a trajectory ``seed`` becomes one seed per turn (the same
        seed on every turn would replay the same random draws)."""
        params = dict(self.sampling)
        if params.get("seed") is not None:
            params["seed"] = (int(params["seed"]) + self.turns) % 2**63
        self.turns += 1
        return params

    def _teacher_turn(self, text: Any) -> Generation:
        """A teacher's reply as the policy's own tokens (closed with eos, as a sampled turn would be)."""
        tokenizer = self.engine.tokenizer
        ids = tokenizer.encode(text if isinstance(text, str) else str(text or ""))
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        if len(ids) > self.cfg.max_turn_tokens and not self.teacher_cut_warned:
            self.teacher_cut_warned = True  # once per episode: the cap is a setting, not a per-turn event
            logger.warning("episode %s: teacher replies longer than episode.max_turn_tokens=%d are cut (first: %d "
                           "tokens)", self.state.script.episode_id, self.cfg.max_turn_tokens, len(ids))
        return Generation(ids)

    # -- stages -------------------------------------------------------------------------------
    def _over_threshold(self) -> bool:
        return self.threshold is not None and self.state.ctx.token_count() > self.threshold * self.cfg.max_context_tokens

    def _count_round(self) -> None:
        stats, key = self.state.stats, str(self.state.stage)
        stats.rounds[key] = stats.rounds.get(key, 0) + 1
        stats.total_rounds += 1
        if self.state.stage == 3:
            stats.stage3_rounds += 1

    def _answered(self, answer: str) -> None:
        s = self.state
        s.last_answer = answer
        if s.stage == 3:
            s.stats.final_answer = answer
            s.stats.answered = True
            s.stats.key_info_in_context = coverage(s.script.supporting_sentences, [s.ctx.text()],
                                                   self.cfg.coverage_threshold)

    async def turn(self, message: str, max_rounds: int) -> str:
        """Inject one stage message; run rounds until an answer, the round limit or a context limit."""
        s = self.state
        s.stage_round = 0
        s.add("user", message, "stage")
        if not self.cfg.use_context_tools and s.session is not None:
            await self.tools.auto_retrieve(message)
        for r in range(max_rounds):
            s.stage_round = r
            s.round_id += 1
            try:
                text = await self._generate()
            except EpisodeEnded as ended:
                return str(ended)
            self._count_round()
            s.add("assistant", text, "assistant")
            parsed = parse_response(text)
            await self.tools.execute(parsed)
            if parsed.answer is not None:
                self._answered(parsed.answer)
                return "answer"
            if not parsed.has_action and not parsed.errors:
                s.stats.no_action_rounds += 1
                s.stats.count_format_error("no_action")
            if self._over_threshold():
                s.stats.auto_summary_stops += 1
                return "threshold"
        return "round_limit"

    async def run(self) -> None:
        s, script = self.state, self.state.script
        s.stage = 1
        ends = [await self.turn(message, self.cfg.stage1_max_rounds) for message in script.stage1_turns]
        s.stats.stage_end["1"] = ends[-1] if ends else "skipped"

        # Reference: the whole context is cleared between stages 1 and 2; memory is kept.
        s.ctx.reset()
        s.recorder.forget_pending()
        s.rewritten("stage_reset")
        s.stage = 2
        distractors = [d.text for d in script.distractors if d.text.strip()]
        if self.cfg.enable_stage2 and distractors:
            ends = [await self.turn(d, self.cfg.stage2_max_rounds) for d in distractors]
            s.stats.stage_end["2"] = ends[-1]
        else:
            s.stats.stage_end["2"] = "skipped"

        s.stage = 3
        end = await self.turn(script.question, self.cfg.stage3_max_rounds)
        s.stats.stage_end["3"] = end
        s.stats.round_limit_hit = end == "round_limit" and not s.stats.answered
        s.recorder.close()


class EpisodeEngine:
    """Runs episodes against a token-level or chat-level policy and a memory client.

    Build it with :meth:`from_settings` (which builds and owns what it is not given, closed by
    :meth:`aclose`); the constructor takes every dependency explicitly.
    """

    def __init__(
        self,
        settings: "Settings",
        *,
        tokenizer: ChatTokenizer,
        memory: MemoryClient | None,
        llm: "LLMClient | None",
        judge: Judge,
        embed: EmbeddingCache,
        closers: list[Closer] | None = None,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.memory = memory
        self.llm = llm
        self.judge = judge
        self.embed = embed
        self._closers = list(closers or [])
        cfg = settings.episode
        self.schemas = T.tool_schemas(cfg.use_context_tools)
        self.tool_names = tuple(s["function"]["name"] for s in self.schemas)
        self.system_prompt = episode_system_prompt(cfg)

    @classmethod
    def from_settings(
        cls,
        settings: "Settings",
        *,
        tokenizer: ChatTokenizer | Any | None = None,
        memory: MemoryClient | None = None,
        llm: "LLMClient | None" = None,
        judge: Judge | None = None,
        encode: Callable[[list[str]], np.ndarray] | None = None,
    ) -> "EpisodeEngine":
        """The engine with everything it needs; what is not given is built from settings and owned.

        ``tokenizer``: the policy's (a transformers tokenizer or a :class:`ChatTokenizer`); default
        ``episode.tokenizer``. ``memory``: default :func:`agemem.memory.client.build_memory_client`.
        ``encode``: the embedding function of Filter_context, summaries and the offline judge.
        """
        closers: list[Closer] = []
        if tokenizer is None:
            chat_tokenizer = ChatTokenizer.from_path(settings.episode.tokenizer)
        else:
            chat_tokenizer = tokenizer if isinstance(tokenizer, ChatTokenizer) else ChatTokenizer(tokenizer)
        if memory is None:
            memory = build_memory_client(settings)
            closers.append(memory.aclose)
        if llm is None:
            llm = build_llm_client(settings, "llm")
            closers.append(llm.aclose)
        if encode is None:
            mem = settings.memory
            encode = get_embedder(mem.embedding_model, mem.embedding_device).encode
        embed = EmbeddingCache(encode)
        if judge is None:
            # The judge embeds through the engine's per-text cache: GRPO siblings share the gold
            # sentences and mostly the same stored facts, so they are embedded once per group.
            judge = Judge.from_settings(settings, encode=embed.encode)
            if judge.client is not None and judge.client is not llm:
                closers.append(judge.client.aclose)
        return cls(settings, tokenizer=chat_tokenizer, memory=memory, llm=llm, judge=judge, embed=embed,
                   closers=closers)

    async def aclose(self) -> None:
        """Close what :meth:`from_settings` built (a failure to close is logged, never raised)."""
        closers, self._closers = self._closers, []
        for close in closers:
            try:
                await close()
            except Exception as exc:  # noqa: BLE001 - closing must not hide a finished run
                logger.warning("closing episode-engine resources: %s", exc)

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
        """One episode against a token-level policy (verl server-manager shape).

        Without ``session`` the engine creates the trajectory's own memory session and deletes it
        when the episode ends; a given ``session`` (a persistent memory space) is left as it is.
        """
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

    async def run_teacher(
        self,
        script: "EpisodeScript",
        policy: Any,
        *,
        session: MemorySession | None = None,
        sampling_overrides: dict[str, Any] | None = None,
    ) -> EpisodeResult:
        """One episode played by a chat-level teacher, recorded as token segments of the policy's tokenizer.

        The teacher sees the same messages a chat policy would; each reply is encoded with the engine's
        tokenizer and recorded as a model turn (mask 1), so the segments are exactly what supervised
        warm start trains on and what GRPO would have recorded had the policy written those tokens.
        """
        return await self._run(script, policy, "teacher", uuid.uuid4().hex, session,
                               self.sampling_params(sampling_overrides))

    def new_state(self, script: "EpisodeScript", session: MemorySession | None) -> EpisodeState:
        cfg = self.settings.episode
        stats = EpisodeStats(
            episode_id=script.episode_id, record_id=script.record_id, question=script.question,
            gold_answer=script.gold_answer, stage3_max_rounds=cfg.stage3_max_rounds,
            max_context_tokens=cfg.max_context_tokens, reward_preset=cfg.reward_preset,
            reward_overrides=dict(cfg.reward_overrides),
        )
        return EpisodeState(script=script, cfg=cfg, ctx=ContextWindow(self.tokenizer, self.system_prompt,
                                                                        cfg.max_context_tokens),
                            recorder=SegmentRecorder(self.tokenizer), stats=stats, session=session)

    def driver(self, state: EpisodeState, policy: Any, *, mode: str, request_id: str | None = None,
               sampling: dict[str, Any] | None = None) -> StageDriver:
        """The state machine over ``state`` for ``policy`` (``mode``: tokens | chat | teacher)."""
        if mode not in ("tokens", "chat", "teacher"):
            raise ValueError(f"unknown policy mode {mode!r}: tokens, chat or teacher")
        return StageDriver(self, state, mode=mode, policy=policy, request_id=request_id or uuid.uuid4().hex,
                           sampling=sampling if sampling is not None else self.sampling_params())

    async def open_session(self, label: str) -> MemorySession | None:
        """A memory session for one trajectory, or None (with a warning) when memory is unavailable."""
        if self.memory is None:
            return None
        try:
            return await self.memory.create_session()
        except MemoryUnavailableError as exc:
            logger.warning("episode %s runs without memory: %s", label, exc)
            return None

    async def close_session(self, session: MemorySession | None) -> None:
        if session is None or self.memory is None:
            return
        try:
            await self.memory.delete_session(session)
        except Exception as exc:  # noqa: BLE001 - a failed delete must not lose the finished rollout
            logger.warning("could not delete memory session %s: %s", session.session_id, exc)

    async def _run(self, script: "EpisodeScript", policy: Any, mode: str, request_id: str,
                   session: MemorySession | None, sampling: dict[str, Any]) -> EpisodeResult:
        start = time.perf_counter()
        owned = session is None
        if owned:
            session = await self.open_session(script.episode_id)
        state = self.new_state(script, session)
        driver = self.driver(state, policy, mode=mode, request_id=request_id, sampling=sampling)
        try:
            await driver.run()
            await self._finish(state)
        finally:
            if owned:
                await self.close_session(session)
        stats = state.stats
        stats.wall_s = time.perf_counter() - start
        stats.generate_s = driver.generate_s
        stats.overhead_s = max(0.0, stats.wall_s - stats.generate_s - stats.judge_s)
        return EpisodeResult(script.episode_id, state.recorder.segments, stats, state.transcript,
                             dict(state.recorder.generation_fields))

    async def _final_memories(self, state: EpisodeState) -> None:
        if state.session is None or self.memory is None:
            return
        try:
            items = await self.memory.list_memories(state.session)
        except MemoryUnavailableError as exc:
            logger.warning("could not list memories: %s", exc)
            return
        state.stats.memories_final = [
            {"memory_id": m.memory_id, "content": m.content, "memory_type": m.memory_type,
             "stage": str(m.metadata.get("stage", ""))}
            for m in items
        ]

    async def _finish(self, state: EpisodeState) -> None:
        """Statistics the reward reads: final context, memories, coverage, judge scores."""
        stats, script = state.stats, state.script
        stats.context_tokens_final = state.ctx.token_count()
        stats.context_ratio_final = stats.context_tokens_final / self.settings.episode.max_context_tokens
        await self._final_memories(state)
        gold = script.supporting_sentences
        threshold = self.settings.episode.coverage_threshold
        written = [str(e.arguments.get("content", "")) for e in stats.events if e.ok and e.name in (T.ADD, T.UPDATE)]
        stats.storage_recall = coverage(gold, written, threshold)
        retrieved = [e.result for e in stats.events if e.ok and e.name == T.RETRIEVE and e.stage == 3]
        stats.retrieved_any = bool(retrieved)
        stats.retrieval_recall = coverage(gold, retrieved, threshold) if gold else None
        t0 = time.perf_counter()
        js = await self.judge.score_answer(script.question, script.gold_answer, stats.final_answer)
        stats.judge_score, stats.em, stats.f1 = js.score, js.em, js.f1
        stats.judge_source, stats.judge_fallback = js.source, js.fallback
        mq = await self.judge.memory_quality_report([m["content"] for m in stats.memories_final], gold)
        stats.memory_quality, stats.memory_quality_source = mq.score, mq.source
        stats.memory_quality_fallback = mq.fallback
        await self._grade_memory_use(state, written)
        stats.judge_s = time.perf_counter() - t0

    async def _grade_memory_use(self, state: EpisodeState, written: list[str]) -> None:
        """R_storage over what the agent stored, R_relevance over what stage 3 retrieved (the judge)."""
        stats, script = state.stats, state.script
        retrieved = [str(m.get("content", "")) for e in stats.events if e.ok and e.name == T.RETRIEVE and e.stage == 3
                     for m in (e.data.get("memories") or [])]
        answer = script.gold_answer
        storage = await self.judge.storage_quality(written, script.question, answer, script.supporting_sentences)
        relevance = await self.judge.retrieval_relevance(retrieved, script.question, answer,
                                                         script.supporting_sentences)
        stats.storage_quality, stats.storage_quality_source = storage.score, storage.source
        stats.retrieval_relevance, stats.retrieval_relevance_source = relevance.score, relevance.source


__all__ = ["Closer", "EpisodeEngine", "EpisodeResult", "Segment", "StageDriver"]
