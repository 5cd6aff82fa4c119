"""One settings model for the whole project.

Precedence, highest first: explicit overrides (CLI flags, ``--set section.key=value``),
``AGEMEM_*`` environment variables (``__`` nests: ``AGEMEM_TRAIN__LR=2e-5``), a ``.env`` file,
the named profile (``smoke`` or ``paper``), then the defaults below. Nothing else in the
project reads environment variables for configuration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agemem.assets import SAMPLE_DATA, TOKENIZER_DIR

ENV_PREFIX = "AGEMEM_"

LLMBackend = Literal["offline", "dashscope", "openai"]


class DataSettings(BaseModel):
    """Where HotpotQA comes from and how episode scripts are built from it."""

    source: str = Field(
        "sample",
        description="'sample' (shipped), a hub name like 'hotpotqa/hotpot_qa', or a local file/directory.",
    )
    hub_config: Literal["distractor", "fullwiki"] = "distractor"
    split: str = Field("validation", description="Split to read from the hub or a local directory.")
    limit: int | None = Field(None, ge=1, description="Keep only the first N records.")
    output_dir: Path = Field(Path("runs/data"), description="Where episodes.jsonl and parquet land.")
    seed: int = 42
    stage1_turns: int = Field(1, ge=1, description="Casual user turns the stage-1 paragraphs are spread over.")
    sentences_per_paragraph: int = Field(10, ge=1, description="As the reference: first 10 sentences.")
    distractor_messages: int = Field(3, ge=0, description="Stage-2 distractor messages per episode.")
    distractor_backend: Literal["offline", "llm"] = Field(
        "offline", description="'llm' uses the llm section's client; 'offline' uses other records' paragraphs."
    )
    synth_concurrency: int = Field(8, ge=1)
    synth_max_attempts: int = Field(3, ge=1, description="LLM distractor generations per slot before fallback.")
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Share of records held out for evaluation.")
    cache_dir: Path | None = Field(
        None,
        description="datasets cache. None: runs/cache/datasets for local files, the HF default for the hub.",
    )
    distractors_per_call: int = Field(
        0, ge=0, description="LLM distractors asked for per call; 0 = all of an episode's open slots in one call."
    )
    distractor_min_chars: int = Field(20, ge=1, description="Shorter LLM distractors are regenerated.")
    distractor_max_chars: int = Field(400, ge=20, description="Longer LLM distractors are regenerated.")


class LLMSettings(BaseModel):
    """The auxiliary LLM (summaries, distractors); also the base for the judge."""

    backend: LLMBackend = "offline"
    model: str = "qwen-max"
    base_url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://host:8000/v1.")
    api_key: SecretStr | None = Field(None, description="DashScope or OpenAI-compatible key.")
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, description="Retries after the first attempt, on transient errors only.")
    backoff_s: float = Field(1.0, ge=0, description="First backoff; doubles per retry.")
    concurrency: int = Field(8, ge=1)
    temperature: float = Field(0.7, ge=0)
    max_tokens: int = Field(512, ge=1)
    seed: int | None = 42


class JudgeSettings(LLMSettings):
    """The answer / memory-quality judge. Offline means EM/F1 and embedding similarity."""

    temperature: float = 0.0
    max_tokens: int = 16
    cache: bool = True
    parse_retries: int = Field(2, ge=0, description="Extra judge calls when the reply is not a bare 0-1 number.")
    offline_metric: Literal["f1", "em"] = Field("f1", description="Offline/fallback answer score: token F1 or EM.")
    memory_match_threshold: float = Field(
        0.75, ge=0, le=1, description="Offline memory quality: cosine at which a memory sentence matches a fact."
    )


class MemorySettings(BaseModel):
    """Milvus store, embedder and the memory tool server."""

    uri: str = Field("runs/memory.db", description="milvus-lite path, or http://host:19530 for Milvus.")
    token: SecretStr | None = Field(None, description="Milvus auth token (standalone/cluster).")
    collection: str = "agemem_memories"
    embedding_model: str | None = Field(
        None, description="sentence-transformers model name or path; default: the bundled all-MiniLM-L6-v2."
    )
    embedding_device: str = "cpu"
    embed_batch_size: int = Field(64, ge=1, description="Most texts of concurrent requests embedded in one call.")
    embed_forward_batch_size: int = Field(
        16, ge=1, description="Texts per forward pass inside that call, grouped by length (less padding)."
    )
    embed_batch_wait_ms: float = Field(3.0, ge=0)
    embedding_threads: int = Field(
        0, ge=0, description="torch CPU threads of the tool server process; 0 = torch's default (all cores)."
    )
    embed_cache_size: int = Field(
        4096, ge=0, description="Texts whose vectors the server keeps (LRU; GRPO siblings repeat texts). 0 = off."
    )
    max_content_bytes: int = Field(8192, ge=1)
    max_body_bytes: int = Field(65536, ge=1024)
    max_top_k: int = Field(20, ge=1)
    default_top_k: int = Field(3, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    server_url: str | None = Field(None, description="Use this running tool server; None = in-process store.")
    server_token: SecretStr | None = Field(None, description="Required on POST /sessions when set.")
    request_timeout_s: float = Field(10.0, gt=0)
    client_retries: int = Field(3, ge=0)
    connect_timeout_s: float = Field(
        5.0, gt=0, description="Milvus connect timeout: an unreachable AGEMEM_MEMORY__URI fails after this."
    )
    flush_interval_s: float = Field(
        0.0,
        ge=0,
        description="0: every write is flushed before it is acknowledged (milvus-lite loses unflushed rows "
        "when its process is killed). >0: flushed at most this long later (faster, not crash-safe).",
    )
    flush_rows: int = Field(256, ge=1, description="Flush at once when this many rows are unflushed.")
    partitions: int = Field(
        64,
        ge=1,
        le=1024,
        description="Partitions sessions are hashed into when the collection is made; a session's searches read "
        "only its own (Milvus allows 1024 per collection by default).",
    )


class EpisodeSettings(BaseModel):
    """The three-stage episode: rounds, context budget, context tools, sampling."""

    tokenizer: str = Field(str(TOKENIZER_DIR), description="Tokenizer for budget counting (policy's).")
    max_context_tokens: int = Field(8192, ge=256)
    stage1_max_rounds: int = Field(5, ge=1)
    stage2_max_rounds: int = Field(5, ge=1)
    stage3_max_rounds: int = Field(5, ge=1)
    max_turn_tokens: int = Field(512, ge=1, description="Cap on one model turn (sampling max_tokens).")
    temperature: float = Field(0.6, ge=0, description="Applied to every rollout (the reference ignored it).")
    top_p: float = Field(1.0, gt=0, le=1)
    filter_threshold: float = Field(0.6, ge=0, le=1, description="Filter_context removes similarity >= this.")
    overflow_policy: Literal["truncate", "end_stage"] = "truncate"
    use_context_tools: bool = True
    enable_stage2: bool = True
    manual_retrieve_top_k: int = Field(3, ge=1, description="Auto-retrieval when context tools are off.")
    max_tool_calls_per_turn: int = Field(8, ge=1)
    reward_preset: Literal["paper", "official-code"] = "paper"
    reward_overrides: dict[str, Any] = Field(
        default_factory=dict, description="RewardConfig fields overriding the preset, e.g. {'clip_max': 2.0}."
    )
    summary_max_tokens: int = Field(256, ge=16, description="Cap on one Summary_context LLM summary.")
    max_tool_result_chars: int = Field(2000, ge=64, description="Tool results longer than this are cut.")
    coverage_threshold: float = Field(
        0.8, ge=0, le=1, description="Token recall at which a gold fact counts as present in a text (stats)."
    )


class TrainSettings(BaseModel):
    """GRPO training, for the local trainer and for verl."""

    backend: Literal["local", "verl"] = "local"
    model: str = Field(
        "tiny-random-qwen2",
        description="HF name or path, a .gguf file or a folder holding one (local trainer / eval); "
        "'tiny-random-qwen2' builds a random-weight test model.",
    )
    rollouts_per_prompt: int = Field(8, ge=1)
    tasks_per_batch: int = Field(16, ge=1)
    total_steps: int = Field(100, ge=1)
    total_epochs: int = Field(20, ge=1)
    lr: float = Field(1e-5, gt=0)
    lora_rank: int = Field(32, ge=0, description="0 = full fine-tune.")
    lora_alpha: int = Field(32, ge=1)
    lora_target_modules: str = "all-linear"
    kl_coef: float = Field(0.001, ge=0)
    kl_loss_type: str = "low_var_kl"
    clip_ratio: float = Field(0.2, gt=0)
    max_prompt_length: int = Field(8192, ge=16)
    max_response_length: int = Field(2048, ge=16)
    n_gpus_per_node: int = Field(8, ge=0)
    nnodes: int = Field(1, ge=1)
    ray_address: str | None = Field(None, description="ray job submit target; None = local Ray.")
    output_dir: Path = Path("runs/checkpoints")
    save_every: int = Field(1, ge=1)
    torch_threads: int = Field(1, ge=1, description="CPU threads (1 measured fastest on 2-core machines).")
    seed: int = 42
    extra_overrides: list[str] = Field(default_factory=list, description="Extra verl Hydra overrides.")
    device: str = Field("auto", description="Local trainer device: 'auto' (cuda if available), 'cpu', 'cuda:0'.")
    ppo_epochs: int = Field(1, ge=1, description="Optimisation passes over one batch of rollouts (local).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip (local and verl actor).")
    tiny_hidden_size: int = Field(64, ge=8, description="Hidden size of 'tiny-random-qwen2' (random weights).")
    tiny_num_layers: int = Field(2, ge=1, description="Layers of 'tiny-random-qwen2'.")
    rollout_engine: Literal["vllm", "sglang"] = Field("vllm", description="verl rollout engine (GPU only).")
    rollout_tp: int = Field(1, ge=1, description="verl rollout tensor-parallel size.")
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1, description="vLLM/SGLang KV-cache share.")
    ppo_max_token_len_per_gpu: int = Field(16384, ge=256, description="verl dynamic-batch token budget.")
    agent_workers: int = Field(8, ge=1, description="verl agent-loop workers (Ray actors).")
    max_parallel_calls: int = Field(8, ge=1, description="verl multi_turn.max_parallel_calls (default 1).")
    max_tool_response_length: int = Field(
        8192, ge=256, description="verl multi_turn.max_tool_response_length in characters (default 256)."
    )
    keep_checkpoints: int = Field(3, ge=0, description="Local trainer: newest step checkpoints kept (0 = all).")
    experiment_name: str = Field("agemem-grpo", description="verl trainer.experiment_name / local run label.")
    # Local token server (local trainer and checkpoint evaluation), see agemem/train/token_server.py.
    token_server_cache_tokens: int = Field(
        32768, ge=0, le=10_000_000,
        description="Local token server: tokens of keys/values kept for prefix reuse across turns and GRPO "
        "siblings (least recently used evicted first; 0 = no reuse). Memory per token is "
        "2 x layers x kv_heads x head_dim x dtype bytes (SmolLM2-135M fp32: 46 KB).",
    )
    token_server_max_batch: int = Field(
        16, ge=1, le=1024,
        description="Local token server: most sequences decoded together in one forward pass; further "
        "requests wait for a free row.",
    )


class EvalSettings(BaseModel):
    """Evaluation runs (also the paper's ablations)."""

    limit: int | None = Field(None, ge=1)
    policy: Literal["checkpoint", "openai", "dashscope", "scripted"] = "checkpoint"
    model: str | None = Field(None, description="Checkpoint path or endpoint model name.")
    base_url: str | None = None
    use_context_tools: bool = True
    enable_stage2: bool = True
    memory_eval_top_k: int = Field(20, ge=1)
    concurrency: int = Field(4, ge=1)
    output_dir: Path = Path("runs/eval")
    split: Literal["eval", "train", "all"] = Field(
        "eval", description="Which episodes to evaluate; 'eval' falls back to all when the file has none."
    )
    api_key: SecretStr | None = Field(None, description="Key for the openai/dashscope policy endpoint.")
    timeout_s: float = Field(120.0, gt=0, description="Per-turn timeout of an endpoint policy.")


class TrackingSettings(BaseModel):
    """MLflow tracking and registry."""

    tracking_uri: str | None = Field(None, description="None = sqlite store under runs_dir.")
    experiment: str = "agemem"
    registered_model: str = "agemem-policy"
    gate_metric: str = Field("judge_score", description="Eval aggregate the champion gate compares (J).")
    gate_min_delta: float = 0.0
    log_merged_model: bool | None = Field(
        None, description="Also log the merged HF model; None = only when the base model cannot be reloaded by name."
    )
    prefect_results_dir: Path = Field(
        Path("runs/prefect-results"), description="Persisted Prefect task results and cache records."
    )


PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        "data": {"source": "sample", "limit": 8, "distractor_messages": 2},
        "episode": {
            # System prompt (~760 tokens) + the longest shipped stage-1 message (~1,900) must fit,
            # or stage 1 overflows before the first model call; costs ~10% more smoke time.
            "max_context_tokens": 4096,
            "stage1_max_rounds": 2,
            "stage2_max_rounds": 1,
            "stage3_max_rounds": 2,
            "max_turn_tokens": 24,
        },
        "train": {
            "backend": "local",
            "model": "tiny-random-qwen2",
            "rollouts_per_prompt": 2,
            "tasks_per_batch": 2,
            "total_steps": 2,
            "lr": 1e-4,
            "lora_rank": 8,
            "lora_alpha": 16,
            "max_prompt_length": 4096,
            "max_response_length": 256,
            "n_gpus_per_node": 0,
        },
        "eval": {"limit": 4, "concurrency": 2},
    },
    "paper": {
        "data": {"source": "hotpotqa/hotpot_qa", "hub_config": "fullwiki", "split": "train", "distractor_messages": 3},
        "llm": {"backend": "dashscope", "model": "qwen-max"},
        "judge": {"backend": "dashscope", "model": "qwen-max"},
        "episode": {
            "max_context_tokens": 8192,
            "stage1_max_rounds": 5,
            "stage2_max_rounds": 5,
            "stage3_max_rounds": 5,
            "max_turn_tokens": 2048,
            "temperature": 0.6,
        },
        "train": {
            "backend": "verl",
            "model": "Qwen/Qwen2.5-7B-Instruct",
            "rollouts_per_prompt": 8,
            "tasks_per_batch": 16,
            "lr": 1e-5,
            "lora_rank": 32,
            "lora_alpha": 32,
            "kl_coef": 0.1,
            "max_prompt_length": 8192,
            "max_response_length": 2048,
            "n_gpus_per_node": 8,
            "save_every": 20,
        },
        "eval": {"policy": "checkpoint"},
    },
}


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class _ProfileSource(PydanticBaseSettingsSource):
    """Supplies the chosen profile's values below env vars and explicit overrides."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        name = self.current_state.get("profile") or "smoke"
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
        # Only fill what higher-priority sources left unset, section by section.
        return _deep_merge(PROFILES[name], {})


class Settings(BaseSettings):
    """All configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        extra="forbid",
        validate_default=True,
    )

    profile: Literal["smoke", "paper"] = "smoke"
    runs_dir: Path = Field(Path("runs"), description="Root for data, checkpoints, stores, reports.")
    dashscope_api_key: SecretStr | None = Field(
        None, validation_alias="DASHSCOPE_API_KEY", description="Used by every dashscope backend without a key."
    )
    data: DataSettings = DataSettings()
    llm: LLMSettings = LLMSettings()
    judge: JudgeSettings = JudgeSettings()
    memory: MemorySettings = MemorySettings()
    episode: EpisodeSettings = EpisodeSettings()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()
    tracking: TrackingSettings = TrackingSettings()

    @field_validator("runs_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, dotenv_settings, _ProfileSource(settings_cls), file_secret_settings

    def path(self, relative: Path | str) -> Path:
        """Resolve a settings path: relative paths live under ``runs_dir``'s parent layout."""
        p = Path(relative).expanduser()
        if p.is_absolute():
            return p
        # 'runs/x' style defaults are relative to the runs_dir's parent so AGEMEM_RUNS_DIR moves them all.
        parts = p.parts
        if parts and parts[0] == "runs":
            return self.runs_dir.joinpath(*parts[1:])
        return p.resolve()

    @property
    def memory_uri(self) -> str:
        uri = self.memory.uri
        if uri.startswith(("http://", "https://", "tcp://", "unix:")):
            return uri
        return str(self.path(uri))

    @property
    def tracking_uri(self) -> str:
        """``tracking.tracking_uri``, else MLflow's own ``MLFLOW_TRACKING_URI``, else sqlite under runs_dir."""
        return (
            self.tracking.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{self.runs_dir / 'mlflow.db'}"
        )

    def secret_for(self, section: LLMSettings) -> str | None:
        """The API key for an LLM section; DashScope falls back to DASHSCOPE_API_KEY."""
        if section.api_key is not None:
            return section.api_key.get_secret_value()
        if section.backend == "dashscope" and self.dashscope_api_key is not None:
            return self.dashscope_api_key.get_secret_value()
        return None

    def public_dict(self) -> dict[str, Any]:
        """Settings as plain JSON-able values, secrets masked (for logs and MLflow params)."""
        return self.model_dump(mode="json")


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["train.lr=2e-5", "data.limit=10"]`` -> nested dict (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} must look like section.key=value")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ValueError(f"override {pair!r}: value is not valid YAML ({exc})") from exc
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def load_settings(profile: str | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Settings:
    """Build settings for a profile plus overrides, with env vars in between.

    Raises ``ValueError`` naming the offending key when a value is malformed.
    """
    from pydantic import ValidationError

    init: dict[str, Any] = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    if profile is not None:
        init["profile"] = profile
    try:
        return Settings(**init)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})" for err in exc.errors()
        )
        hint = f" (env prefix {ENV_PREFIX}, nested with '__')"
        raise ValueError(f"invalid settings: {problems}{hint}") from None


def offline_env() -> dict[str, str]:
    """Environment for subprocesses that must not look up a model hub (tests, CI, smoke)."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


__all__ = [
    "DataSettings",
    "EpisodeSettings",
    "EvalSettings",
    "JudgeSettings",
    "LLMSettings",
    "MemorySettings",
    "PROFILES",
    "SAMPLE_DATA",
    "Settings",
    "TrackingSettings",
    "TrainSettings",
    "load_settings",
    "parse_overrides",
]
