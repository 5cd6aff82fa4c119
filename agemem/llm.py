"""One async chat interface for every auxiliary LLM call (distractors, summaries, judge, hosted policies).

Backends: DashScope (the ``dashscope`` SDK), any OpenAI-compatible HTTP endpoint (a vLLM server,
local or remote; the ``openai`` SDK), and an offline backend that needs no model. Every call is
bounded by a timeout, retried with exponential backoff on transient errors only, and limited in
concurrency; token usage is counted per client.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

if TYPE_CHECKING:
    from agemem.settings import LLMSettings, Settings

logger = logging.getLogger(__name__)

Message = dict[str, str]

OFFLINE_LABEL = "[offline]"


class LLMError(RuntimeError):
    """An LLM call failed for good (bad request, auth, exhausted retries)."""


class LLMTransientError(LLMError):
    """A failure worth retrying: timeout, connection error, 429, 5xx."""


class LLMTimeoutError(LLMTransientError):
    """The endpoint did not answer within the configured timeout."""


@dataclass(frozen=True)
class ChatResult:
    text: str
    model: str
    backend: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    offline: bool = False


@dataclass
class UsageStats:
    """Running totals for one client (read them for cost and load reports)."""

    calls: int = 0
    failures: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ChatBackend(ABC):
    """A single attempt at a chat completion; retries and timeouts live in :class:`LLMClient`."""

    name: str = "abstract"
    offline: bool = False

    @abstractmethod
    async def complete(
        self,
        messages: Sequence[Message],
        *,
        model: str,
        temperature: float,
        max_tokens: int,
        seed: int | None,
        timeout_s: float,
    ) -> ChatResult: ...

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class OfflineBackend(ChatBackend):
    """Deterministic, model-free replies, labelled ``[offline]``.

    Components that have a real offline algorithm (EM/F1 judging, extractive summaries,
    distractors from other records) check ``client.offline`` and use it instead; this reply is
    the generic answer for anything else, so a pipeline can run end to end without a model.
    """

    name = "offline"
    offline = True

    async def complete(self, messages, *, model, temperature, max_tokens, seed, timeout_s) -> ChatResult:
        last_user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        first_sentence = re.split(r"(?<=[.!?])\s+", last_user.strip(), maxsplit=1)[0]
        words = first_sentence.split()[: max(1, max_tokens)]
        digest = hashlib.sha256(f"{seed}|{last_user}".encode()).hexdigest()[:8]
        text = f"{OFFLINE_LABEL} {' '.join(words)} #{digest}".strip()
        prompt_tokens = sum(len(m.get("content", "").split()) for m in messages)
        return ChatResult(text, "offline", self.name, prompt_tokens, len(text.split()), offline=True)


class OpenAICompatibleBackend(ChatBackend):
    """Any OpenAI chat-completions endpoint: vLLM, SGLang, DashScope's compatible mode, OpenAI."""

    name = "openai"

    def __init__(self, base_url: str, api_key: str | None) -> None:
        from openai import AsyncOpenAI

        # Retries are the client's job (uniform across backends), so the SDK's own are off.
        self._client = AsyncOpenAI(base_url=base_url, api_key=api_key or "EMPTY", max_retries=0)

    async def complete(self, messages, *, model, temperature, max_tokens, seed, timeout_s) -> ChatResult:
        import openai

        kwargs: dict[str, Any] = {"model": model, "messages": list(messages), "temperature": temperature}
        kwargs["max_tokens"] = max_tokens
        if seed is not None:
            kwargs["seed"] = seed
        try:
            resp = await self._client.chat.completions.create(timeout=timeout_s, **kwargs)
        except openai.APITimeoutError as exc:
            raise LLMTimeoutError(f"{self.name}: no answer within {timeout_s}s") from exc
        except openai.APIConnectionError as exc:
            raise LLMTransientError(f"{self.name}: cannot connect to {self._client.base_url}: {exc}") from exc
        except openai.APIStatusError as exc:
            message = f"{self.name}: HTTP {exc.status_code} from {self._client.base_url}: {exc.message}"
            if exc.status_code == 429 or exc.status_code >= 500:
                raise LLMTransientError(message) from exc
            raise LLMError(message) from exc
        except (openai.APIError, ValueError) as exc:
            # A 200 whose body is not a chat completion (proxy error page, truncated JSON): the SDK
            # raises JSONDecodeError / APIResponseValidationError, which must not escape as non-LLMError.
            raise LLMTransientError(f"{self.name}: malformed response from {self._client.base_url}: {exc}") from exc
        choices = getattr(resp, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            raise LLMTransientError(f"{self.name}: response had no choices")
        text = choices[0].message.content or ""
        usage = resp.usage
        return ChatResult(
            text,
            resp.model or model,
            self.name,
            getattr(usage, "prompt_tokens", 0) or 0,
            getattr(usage, "completion_tokens", 0) or 0,
        )

    async def aclose(self) -> None:
        await self._client.close()


class DashScopeBackend(ChatBackend):
    """Alibaba DashScope through its own SDK (default model qwen-max)."""

    name = "dashscope"

    def __init__(self, api_key: str | None, base_url: str | None = None) -> None:
        if not api_key:
            raise LLMError("dashscope backend needs an API key: set DASHSCOPE_API_KEY or AGEMEM_LLM__API_KEY")
        self._api_key = api_key
        self._base_url = base_url

    async def complete(self, messages, *, model, temperature, max_tokens, seed, timeout_s) -> ChatResult:
        from dashscope import AioGeneration

        kwargs: dict[str, Any] = {
            "model": model,
            "messages": list(messages),
            "result_format": "message",
            "api_key": self._api_key,
            "temperature": temperature,
            "max_tokens": max_tokens,
            # Without this the SDK waits 300 s on an endpoint that never answers.
            "request_timeout": timeout_s,
        }
        if seed is not None:
            kwargs["seed"] = seed
        if self._base_url:
            kwargs["base_address"] = self._base_url
        try:
            resp = await AioGeneration.call(**kwargs)
        except (asyncio.TimeoutError, TimeoutError) as exc:
            raise LLMTimeoutError(f"dashscope: no answer within {timeout_s}s") from exc
        except OSError as exc:
            raise LLMTransientError(f"dashscope: connection failed: {exc}") from exc
        status = getattr(resp, "status_code", None)
        # The SDK returns error statuses (401, 429, ...) in the response rather than raising.
        if status != 200:
            message = f"dashscope: HTTP {status} {getattr(resp, 'code', '')}: {getattr(resp, 'message', '')}"
            if status is None or status == 429 or status >= 500:
                raise LLMTransientError(message)
            raise LLMError(message)
        choice = resp.output.choices[0]
        text = choice["message"]["content"] if isinstance(choice, dict) else choice.message.content
        usage = resp.usage or {}
        return ChatResult(
            text or "",
            model,
            self.name,
            int(usage.get("input_tokens", 0) or 0),
            int(usage.get("output_tokens", 0) or 0),
        )


class LLMClient:
    """Timeout, bounded retries with exponential backoff, concurrency limit and usage accounting."""

    def __init__(
        self,
        backend: ChatBackend,
        *,
        model: str,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        concurrency: int = 8,
        temperature: float = 0.7,
        max_tokens: int = 512,
        seed: int | None = None,
    ) -> None:
        self.backend = backend
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.concurrency = concurrency
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.seed = seed
        self.usage = UsageStats()
        # A semaphore belongs to one event loop; callers may run several loops over time.
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def offline(self) -> bool:
        return self.backend.offline

    @property
    def label(self) -> str:
        return f"{self.backend.name}:{self.model}"

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        sem = self._semaphores.get(loop)
        if sem is None:
            sem = self._semaphores[loop] = asyncio.Semaphore(self.concurrency)
        return sem

    async def _attempt(self, messages: Sequence[Message], temperature: float, max_tokens: int) -> ChatResult:
        async with self._semaphore():
            try:
                return await asyncio.wait_for(
                    self.backend.complete(
                        messages,
                        model=self.model,
                        temperature=temperature,
                        max_tokens=max_tokens,
                        seed=self.seed,
                        timeout_s=self.timeout_s,
                    ),
                    timeout=self.timeout_s,
                )
            except asyncio.TimeoutError as exc:
                raise LLMTimeoutError(f"{self.label}: no answer within {self.timeout_s}s") from exc

    async def chat(
        self,
        messages: Sequence[Message],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> ChatResult:
        """One chat completion. Raises :class:`LLMError` once retries are exhausted."""
        temp = self.temperature if temperature is None else temperature
        limit = self.max_tokens if max_tokens is None else max_tokens
        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait_exponential(multiplier=self.backoff_s, max=max(self.backoff_s * 8, 0.001)),
            retry=retry_if_exception_type(LLMTransientError),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    if attempts > 1:
                        self.usage.retries += 1
                        logger.warning("%s: retry %d/%d", self.label, attempts - 1, self.max_retries)
                    result = await self._attempt(messages, temp, limit)
        except LLMError:
            self.usage.failures += 1
            raise
        self.usage.calls += 1
        self.usage.prompt_tokens += result.prompt_tokens
        self.usage.completion_tokens += result.completion_tokens
        return result

    async def complete_text(self, prompt: str, **kwargs: Any) -> str:
        """Convenience: one user message in, reply text out."""
        return (await self.chat([{"role": "user", "content": prompt}], **kwargs)).text

    async def aclose(self) -> None:
        await self.backend.aclose()


def build_backend(section: "LLMSettings", api_key: str | None) -> ChatBackend:
    if section.backend == "offline":
        return OfflineBackend()
    if section.backend == "openai":
        if not section.base_url:
            raise LLMError("openai backend needs base_url (e.g. AGEMEM_LLM__BASE_URL=http://127.0.0.1:8000/v1)")
        return OpenAICompatibleBackend(section.base_url, api_key)
    if section.backend == "dashscope":
        return DashScopeBackend(api_key, section.base_url)
    raise LLMError(f"unknown LLM backend {section.backend!r}")


def build_llm_client(settings: "Settings", section: str = "llm") -> LLMClient:
    """The client for ``settings.llm`` or ``settings.judge``."""
    cfg: LLMSettings = getattr(settings, section)
    backend = build_backend(cfg, settings.secret_for(cfg))
    return LLMClient(
        backend,
        model=cfg.model,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
        backoff_s=cfg.backoff_s,
        concurrency=cfg.concurrency,
        temperature=cfg.temperature,
        max_tokens=cfg.max_tokens,
        seed=cfg.seed,
    )
