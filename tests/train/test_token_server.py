"""The local token server: continuous batching with KV-prefix reuse on the tiny random Qwen2 (CPU).

Every generation here is checked against a plain one-sequence forward pass of the same tokens:
reusing a stale or wrong prefix, a padding or position mistake in the batch, or tempered
log-probs all show up as a log-prob mismatch.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from agemem.settings import Settings, load_settings
from agemem.train.kv_cache import PrefixKVCache
from agemem.train.token_server import LocalTokenServer

ATOL = 1e-4  # float32; batched/cached attention sums in another order than one plain forward


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any, Settings]:
    from agemem.train.models import build_tiny_qwen2, load_tokenizer

    settings = load_settings("smoke", {"train": {"tiny_hidden_size": 64, "tiny_num_layers": 2}})
    tokenizer = load_tokenizer(settings)
    return build_tiny_qwen2(settings, tokenizer).eval(), tokenizer, settings


def plain_log_probs(model: Any, prompt: list[int], new: list[int]) -> list[float]:
    with torch.no_grad():
        # Logits of the positions that predict ``new`` only (the vocabulary is 151k wide).
        logits = model(input_ids=torch.tensor([prompt + new]), logits_to_keep=len(new) + 1).logits[0, :-1].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return [float(log_probs[i, t]) for i, t in enumerate(new)]


def assert_matches_plain(model: Any, prompt: list[int], out: Any) -> None:
    assert len(out.log_probs) == len(out.token_ids) > 0
    np.testing.assert_allclose(out.log_probs, plain_log_probs(model, prompt, out.token_ids), atol=ATOL)


def random_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def test_batched_cached_log_probs_equal_a_plain_forward(tiny) -> None:
    model, tokenizer, _ = tiny
    server = LocalTokenServer(model, tokenizer, device="cpu")
    # Very different lengths in one batch (left padding from 3 to 700 tokens), own parameters each.
    prompts = [random_prompt(n, seed) for seed, n in enumerate((3, 700, 41, 260))]
    params = [{"temperature": 0.7, "max_tokens": 30}, {"temperature": 1.0, "top_p": 0.9, "max_tokens": 12},
              {"temperature": 0.0, "max_tokens": 20}, {"temperature": 1.3, "top_k": 50, "max_tokens": 25}]
    outs = await asyncio.gather(*(server.generate(f"r{i}", prompt_ids=p, sampling_params=s)
                                  for i, (p, s) in enumerate(zip(prompts, params))))
    assert [len(o.token_ids) for o in outs] == [30, 12, 20, 25]
    assert all(o.stop_reason == "length" for o in outs)
    for prompt, out in zip(prompts, outs):
        assert_matches_plain(model, prompt, out)  # raw log-probs, whatever the temperature
    assert server.stats.decode_steps < sum(len(o.token_ids) for o in outs)  # rows were decoded together
    assert server.stats.mean_batch > 1.5

    # Next turn of the 700-token trajectory: prompt + response + injected tokens reuse its K/V.
    before = server.stats.cached_prompt_tokens
    turn2 = prompts[1] + outs[1].token_ids + random_prompt(30, 9)
    out2 = await server.generate("r1-turn2", prompt_ids=turn2, sampling_params={"temperature": 0.9, "max_tokens": 10})
    assert server.stats.cached_prompt_tokens - before == 700 + 12 - 1  # all but the last sampled token
    assert_matches_plain(model, turn2, out2)


async def test_greedy_equals_transformers_generate(tiny) -> None:
    model, tokenizer, _ = tiny
    server = LocalTokenServer(model, tokenizer, device="cpu")
    prompts = [random_prompt(n, 10 + n) for n in (17, 120)]
    outs = await asyncio.gather(*(server.generate(str(i), prompt_ids=p, sampling_params={"temperature": 0, "max_tokens": 16})
                                  for i, p in enumerate(prompts)))
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert out.token_ids == ref[0, len(prompt):].tolist()


async def test_grpo_siblings_share_the_prompt_and_a_rewritten_context_misses(tiny) -> None:
    from agemem.agent.context import ChatTokenizer

    model, tokenizer, _ = tiny
    chat = ChatTokenizer(tokenizer)
    server = LocalTokenServer(model, tokenizer, device="cpu")
    system = {"role": "system", "content": "You manage your own memory. " * 40}
    stage1 = [system, {"role": "user", "content": "Fact one: the bridge opened in 1932. " * 10}]
    prompt = chat.prompt_ids(stage1)
    siblings = await asyncio.gather(*(server.generate(f"s{k}", prompt_ids=prompt,
                                                      sampling_params={"temperature": 1.0, "max_tokens": 8})
                                      for k in range(3)))
    # The first sibling prefills the prompt; the other two reuse all of it but the last token.
    assert server.stats.cached_prompt_tokens == 2 * (len(prompt) - 1)
    for out in siblings:
        assert_matches_plain(model, prompt, out)

    # Summary_context rewrites the user turn: the new segment's prompt shares only the system part.
    rewritten = chat.prompt_ids([system, {"role": "user", "content": "Summary: a bridge, 1932."}])
    shared = int(np.flatnonzero(np.array(prompt[: len(rewritten)]) != np.array(rewritten[: len(prompt)]))[0])
    before = server.stats.cached_prompt_tokens
    out = await server.generate("rewrite", prompt_ids=rewritten, sampling_params={"temperature": 1.0, "max_tokens": 8})
    assert server.stats.cached_prompt_tokens - before == shared < len(rewritten) - 1
    assert_matches_plain(model, rewritten, out)


@pytest.mark.parametrize("explicit", [True, False], ids=["invalidate", "detected"])
async def test_no_stale_prefix_after_an_optimizer_step(tiny, explicit: bool) -> None:
    import copy

    model = copy.deepcopy(tiny[0])
    server = LocalTokenServer(model, tiny[1], device="cpu")
    prompt = random_prompt(200, 3)
    await server.generate("a", prompt_ids=prompt, sampling_params={"temperature": 1.0, "max_tokens": 6})
    assert server.cached_tokens > 0

    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    model.train()
    loss = model(input_ids=torch.tensor([prompt[:50]]), labels=torch.tensor([prompt[:50]])).loss
    loss.backward()
    optimizer.step()
    if explicit:
        server.invalidate()
        assert server.cached_tokens == 0
    before = server.stats.cached_prompt_tokens
    out = await server.generate("b", prompt_ids=prompt, sampling_params={"temperature": 1.0, "max_tokens": 6})
    assert server.stats.cached_prompt_tokens == before  # nothing reused across the weight change
    assert model.training is False  # generation ran in eval mode
    assert_matches_plain(model, prompt, out)


async def test_a_request_cancelled_mid_batch_leaves_the_others_intact(tiny) -> None:
    model, tokenizer, _ = tiny
    server = LocalTokenServer(model, tokenizer, device="cpu")
    prompts = [random_prompt(n, 20 + n) for n in (50, 90, 130)]
    tasks = [asyncio.create_task(server.generate(f"c{i}", prompt_ids=p,
                                                 sampling_params={"temperature": 1.0, "max_tokens": 150}))
             for i, p in enumerate(prompts)]
    while server.stats.decode_steps < 5:
        await asyncio.sleep(0.005)
    tasks[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    for i in (0, 2):
        out = await tasks[i]
        assert len(out.token_ids) == 150
        assert_matches_plain(model, prompts[i], out)
    assert server.stats.cancelled == 1
    out = await server.generate("after", prompt_ids=prompts[1], sampling_params={"temperature": 0, "max_tokens": 4})
    assert_matches_plain(model, prompts[1], out)


async def test_stop_strings_and_stop_tokens_inside_a_batch(tiny) -> None:
    model, tokenizer, _ = tiny
    server = LocalTokenServer(model, tokenizer, device="cpu")
    prompt = random_prompt(60, 5)
    free = await server.generate("free", prompt_ids=prompt, sampling_params={"temperature": 1.0, "seed": 7,
                                                                           "max_tokens": 40})
    # A plain-ASCII word the model sampled after its first few tokens is the stop string.
    stop = next(text for tok in free.token_ids[10:] if (text := tokenizer.decode([tok])).strip().isalpha()
                and text.isascii() and len(text.strip()) >= 3)
    cut = next(j for j in range(40) if stop in tokenizer.decode(free.token_ids[: j + 1]))
    stop_token = free.token_ids[15]
    cut_token = free.token_ids.index(stop_token)
    other = random_prompt(300, 6)
    outs = await asyncio.gather(
        server.generate("stop-string", prompt_ids=prompt,
                        sampling_params={"temperature": 1.0, "seed": 7, "max_tokens": 40, "stop": [stop]}),
        server.generate("stop-token", prompt_ids=prompt,
                        sampling_params={"temperature": 1.0, "seed": 7, "max_tokens": 40, "stop_token_ids": [stop_token]}),
        server.generate("no-stop", prompt_ids=other, sampling_params={"temperature": 1.0, "max_tokens": 40}),
    )
    assert outs[0].token_ids == free.token_ids[: cut + 1] and outs[0].stop_reason == "stop"
    assert outs[1].token_ids == free.token_ids[: cut_token + 1] and outs[1].stop_reason == "stop"
    assert len(outs[2].token_ids) == 40 and outs[2].stop_reason == "length"
    assert_matches_plain(model, other, outs[2])


async def test_bad_requests_fail_clearly_and_the_server_keeps_serving(tiny) -> None:
    model, tokenizer, _ = tiny
    server = LocalTokenServer(model, tokenizer, device="cpu")
    cases = [([], {}, "empty prompt_ids"), ([1, 2], {"top_p": 1.5}, "top_p"), ([1, 2], {"temperature": -1}, "temperature"),
             ([1, 2], {"max_tokens": "many"}, "bad sampling_params"), ([1, 10**9], {}, "token ids must lie in"),
             ([1, 2], {"stop": [""]}, "non-empty strings")]
    for prompt, params, message in cases:
        with pytest.raises(ValueError, match=message):
            await server.generate("bad", prompt_ids=prompt, sampling_params=params)
    out = await server.generate("good", prompt_ids=[1, 2, 3], sampling_params={"max_tokens": 3})
    assert len(out.token_ids) == 3


async def test_cached_tokens_stay_under_the_bound_least_recently_used_first(tiny) -> None:
    model, tokenizer, _ = tiny
    server = LocalTokenServer(model, tokenizer, device="cpu", max_cached_tokens=500)
    a, b, c = (random_prompt(200, s) for s in (31, 32, 33))
    for name, prompt in (("a", a), ("b", b)):
        await server.generate(name, prompt_ids=prompt, sampling_params={"temperature": 0, "max_tokens": 4})
    await server.generate("a2", prompt_ids=a, sampling_params={"temperature": 0, "max_tokens": 1})  # a is fresher
    await server.generate("c", prompt_ids=c, sampling_params={"temperature": 0, "max_tokens": 4})  # evicts b
    assert server.cached_tokens <= 500 and server.stats.evictions >= 1
    for name, prompt, reused in (("a3", a, True), ("b2", b, False)):
        before = server.stats.cached_prompt_tokens
        await server.generate(name, prompt_ids=prompt, sampling_params={"temperature": 0, "max_tokens": 1})
        assert (server.stats.cached_prompt_tokens > before) is reused


def test_prefix_store_keeps_the_longest_sequence_and_respects_its_bound() -> None:
    def kv(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.full((1, 2, n, 4), float(n)), torch.full((1, 2, n, 4), -float(n)))]

    store = PrefixKVCache(max_tokens=30)
    store.insert(np.arange(10), kv(10))
    store.insert(np.arange(15), kv(15))  # extends the first: replaces it
    assert len(store) == 1 and store.tokens == 15
    store.insert(np.arange(12), kv(12))  # already inside the stored 15
    assert len(store) == 1
    hit, prefix = store.lookup(np.array([0, 1, 2, 3, 99]), limit=10)
    assert hit == 4 and prefix is not None and prefix[0][0].shape[-2] == 4 and float(prefix[0][0].max()) == 15.0
    assert store.lookup(np.arange(15), limit=14)[0] == 14
    store.insert(np.arange(100, 120), kv(20))  # 35 > 30 tokens: the least recently used goes
    assert store.tokens == 20 and store.evictions == 1 and store.lookup(np.arange(5), limit=5)[0] == 0
    store.insert(np.arange(200, 240), kv(40))  # longer than the bound: not stored
    assert store.tokens == 20
    with pytest.raises(ValueError):
        PrefixKVCache(-1)


def test_running_batch_pads_grows_and_repacks_rows_exactly() -> None:
    from agemem.train.kv_cache import RunningBatch, kv_of

    def seq(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        return [(torch.randn(1, 2, n, 3, generator=g), torch.randn(1, 2, n, 3, generator=g)) for _ in range(2)]

    batch = RunningBatch(reserve=2)  # forces the buffers to grow during the steps below
    expected = [seq(5, 1), seq(9, 2)]
    for kv in expected:
        batch.add(kv)
    for step in range(5):
        if step == 2:
            expected.append(seq(4, 3))
            batch.add(expected[-1])
        mask, positions = batch.step_inputs("cpu")
        assert positions[:, 0].tolist() == batch.lengths
        assert mask.sum(dim=1).tolist() == [n + 1 for n in batch.lengths] and mask.shape[1] == batch.width + 1
        new = [seq(1, 10 + step * 3 + r) for r in range(len(expected))]
        for layer, cache_layer in enumerate(batch.cache.layers):  # what a forward pass does
            cache_layer.update(torch.cat([n[layer][0] for n in new]), torch.cat([n[layer][1] for n in new]))
        batch.advance()
        expected = [[(torch.cat([e[l][0], n[l][0]], 2), torch.cat([e[l][1], n[l][1]], 2)) for l in range(2)]
                    for e, n in zip(expected, new)]
    for row, exp in enumerate(expected):
        got = batch.row(row)
        for (gk, gv), (ek, ev) in zip(got, exp):
            assert torch.equal(gk, ek) and torch.equal(gv, ev)
    batch.remove([1])  # the longest row leaves: the padding it needed is cut off
    assert batch.lengths == [10, 7] and kv_of(batch.cache)[0][0].shape[2] == 10
    assert torch.equal(batch.row(1)[1][1], expected[2][1][1])


def test_trainer_invalidates_after_its_optimizer_step_and_logs_cache_metrics(
    tiny_train_settings: Settings, episodes_file: Path
) -> None:
    from agemem.train.local import LocalTrainer, load_train_episodes

    one = tiny_train_settings.model_copy(update={"train": tiny_train_settings.train.model_copy(update={"total_steps": 1})})
    trainer = LocalTrainer(one, load_train_episodes(episodes_file))
    seen: list[int] = []
    update = trainer.update

    def watched_update(rollouts: Any) -> dict[str, float]:
        seen.append(trainer.server.cached_tokens)  # what the rollouts left in the cache
        return update(rollouts)

    trainer.update = watched_update  # type: ignore[method-assign]
    result = asyncio.run(trainer.run())
    assert seen and seen[0] > 0 and trainer.server.cached_tokens == 0
    metrics = result.history[0]
    assert metrics["server/cache_hit_rate"] > 0  # GRPO siblings share their stage-1 prompt
    assert metrics["server/cached_tokens"] > 0


def test_smollm2_gguf_batched_cached_log_probs(shared_dir: Path) -> None:
    from agemem.train.models import load_policy_model, load_tokenizer

    gguf = shared_dir / "models/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} is not in the shared folder")
    settings = load_settings("smoke", {"train": {"model": str(gguf)}})
    tokenizer = load_tokenizer(settings)
    model = load_policy_model(settings, tokenizer, device="cpu").eval()
    server = LocalTokenServer(model, tokenizer, device="cpu")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)

    async def run() -> list[Any]:
        return list(await asyncio.gather(*(server.generate(f"g{k}", prompt_ids=prompt,
                                                           sampling_params={"temperature": 0.6, "max_tokens": 12})
                                           for k in range(2))))

    outs = asyncio.run(run())
    assert server.stats.cache_hits == 1
    for out in outs:
        assert_matches_plain(model, prompt, out)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.5, 3, 1.0), (2.0, -1, 0.8)])
def test_sampler_draws_from_the_warped_distribution(temperature: float, top_k: int, top_p: float) -> None:
    from agemem.train.sampling import SamplingParams, select_tokens

    logits = torch.tensor([2.0, 1.5, 0.0, -1.0, 1.0, -3.0])
    warped = logits / temperature
    order = torch.argsort(warped, descending=True)
    keep = torch.zeros_like(warped, dtype=torch.bool)
    mass = 0.0
    probs_all = torch.softmax(warped, -1)
    for rank, tok in enumerate(order.tolist()):  # top-k, then the smallest set with mass >= top_p
        if (top_k > 0 and rank >= top_k) or mass >= top_p:
            break
        keep[tok] = True
        mass += float(probs_all[tok])
    expected = torch.where(keep, probs_all, 0.0)
    expected /= expected.sum()
    n = 40000
    params = SamplingParams(max_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens, log_probs = select_tokens(logits.repeat(n, 1), [params] * n, [None] * n)
    counts = torch.bincount(torch.tensor(tokens), minlength=len(logits)).double() / n
    assert torch.all(counts[~keep] == 0)
    np.testing.assert_allclose(counts.numpy(), expected.numpy(), atol=0.012)
    raw = torch.log_softmax(logits, -1)  # reported log-probs are untempered, unfiltered
    np.testing.assert_allclose(log_probs[:50], raw[torch.tensor(tokens[:50])].numpy(), atol=1e-6)


async def test_eos_stops_a_turn_unless_ignore_eos(tiny) -> None:
    import copy

    model, tokenizer, _ = tiny
    prompt = random_prompt(30, 41)
    first = (await LocalTokenServer(model, tokenizer, device="cpu").generate(
        "probe", prompt_ids=prompt, sampling_params={"temperature": 0, "max_tokens": 1})).token_ids[0]
    eos_here = copy.deepcopy(tokenizer)
    eos_here.eos_token = tokenizer.convert_ids_to_tokens(first)  # the greedy first token is now eos
    server = LocalTokenServer(model, eos_here, device="cpu")
    stopped, ignored = await asyncio.gather(
        server.generate("eos", prompt_ids=prompt, sampling_params={"temperature": 0, "max_tokens": 6}),
        server.generate("ignore", prompt_ids=prompt, sampling_params={"temperature": 0, "max_tokens": 6,
                                                                      "ignore_eos": True}))
    assert stopped.token_ids == [first] and stopped.stop_reason == "stop"
    assert len(ignored.token_ids) == 6 and ignored.token_ids[0] == first and ignored.stop_reason == "length"
