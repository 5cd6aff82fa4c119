"""StagedMemoryAgentLoop on CPU, in the style of verl's ``*_on_cpu.py`` tests.

A scripted server manager (verl's ``generate`` signature, replaying text encoded with the real
tokenizer) stands in for the GPU inference server; everything else is real: verl's composed
config and AgentLoopBase, the tool server over loopback with milvus-lite, verl's reward loop
worker loading our ``compute_score`` from the configured file.
"""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agemem.agent.context import ChatTokenizer
from agemem.agent.scripted import ScriptedTokenPolicy
from agemem.train.verl.loop import StagedMemoryAgentLoop, release_worker_resources
from agemem.assets import TOKENIZER_DIR
from agemem.train.verl.rows import read_verl_parquet, write_verl_parquet
from agemem.data.records import EpisodeScript
from agemem.settings import load_settings
from agemem.train.verl import config as verl_config
from agemem.train.verl.launch import plan_paths
from agemem.agent.prompts import episode_system_prompt

SMOKE_SYSTEM_PROMPT = episode_system_prompt(load_settings("smoke").episode)


class RecordingServerManager(ScriptedTokenPolicy):
    """The scripted policy, remembering which token ids it produced for which request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.generated: dict[str, list[int]] = {}

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any], **kw: Any):
        out = await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params, **kw)
        self.generated.setdefault(request_id, []).extend(out.token_ids)
        return out


# The scripted agent writes whole tool calls (a stage-1 reply of five Add_memory calls is ~250
# tokens); the smoke profile's 24-token turn cap is sized for the tiny random model and would cut
# every call in half, so the run is configured the way a user would: an override on the driver.
LOOP_OVERRIDES = {"episode": {"max_turn_tokens": 1024}}


def compose_for(runs_dir: Path, server_url: str | None = None) -> Any:
    """verl's composed config for the smoke profile plus LOOP_OVERRIDES, with the Ray runtime env."""
    settings = load_settings("smoke", {"runs_dir": str(runs_dir), **LOOP_OVERRIDES})
    overrides = verl_config.build_overrides(settings, plan_paths(settings), model_path=str(TOKENIZER_DIR))
    env = verl_config.ray_runtime_env(settings, memory_server_url=server_url, mlflow_run_id=None)
    return verl_config.compose(overrides + verl_config.runtime_env_overrides(env))


@pytest.fixture
def verl_cfg(runs_dir: Path) -> Any:
    return compose_for(runs_dir)


def make_loop(cfg: Any, tokenizer: Any, server_manager: Any) -> StagedMemoryAgentLoop:
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    return StagedMemoryAgentLoop(
        trainer_config=DictConfigWrap(cfg), server_manager=server_manager, tokenizer=tokenizer, processor=None,
        dataset_cls=RLHFDataset, data_config=DictConfigWrap(cfg.data), tools=None,
    )


async def test_siblings_run_three_stages_with_own_sessions_masks_and_reward(
    runs_dir: Path, train_tool_server: Any, train_scripts: list[EpisodeScript], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl import DataProto
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    verl_cfg = compose_for(runs_dir, train_tool_server.url)
    # A Ray worker's environment is exactly the composed runtime env (verl passes it to ray.init);
    # the loop rebuilds its settings from it, so driver overrides must travel in it.
    worker_env = OmegaConf.to_container(verl_cfg.ray_kwargs.ray_init.runtime_env.env_vars)
    assert worker_env["AGEMEM_EPISODE__MAX_TURN_TOKENS"] == "1024"
    for key, value in worker_env.items():
        monkeypatch.setenv(key, str(value))
    service = train_tool_server.service
    created: list[str] = []
    real_create = service.create_session

    async def recording_create_session():  # the real call, remembered (the server looks it up per request)
        session = await real_create()
        created.append(session.session_id)
        return session

    monkeypatch.setattr(service, "create_session", recording_create_session)
    script = train_scripts[0]
    row = read_verl_parquet(write_verl_parquet([script], tmp_path / "t.parquet", system_prompt=SMOKE_SYSTEM_PROMPT))[0]
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    manager = RecordingServerManager(ChatTokenizer(tokenizer), script)
    # GRPO siblings: same uid, index, tools_kwargs and the very same extra_info object.
    shared = {"raw_prompt": row["prompt"], "extra_info": row["extra_info"], "reward_model": row["reward_model"],
              "data_source": row["data_source"], "index": 0, "uid": "uid-0", "tools_kwargs": {}}
    extra_before = dict(row["extra_info"])
    sampling = {"temperature": 0.6, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
    try:
        results = await asyncio.gather(*[
            make_loop(verl_cfg, tokenizer, manager).run(sampling, **shared) for _ in range(2)
        ])
    finally:
        await release_worker_resources()

    assert row["extra_info"] == extra_before  # the shared object was not mutated
    ids = [outs[-1].extra_fields["trajectory_id"] for outs in results]
    assert len(set(ids)) == 2 and set(manager.generated) == set(ids)  # one trajectory id = one request id each
    for outs in results:
        assert isinstance(outs, list) and outs
        stats = outs[-1].extra_fields
        assert stats["stage_end"].keys() >= {"1", "2", "3"}  # all three stages ran
        assert stats["tool_ok_counts"].get("Add_memory", 0) > 0 and stats["retrieved_any"]
        # each sibling saw only its own memories: its adds, not the sibling's too
        assert len(stats["memories_final"]) == stats["memory_adds_ok"]
        model_tokens: list[int] = []
        for out in outs:
            assert len(out.response_ids) == len(out.response_mask)
            assert set(out.response_mask) <= {0, 1} and 1 in out.response_mask
            model_tokens += [t for t, m in zip(out.response_ids, out.response_mask) if m == 1]
            injected = tokenizer.decode([t for t, m in zip(out.response_ids, out.response_mask) if m == 0])
            assert "<tool_call>" not in injected  # model text never sits under mask 0
        # mask 1 exactly on the tokens the model generated, in order
        assert model_tokens == manager.generated[stats["trajectory_id"]]
    # one memory session per sibling rollout, each deleted afterwards with its memories
    assert len(created) == 2 and len(set(created)) == 2
    assert all(service.store.session_token_hash(sid) is None for sid in created)
    assert service.store.count() == 0

    # Reward: verl's own reward loop worker loads compute_score from reward.custom_reward_function.path,
    # and the DataProto is built by verl's AgentLoopWorker._compute_score from our outputs.
    verl_cfg.actor_rollout_ref.model.tokenizer_path = str(TOKENIZER_DIR)
    reward_worker = RewardLoopWorker(verl_cfg)
    assert type(reward_worker.reward_manager).__name__ == "NaiveRewardManager"  # verl's default manager

    class InlineHandle:  # Ray's actor-method call shape, run in this process (no Ray cluster in unit tests)
        class compute_score:  # noqa: N801
            @staticmethod
            def remote(data: DataProto):
                # Ray pickles the argument; so do we (the manager mutates extra_info in place).
                return reward_worker.compute_score(pickle.loads(pickle.dumps(data)))

    worker = AgentLoopWorker.__new__(AgentLoopWorker)
    worker.reward_loop_worker_handles = [InlineHandle]
    worker.processor = None
    worker.mm_processor_kwargs = {}
    rewards = []
    for outs in results:
        await worker._compute_score(outs, kwargs={**shared, "agent_name": "staged_memory_agent"})
        info = outs[-1].extra_fields["reward_extra_info"]
        assert info["stats_missing"] == 0.0  # extra_fields reached compute_score as extra_info
        assert info["answered"] == 1.0
        assert outs[-1].reward_score == pytest.approx(info["score"])
        rewards.append(outs[-1].reward_score)
    assert all(np.isfinite(rewards))


def test_outputs_truncate_to_verl_lengths(verl_cfg: Any) -> None:
    from transformers import AutoTokenizer

    from agemem.agent.episode import EpisodeResult, Segment
    from agemem.agent.stats import EpisodeStats

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    loop = make_loop(verl_cfg, tokenizer, server_manager=None)
    loop.response_length = 4
    seg = Segment(prompt_ids=[1, 2, 3], response_ids=[4, 5, 6, 7, 8, 9], response_mask=[1, 1, 0, 0, 1, 1],
                  response_logprobs=[-0.1, -0.2, 0.0, 0.0, -0.3, -0.4])
    empty = Segment(prompt_ids=[1], response_ids=[5], response_mask=[0], response_logprobs=[0.0])
    result = EpisodeResult("e", [seg, empty], EpisodeStats(), [])
    outs = loop.outputs(result, "traj")
    assert len(outs) == 1  # a segment without model tokens is not a training row
    assert outs[0].response_ids == [4, 5, 6, 7] and outs[0].response_mask == [1, 1, 0, 0]
    assert outs[0].response_logprobs == [-0.1, -0.2, 0.0, 0.0]
