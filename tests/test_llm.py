"""LLMClient against a real HTTP server speaking OpenAI chat-completions (tests/fake_openai.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from agemem.llm import LLMError, LLMTimeoutError, LLMTransientError, build_llm_client
from agemem.settings import load_settings
from tests.fake_openai import FakeOpenAI, Reply

MSG = [{"role": "user", "content": "hello there"}]


def client_for(server: FakeOpenAI, **llm):
    return build_llm_client(load_settings("smoke", {"llm": server.llm_overrides(**llm)}), "llm")


async def test_success_sends_settings_and_counts_usage(fake_openai: FakeOpenAI) -> None:
    fake_openai.reply = lambda req: "a reply with five words"
    client = client_for(fake_openai, temperature=0.3, max_tokens=77, seed=5)
    result = await client.chat(MSG)
    await client.aclose()
    assert result.text == "a reply with five words" and result.backend == "openai" and not result.offline
    body = fake_openai.requests[0]
    assert body["model"] == "fake-model" and body["temperature"] == 0.3
    assert body["max_tokens"] == 77 and body["seed"] == 5 and body["messages"] == MSG
    assert client.usage.calls == 1 and client.usage.completion_tokens == 5 and client.usage.retries == 0


async def test_timeout_is_bounded_and_retried_configured_times(fake_openai: FakeOpenAI) -> None:
    fake_openai.delay_s = 3.0
    client = client_for(fake_openai, timeout_s=0.3, max_retries=2, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(LLMTimeoutError):
        await client.chat(MSG)
    elapsed = time.monotonic() - start
    await client.aclose()
    assert fake_openai.count == 3  # first attempt + 2 retries
    assert elapsed < 2.5  # 3 x 0.3 s plus backoff, far below the server's 3 s delay
    assert client.usage.failures == 1 and client.usage.retries == 2


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_transient_status_retried_then_success(fake_openai: FakeOpenAI, status: int) -> None:
    fake_openai.fail_first, fake_openai.fail_status = 2, status
    client = client_for(fake_openai, max_retries=3)
    result = await client.chat(MSG)
    await client.aclose()
    assert result.text == "echo: hello there"
    assert fake_openai.count == 3 and client.usage.retries == 2


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_client_errors_not_retried(fake_openai: FakeOpenAI, status: int) -> None:
    fake_openai.fail_first, fake_openai.fail_status = 10, status
    client = client_for(fake_openai, max_retries=3)
    with pytest.raises(LLMError) as info:
        await client.chat(MSG)
    await client.aclose()
    assert not isinstance(info.value, LLMTransientError)
    assert str(status) in str(info.value)
    assert fake_openai.count == 1


async def test_retries_exhausted_raises_transient(fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_first = 100
    client = client_for(fake_openai, max_retries=1)
    with pytest.raises(LLMTransientError):
        await client.chat(MSG)
    await client.aclose()
    assert fake_openai.count == 2


async def test_garbage_body_is_an_llm_error_not_a_json_crash(fake_openai: FakeOpenAI) -> None:
    # Regression: a 200 with a non-JSON body used to escape as json.JSONDecodeError.
    fake_openai.garbage = True
    client = client_for(fake_openai, max_retries=1)
    with pytest.raises(LLMTransientError, match="malformed"):
        await client.chat(MSG)
    await client.aclose()
    assert fake_openai.count == 2


async def test_response_without_choices_is_transient(fake_openai: FakeOpenAI) -> None:
    fake_openai.reply = lambda req: Reply(body=b'{"id": "x", "object": "chat.completion", "choices": []}')
    client = client_for(fake_openai, max_retries=0)
    with pytest.raises(LLMTransientError):
        await client.chat(MSG)
    await client.aclose()


async def test_concurrency_limit_holds(fake_openai: FakeOpenAI) -> None:
    fake_openai.delay_s = 0.2
    client = client_for(fake_openai, concurrency=2)
    results = await asyncio.gather(*(client.chat([{"role": "user", "content": f"m{i}"}]) for i in range(6)))
    await client.aclose()
    assert [r.text for r in results] == [f"echo: m{i}" for i in range(6)]
    assert fake_openai.max_in_flight == 2


async def test_connection_refused_is_transient() -> None:
    server = FakeOpenAI().start()
    url = server.base_url
    server.stop()
    settings = load_settings("smoke", {"llm": {"backend": "openai", "base_url": url, "max_retries": 1, "backoff_s": 0}})
    client = build_llm_client(settings)
    with pytest.raises(LLMTransientError):
        await client.chat(MSG)
    await client.aclose()


async def test_offline_backend_is_deterministic() -> None:
    client = build_llm_client(load_settings("smoke"), "llm")
    a, b = await client.chat(MSG), await client.chat(MSG)
    assert client.offline and a.offline and a.text == b.text and a.text.startswith("[offline]")


def test_misconfigured_backends_fail_clearly() -> None:
    with pytest.raises(ValueError, match="base_url"):  # refused when the settings load, before any client
        build_llm_client(load_settings("smoke", {"llm": {"backend": "openai"}}))
    with pytest.raises(LLMError, match="API key"):
        build_llm_client(load_settings("smoke", {"llm": {"backend": "dashscope"}}))
