"""Our agent loop through verl 0.9.1's own V1 post-processing, on CPU.

Real: Ray (local, 2 CPUs) and TransferQueue, verl's ``AgentLoopWorkerTQ`` (its ``__init__`` reads our
agent-loop YAML from the composed config, ``_run_prompt`` instantiates the loop with Hydra and puts
every segment into TransferQueue with its tags), verl's reward loop worker loading our
``compute_score``, the replay buffer verl builds from ``trainer.v1.sampler.custom_sampler`` (ours),
``PPOTrainer._compute_advantage`` (``compute_advantage_for_multi_trajectories``) and
``PPOTrainer._compute_metrics`` (the tag code that casts ``min/max_global_steps`` to int), verl's
``Tracking`` logging to a real MLflow store. Fake only what needs a GPU: the server manager speaks
verl's ``TokenOutput`` (with ``extra_fields``) from a scripted policy, and the old/ref log-prob pass
of the FSDP worker is the rollout's log-probs copied.
"""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import torch

ray = pytest.importorskip("ray")
tq = pytest.importorskip("transfer_queue")

from agemem.agent.context import ChatTokenizer  # noqa: E402
from agemem.agent.scripted import ScriptedTokenPolicy, default_responses  # noqa: E402
from agemem.settings import load_settings  # noqa: E402
from agemem.train.models import materialise_tiny_model  # noqa: E402
from agemem.train.verl import config as verl_config  # noqa: E402
from agemem.train.verl.launch import plan_paths  # noqa: E402
from agemem.train.verl.loop import release_worker_resources  # noqa: E402
from agemem.train.verl.rows import read_verl_parquet, write_verl_parquet  # noqa: E402
from agemem.agent.prompts import episode_system_prompt  # noqa: E402

GLOBAL_STEP = 5
ROLLOUT_METRICS = ("reward/mean", "reward/std", "reward/task", "reward/r_storage", "reward/r_relevance",
                   "tools/Add_memory", "tools/Retrieve_memory", "episode/parse_failure_rate",
                   "episode/answered_rate", "episode/response_tokens", "rollout/truncated_segments",
                   "rollout/segments_per_trajectory", "rollout/single_trajectory_groups")


class TokenOutputServer:
    """verl's server-manager shape: ``generate`` returns a verl ``TokenOutput`` with ``extra_fields``.

    Trajectories alternate between the sensible scripted agent and one that answers "I do not know",
    so GRPO groups have different rewards. The weights version moves from 3 to 4 after the first
    half of each trajectory's calls, as a weight sync during a long rollout would.
    """

    def __init__(self, tokenizer: ChatTokenizer, scripts: list[Any]) -> None:
        self.policies: dict[str, list[ScriptedTokenPolicy]] = {}
        for script in scripts:
            bad = default_responses(script)
            bad[(3, 0)] = [bad[(3, 0)][0], "<think>No idea.</think>\n<answer>I do not know</answer>"]
            self.policies[script.episode_id] = [ScriptedTokenPolicy(tokenizer, script),
                                                ScriptedTokenPolicy(tokenizer, script, bad)]
        self.assigned: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any], **kw: Any):
        from verl.workers.rollout.replica import TokenOutput

        episode = next(e for e in self.policies if request_id.startswith(f"{e}-"))  # the loop's trajectory id
        which = self.assigned.setdefault(request_id, sum(r.startswith(f"{episode}-") for r in self.assigned) % 2)
        policy = self.policies[episode][which]
        out = await policy.generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)
        n = self.calls[request_id] = self.calls.get(request_id, 0) + 1
        step = 3 if n <= 2 else 4
        return TokenOutput(token_ids=out.token_ids, log_probs=[-0.5] * len(out.token_ids), stop_reason="completed",
                           extra_fields={"global_steps": step, "min_global_steps": step, "max_global_steps": step})


@pytest.fixture(scope="module")
def transfer_queue_on_ray() -> Iterator[None]:
    from omegaconf import OmegaConf

    ray.init(num_cpus=2, include_dashboard=False, namespace="agemem-v1-test", log_to_driver=False)
    tq.init(OmegaConf.create({"controller": {"polling_mode": True}, "backend": {
        "storage_backend": "SimpleStorage", "SimpleStorage": {"total_storage_size": 200, "num_data_storage_units": 1}}}))
    try:
        yield
    finally:
        tq.close()
        ray.shutdown()


def _inline(reward_worker: Any) -> Any:
    class InlineHandle:  # Ray's actor-method call shape, run in this process
        class compute_score:  # noqa: N801
            @staticmethod
            def remote(data: Any):
                return reward_worker.compute_score(pickle.loads(pickle.dumps(data)))

    return InlineHandle


def _compose(runs_dir: Path, server_url: str) -> tuple[Any, Any]:
    settings = load_settings("smoke", {"runs_dir": str(runs_dir), "episode": {"max_turn_tokens": 1024},
                                       # std-scaled advantages (the paper's GRPO), which the test recomputes by hand
                                       "train": {"tiny_hidden_size": 32, "tiny_num_layers": 1,
                                                 "norm_adv_by_std": True}})
    paths = plan_paths(settings)
    verl_config.write_agent_loop_config(paths.agent_loop_config)
    model = materialise_tiny_model(settings, runs_dir / "tiny-model")
    overrides = verl_config.build_overrides(settings, paths, model_path=str(model))
    env = verl_config.ray_runtime_env(settings, memory_server_url=server_url, mlflow_run_id=None, model_is_local=True)
    return settings, verl_config.compose(overrides + verl_config.runtime_env_overrides(env))


async def _rollout(cfg: Any, server: TokenOutputServer, rows: list[dict]) -> None:
    """verl's V1 rollout of two prompts: the trainer's prompt tags, then AgentLoopWorkerTQ._run_prompt."""
    from verl.experimental.agent_loop.agent_loop import get_trajectory_info
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ

    worker_cls = AgentLoopWorkerTQ.__ray_metadata__.modified_class
    worker = worker_cls(config=cfg, llm_client=server, teacher_client=None,
                        reward_loop_worker_handles=[_inline(RewardLoopWorker(cfg))])
    uids = [f"uid{i}" for i in range(len(rows))]
    tq.kv_batch_put(keys=uids, partition_id="train",
                    tags=[{"is_prompt": True, "status": "pending", "global_steps": GLOBAL_STEP} for _ in uids])
    trajectories = await get_trajectory_info(GLOBAL_STEP, list(range(len(rows))), False)
    sampling = {"temperature": 0.6, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
    try:
        await asyncio.gather(*[
            worker._run_prompt({"raw_prompt": row["prompt"], "extra_info": row["extra_info"],
                                "reward_model": row["reward_model"], "data_source": row["data_source"],
                                "index": i, "uid": uid, "tools_kwargs": {}, "agent_name": row["agent_name"],
                                "global_steps": GLOBAL_STEP}, sampling, trajectory=trajectory)
            for i, (uid, row, trajectory) in enumerate(zip(uids, rows, trajectories))
        ])
    finally:
        await release_worker_resources()


def _old_and_ref_log_probs(batch: Any) -> None:
    """What the FSDP worker's log-prob passes write (it needs a GPU): here the rollout's own log-probs."""
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["rollout_log_probs"])
    lp = data["rollout_log_probs"]
    tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=data.__class__(
        {"old_log_probs": lp, "ref_log_prob": lp, "entropy": lp}, batch_size=len(batch.keys)))


def _expected_advantages(keys: list[str], scores: dict[str, float]) -> dict[str, float]:
    """Per-trajectory GRPO by hand: (r - mean) / (std + eps) over each uid's trajectories, unbiased std."""
    by_uid: dict[str, list[str]] = {}
    for trajectory in scores:
        by_uid.setdefault(trajectory.rsplit("_", 1)[0], []).append(trajectory)
    adv: dict[str, float] = {}
    for members in by_uid.values():
        values = torch.tensor([scores[m] for m in members])
        mean, std = values.mean(), values.std() if len(values) > 1 else torch.tensor(1.0)
        for m, v in zip(members, values):
            adv[m] = float((v - mean) / (std + 1e-6))
    return {key: adv[key.rsplit("_", 1)[0]] for key in keys}


async def test_v1_tags_advantages_metrics_and_mlflow(
    transfer_queue_on_ray: None, runs_dir: Path, train_tool_server: Any, train_scripts: list, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from omegaconf import OmegaConf
    from verl.trainer.ppo.metric_utils import RolloutMoELoadBalanceMetricsAccumulator
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils.tracking import Tracking

    from agemem.train.verl.sampler import RolloutMetricsReplayBuffer

    settings, cfg = _compose(runs_dir, train_tool_server.url)
    for key, value in OmegaConf.to_container(cfg.ray_kwargs.ray_init.runtime_env.env_vars).items():
        monkeypatch.setenv(key, str(value))  # a Ray worker's environment is the composed runtime env
    prompt = episode_system_prompt(settings.episode)
    rows = read_verl_parquet(write_verl_parquet(train_scripts[:2], tmp_path / "t.parquet", system_prompt=prompt))
    chat = ChatTokenizer(__import__("transformers").AutoTokenizer.from_pretrained(str(runs_dir / "tiny-model")))
    await _rollout(cfg, TokenOutputServer(chat, train_scripts[:2]), rows)

    # 1. the tags AgentLoopWorkerTQ wrote: the trajectory's first min and last max version on every segment
    listed = tq.kv_list()["train"]
    segments = {k: tag for k, tag in listed.items() if not tag.get("is_prompt")}
    assert segments and all(tag["min_global_steps"] == 3 and tag["max_global_steps"] == 4 for tag in segments.values())

    # 2. the replay buffer verl builds from our config samples the step and adds our rollout metrics
    stub = SimpleNamespace(config=cfg, trainer_mode="sync", _add_prompts_to_generate=lambda n: n)
    buffer = PPOTrainer._build_replay_buffer(stub)
    assert isinstance(buffer, RolloutMetricsReplayBuffer)
    batch, metrics = buffer.sample(global_steps=GLOBAL_STEP, partition_id="train", batch_size=2)
    assert set(ROLLOUT_METRICS) <= set(metrics), sorted(set(ROLLOUT_METRICS) - set(metrics))
    assert metrics["rollout/segments_per_trajectory"] >= 2 and metrics["rollout/truncated_segments"] == 0
    assert metrics["rollout/trajectories"] == len(rows) * settings.train.rollouts_per_prompt
    assert metrics["rollout/single_trajectory_groups"] == 0

    # 3. verl's advantage step: every segment gets its trajectory's GRPO advantage
    _old_and_ref_log_probs(batch)
    PPOTrainer._compute_advantage(stub, batch, {})
    data = tq.kv_batch_get(keys=batch.keys, partition_id="train", select_fields=["advantages", "rm_scores",
                                                                                 "response_mask"])
    finals: dict[str, tuple[int, float]] = {}
    for key, rm in zip(batch.keys, data["rm_scores"].unbind()):
        trajectory, index = key.rsplit("_", 1)
        if trajectory not in finals or finals[trajectory][0] < int(index):
            finals[trajectory] = (int(index), float(rm.sum()))
    expected = _expected_advantages(batch.keys, {t: s for t, (_, s) in finals.items()})
    assert len({round(v, 4) for v in expected.values()}) > 1  # siblings differ: a real comparison
    for key, adv, mask in zip(batch.keys, data["advantages"].unbind(), data["response_mask"].unbind()):
        assert torch.allclose(adv[mask.bool()], torch.full_like(adv[mask.bool()], expected[key]), atol=1e-5), key

    # 4. verl's step metrics (the int cast of the tags), then its tracking to a real MLflow store
    stub.use_critic = False
    stub._rollout_moe_lb_metrics_accumulator = RolloutMoELoadBalanceMetricsAccumulator(
        model_config=cfg.actor_rollout_ref.model)
    stub._get_n_gpus_for_throughput = lambda: 1
    timing = {"step": 1.0, "gen": 0.5, "old_log_prob": 0.1, "ref": 0.1, "adv": 0.01, "update_actor": 0.2}
    PPOTrainer._compute_metrics(stub, batch, metrics, timing, global_steps=GLOBAL_STEP, epoch=0)
    assert metrics["training/off_policy/trajectory_spans/max"] == 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    tracking = Tracking(project_name="agemem-test", experiment_name="v1", default_backend=["mlflow"], config=None)
    tracking.log(data=metrics, step=GLOBAL_STEP)
    import mlflow

    logged = mlflow.get_run(mlflow.active_run().info.run_id).data.metrics
    tracking.finish()
    assert set(ROLLOUT_METRICS) <= set(logged) and "training/global_step" in logged
