"""One settings model for the whole project.

Precedence, highest first: explicit overrides (CLI flags, ``--set section.key=value``),
``AGEMEM_*`` environment variables (``__`` nests: ``AGEMEM_TRAIN__LR=2e-5``), a ``.env`` file,
the named profile (``smoke`` or ``paper``), then the defaults below. Nothing else in the
project reads environment variables for configuration.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

import yaml

from agemem.assets import SAMPLE_DATA, TOKENIZER_DIR

ENV_PREFIX = "AGEMEM_"

LLMBackend = Literal["offline", "dashscope", "openai"]


class _Section(BaseModel):
    """A settings section: a misspelt key is an error (with a suggestion), never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSettings(_Section):
    """Where HotpotQA comes from and how episode scripts are built from it."""

    # -- source ----------------------------------------------------------------------------------
    source: str = Field(
        "sample",
        description="'sample' (shipped), a hub name like 'hotpotqa/hotpot_qa', or a local file/directory.",
    )
    hub_config: Literal["distractor", "fullwiki"] = Field(
        "distractor", description="HotpotQA hub config (the reference trains on 'fullwiki')."
    )
    split: str = Field("validation", description="Split to read from the hub or a local directory.")
    limit: int | None = Field(None, ge=1, description="Keep only the first N records (None = all).")
    cache_dir: Path | None = Field(
        None,
        description="datasets cache. None: runs/cache/datasets for local files, the HF default for the hub.",
    )
    output_dir: Path = Field(Path("runs/data"), description="Where scripts.jsonl, episodes.jsonl and stats land.")
    # -- episode scripts --------------------------------------------------------------------------
    seed: int = Field(42, description="Seed of paragraph order, openers and offline distractors (per record).")
    stage1_turns: int = Field(1, ge=1, description="Casual user turns the stage-1 paragraphs are spread over.")
    sentences_per_paragraph: int = Field(10, ge=1, description="Sentences kept per paragraph (reference: 10).")
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Share of records held out for evaluation.")
    # -- stage-2 distractors ----------------------------------------------------------------------
    distractor_messages: int = Field(3, ge=0, description="Stage-2 distractor messages per episode.")
    distractor_backend: Literal["offline", "llm"] = Field(
        "offline", description="'llm' uses the llm section's client; 'offline' uses other records' paragraphs."
    )
    synth_concurrency: int = Field(8, ge=1, description="Episodes whose LLM distractors are written at once.")
    synth_max_attempts: int = Field(3, ge=1, description="LLM distractor generations per slot before fallback.")
    distractors_per_call: int = Field(
        0, ge=0, description="LLM distractors asked for per call; 0 = all of an episode's open slots in one call."
    )
    distractor_min_chars: int = Field(20, ge=1, description="Shorter LLM distractors are regenerated.")
    distractor_max_chars: int = Field(400, ge=20, description="Longer LLM distractors are regenerated.")

    @model_validator(mode="after")
    def _distractor_bounds(self) -> "DataSettings":
        if self.distractor_min_chars >= self.distractor_max_chars:
            raise ValueError(f"distractor_min_chars ({self.distractor_min_chars}) must be below "
                             f"distractor_max_chars ({self.distractor_max_chars})")
        return self


class LLMSettings(_Section):
    """The auxiliary LLM (summaries, distractors); also the base for the judge."""

    backend: LLMBackend = Field("offline", description="'offline' (no model), 'dashscope' or 'openai' (any URL).")
    model: str = Field("qwen-max", description="Model name at the backend.")
    base_url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://host:8000/v1.")
    api_key: SecretStr | None = Field(None, description="DashScope or OpenAI-compatible key (never logged).")
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one call.")
    max_retries: int = Field(3, ge=0, description="Retries after the first attempt, on transient errors only.")
    backoff_s: float = Field(1.0, ge=0, description="First backoff; doubles per retry.")
    concurrency: int = Field(8, ge=1, description="Calls in flight at once (per client).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of the auxiliary LLM.")
    max_tokens: int = Field(512, ge=1, description="Completion cap of one call.")
    seed: int | None = Field(42, description="Sampling seed sent to backends that take one.")

    @model_validator(mode="after")
    def _openai_needs_url(self) -> "LLMSettings":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        return self


class JudgeSettings(LLMSettings):
    """The answer / memory-quality judge. Offline means EM/F1 and embedding similarity."""

    temperature: float = Field(0.0, ge=0, description="Judge sampling temperature (0: deterministic grades).")
    max_tokens: int = Field(16, ge=1, description="A grade is one number: a short completion.")
    cache: bool = Field(True, description="Cache judge grades by (question, gold, prediction).")
    parse_retries: int = Field(2, ge=0, description="Extra judge calls when the reply is not a bare 0-1 number.")
    offline_metric: Literal["f1", "em"] = Field("f1", description="Offline/fallback answer score: token F1 or EM.")
    memory_match_threshold: float = Field(
        0.75, ge=0, le=1, description="Offline memory quality: cosine at which a memory sentence matches a fact."
    )
    breaker_failures: int = Field(
        3,
        ge=0,
        description="After this many judge calls in a row fail (errors, timeouts, unparseable replies), the rest "
        "of the run is scored by the flagged offline fallback without calling the LLM. 0 = never.",
    )


class MemorySettings(_Section):
    """Milvus store, embedder and the memory tool server."""

    # -- store ------------------------------------------------------------------------------------
    uri: str = Field("runs/memory.db", description="milvus-lite path, or http://host:19530 for Milvus.")
    token: SecretStr | None = Field(None, description="Milvus auth token (standalone/cluster).")
    collection: str = Field(
        "agemem_memories", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,200}$", description="Milvus collection of the memories."
    )
    embedding_model: str | None = Field(
        None, description="sentence-transformers model name or path; default: the bundled all-MiniLM-L6-v2."
    )
    embedding_device: str = Field("cpu", min_length=1, description="torch device of the embedder, e.g. 'cuda'.")
    embed_batch_size: int = Field(64, ge=1, description="Most texts of concurrent requests embedded in one call.")
    embed_forward_batch_size: int = Field(
        16, ge=1, description="Texts per forward pass inside that call, grouped by length (less padding)."
    )
    embed_batch_wait_ms: float = Field(3.0, ge=0, description="How long a lone request waits for others to join its batch.")
    embedding_threads: int = Field(
        0, ge=0, description="torch CPU threads of the tool server process; 0 = torch's default (all cores)."
    )
    embed_cache_size: int = Field(
        4096, ge=0, description="Texts whose vectors the server keeps (LRU; GRPO siblings repeat texts). 0 = off."
    )
    embed_cache_scope: Literal["shared", "session"] = Field(
        "shared",
        description="'shared': one vector cache for all sessions (GRPO siblings of a task reuse each other's "
        "embeddings; a session can tell from timing whether another embedded a text). 'session': each session "
        "hits only its own entries.",
    )
    max_content_bytes: int = Field(8192, ge=1, description="Longest text argument (content, query) in UTF-8 bytes.")
    max_metadata_bytes: int = Field(
        4096, ge=64, description="Largest metadata of one memory as compact JSON, after an Update's merge."
    )
    max_metadata_depth: int = Field(8, ge=1, le=32, description="Deepest nesting of objects/arrays in metadata.")
    max_body_bytes: int = Field(65536, ge=1024, description="Largest HTTP request body; larger is 413, unread.")
    max_top_k: int = Field(20, ge=1, le=1000, description="Most memories one Retrieve_memory may ask for.")
    default_top_k: int = Field(3, ge=1, description="top_k of a Retrieve_memory that names none.")
    max_memories_per_session: int = Field(
        10_000, ge=1, description="Memories one session may hold; an Add beyond it is a tool error."
    )
    list_page_size: int = Field(
        1000, ge=1, le=16_384, description="Most memories in one GET /sessions/{id}/memories page (cursor paging)."
    )
    max_sessions: int = Field(
        10_000, ge=1, description="Live sessions the server holds; POST /sessions beyond it is 429."
    )
    session_idle_ttl_s: float = Field(
        3600.0, gt=0, description="A session unused this long is deleted with its memories by the sweeper."
    )
    session_sweep_interval_s: float = Field(60.0, gt=0, description="How often the sweeper looks for idle sessions.")
    token_hash_key: SecretStr | None = Field(
        None,
        description="Key of the HMAC that stores session-token hashes; a session row written into the store "
        "by anyone without it is never accepted. Changing it invalidates existing sessions.",
    )
    idempotency_cache_size: int = Field(
        10_000, ge=0, description="Tool results kept by request id, so a client's retry is answered, not redone."
    )
    host: str = Field("127.0.0.1", min_length=1, description="Interface the tool server binds.")
    port: int = Field(8765, ge=0, le=65535, description="Port of the tool server.")
    server_url: str | None = Field(None, description="Use this running tool server; None = in-process store.")
    server_token: SecretStr | None = Field(
        None, description="Required on POST /sessions when set; also the key of the admin view (/admin)."
    )
    spaces_file: Path = Field(
        Path("runs/memory-spaces.json"),
        description="Where this machine keeps the session tokens of its named memory spaces (mode 0600).",
    )
    max_connections: int = Field(
        2048, ge=1, description="Open connections plus running requests before the server answers 503."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection whose request head is not complete this long after it opened "
        "(on a kept-alive connection: after the head's first byte) is closed."
    )
    body_timeout_s: float = Field(30.0, gt=0, description="A request body not received within this is a 408.")
    keep_alive_timeout_s: int = Field(5, ge=1, description="Idle keep-alive connections are closed after this.")
    max_header_bytes: int = Field(16_384, ge=1024, description="Largest request head; larger is refused.")
    shutdown_timeout_s: int = Field(
        10, ge=1, description="On SIGTERM/SIGINT, in-flight requests get this long before the store is flushed."
    )
    request_timeout_s: float = Field(10.0, gt=0, description="HTTP client: timeout of one request.")
    client_retries: int = Field(
        3, ge=0, description="HTTP client: retries of a request that failed in transport or with a 5xx."
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, description="Milvus connect timeout: an unreachable AGEMEM_MEMORY__URI fails after this."
    )
    flush_interval_s: float = Field(
        0.0,
        ge=0,
        description="0: every write is flushed before it is acknowledged (milvus-lite loses unflushed rows "
        "when its process is killed). >0: flushed at most this long later (faster; a SIGKILL loses at most "
        "this long of writes; SIGTERM/SIGINT flush first).",
    )
    flush_rows: int = Field(256, ge=1, description="Flush at once when this many rows are unflushed.")
    partitions: int = Field(
        64,
        ge=1,
        le=1024,
        description="Partitions sessions are hashed into when the collection is made; a session's searches read "
        "only its own (Milvus allows 1024 per collection by default).",
    )
    @model_validator(mode="after")
    def _consistent(self) -> "MemorySettings":
        if self.default_top_k > self.max_top_k:
            raise ValueError(f"memory.default_top_k ({self.default_top_k}) exceeds memory.max_top_k ({self.max_top_k})")
        return self


class EpisodeSettings(_Section):
    """The three-stage episode: rounds, context budget, context tools, sampling, reward preset."""

    # -- budget and rounds ------------------------------------------------------------------------
    tokenizer: str = Field(
        str(TOKENIZER_DIR),
        description="Tokenizer counting the budget where the policy's own is not at hand (chat endpoints, data "
        "stats); token-level training and evaluation count with the model's tokenizer.",
    )
    max_context_tokens: int = Field(8192, ge=256, description="Context budget in prompt tokens (policy tokenizer).")
    stage1_max_rounds: int = Field(5, ge=1, description="Model calls per stage-1 message.")
    stage2_max_rounds: int = Field(5, ge=1, description="Model calls per distractor message.")
    stage3_max_rounds: int = Field(5, ge=1, description="Model calls for the question.")
    max_turn_tokens: int = Field(512, ge=1, description="Cap on one model turn (sampling max_tokens).")
    overflow_policy: Literal["truncate", "end_stage"] = Field(
        "truncate", description="Over budget: drop the oldest rewritable messages, or end the stage."
    )
    auto_summary_threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="End a stage message when the context exceeds this share of the budget after a round "
        "without an answer (the reference's 0.8). None: the reward preset's value (official-code 0.8, "
        "paper: off); 1.0 turns it off.",
    )
    # -- sampling ---------------------------------------------------------------------------------
    temperature: float = Field(0.6, ge=0, description="Applied to every rollout (the reference ignored it).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of rollouts.")
    # -- tools ------------------------------------------------------------------------------------
    use_context_tools: bool = Field(
        True, description="Offer Summary/Filter/Retrieve; False is the ablation with automatic retrieval."
    )
    enable_stage2: bool = Field(True, description="Run the distractor stage (False: the ablation without it).")
    filter_threshold: float = Field(0.6, ge=0, le=1, description="Filter_context removes similarity >= this.")
    manual_retrieve_top_k: int = Field(3, ge=1, description="Auto-retrieval when context tools are off.")
    max_tool_calls_per_turn: int = Field(8, ge=1, description="Tool calls of one reply that are executed.")
    summary_max_tokens: int = Field(256, ge=16, description="Cap on one Summary_context LLM summary.")
    max_tool_result_chars: int = Field(2000, ge=64, description="Tool results longer than this are cut.")
    alias_memory_ids: bool = Field(
        True, description="Show the model short memory ids (M1, M2, ... per episode) instead of the store's random "
        "ids, translated back on Update/Delete: seeded rollouts then repeat exactly, and ids are easy to copy.",
    )
    # -- reward -----------------------------------------------------------------------------------
    reward_preset: Literal["paper", "official-code"] = Field(
        "paper", description="Reward weights: the paper's (uniform) or the released code's."
    )
    reward_overrides: dict[str, Any] = Field(
        default_factory=dict, description="RewardConfig fields overriding the preset, e.g. {'clip_max': 2.0}."
    )
    coverage_threshold: float = Field(
        0.8, ge=0, le=1, description="Token recall at which a gold fact counts as present in a text (stats)."
    )


class TrainSettings(_Section):
    """GRPO training, for the local trainer and for verl."""

    # -- what is trained --------------------------------------------------------------------------
    backend: Literal["local", "verl"] = Field("local", description="'local' (CPU / one GPU) or 'verl' (GPUs, Ray).")
    model: str = Field(
        "tiny-random-qwen2",
        description="HF name or path, a .gguf file or a folder holding one (local trainer / eval); "
        "'tiny-random-qwen2' builds a random-weight test model.",
    )
    tiny_hidden_size: int = Field(64, ge=8, description="Hidden size of 'tiny-random-qwen2' (random weights).")
    tiny_num_layers: int = Field(2, ge=1, description="Layers of 'tiny-random-qwen2'.")
    lora_rank: int = Field(32, ge=0, description="LoRA rank; 0 = full fine-tune.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / rank).")
    lora_target_modules: str = Field("all-linear", description="'all-linear' or comma-separated module names.")
    # -- GRPO -------------------------------------------------------------------------------------
    rollouts_per_prompt: int = Field(8, ge=1, description="GRPO group size: trajectories per task.")
    tasks_per_batch: int = Field(16, ge=1, description="Tasks (episode scripts) per training step.")
    total_steps: int = Field(100, ge=1, description="Training steps (a longer run resumes a shorter one).")
    total_epochs: int = Field(20, ge=1, description="verl trainer.total_epochs (the step count stops first).")
    lr: float = Field(1e-5, gt=0, description="Learning rate (AdamW).")
    kl_coef: float = Field(0.001, ge=0, description="KL-loss coefficient to the reference policy (paper: 0.1).")
    kl_loss_type: str = Field("low_var_kl", description="verl's kl_penalty type of the KL loss.")
    clip_ratio: float = Field(0.2, gt=0, description="PPO clip ratio of the policy loss.")
    norm_adv_by_std: bool = Field(
        True, description="GRPO divides each group's centred rewards by their std (verl's "
        "algorithm.norm_adv_by_std_in_grpo); False keeps them unscaled (Dr. GRPO), so a group whose rewards "
        "differ by noise (0.575 vs 0.573) is not pushed as hard as one where a rollout answered and another did not.",
    )
    ppo_epochs: int = Field(1, ge=1, description="Optimisation passes over one batch of rollouts (local).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip (local and verl actor).")
    seed: int = Field(42, description="Seed of the batch order, initialisation and sampling.")
    # -- lengths ----------------------------------------------------------------------------------
    max_prompt_length: int = Field(8192, ge=16, description="verl data.max_prompt_length: a segment's prompt.")
    max_response_length: int | None = Field(
        None,
        ge=16,
        description="verl data.max_response_length: the budget of one segment's response, which spans many turns "
        "and injected messages. None = derived: episode.max_context_tokens + episode.max_turn_tokens (a segment "
        "never holds more); a smaller value is refused, since verl would cut answers the reward still scores.",
    )
    # -- collapse alarms --------------------------------------------------------------------------
    collapse_entropy_min: float = Field(
        0.05, ge=0, description="Alarm when the policy's mean token entropy (nats) falls below this."
    )
    collapse_grad_norm_max: float = Field(
        1000.0, gt=0, description="Alarm when the gradient norm (before clipping) exceeds this or is not finite."
    )
    collapse_patience: int = Field(
        2, ge=1, description="Steps with no tool call at all (after tools were called) before the alarm."
    )
    stop_on_collapse: bool = Field(
        False, description="Stop at a collapse alarm and keep the last good checkpoint (else: warn and go on)."
    )
    # -- checkpoints ------------------------------------------------------------------------------
    output_dir: Path = Field(Path("runs/checkpoints"), description="Checkpoints (local: one folder per config).")
    save_every: int = Field(1, ge=1, description="Steps between checkpoints (the last step is always saved).")
    keep_checkpoints: int = Field(
        3, ge=0, description="Newest step checkpoints kept, local trainer and verl (trainer.max_actor_ckpt_to_keep; "
        "a 7B verl checkpoint is tens of GB); 0 = all."
    )
    # -- local trainer ----------------------------------------------------------------------------
    device: str = Field("auto", description="Local trainer device: 'auto' (cuda if available), 'cpu', 'cuda:0'.")
    torch_threads: int = Field(1, ge=1, description="CPU threads (1 measured fastest on 2-core machines).")
    # -- verl -------------------------------------------------------------------------------------
    n_gpus_per_node: int = Field(8, ge=0, description="verl trainer.n_gpus_per_node.")
    nnodes: int = Field(1, ge=1, description="verl trainer.nnodes.")
    ray_address: str | None = Field(None, description="ray job submit target; None = local Ray.")
    rollout_engine: Literal["vllm", "sglang"] = Field("vllm", description="verl rollout engine (GPU only).")
    rollout_tp: int = Field(1, ge=1, description="verl rollout tensor-parallel size.")
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1, description="vLLM/SGLang KV-cache share.")
    ppo_max_token_len_per_gpu: int | None = Field(
        None,
        ge=256,
        description="verl dynamic-batch token budget of the actor update and of both log-prob passes (verl asserts "
        "it holds the longest sequence). None = derived: max_prompt_length + the segment response budget.",
    )
    ppo_mini_batch_size: int | None = Field(
        None,
        ge=1,
        description="verl actor.ppo_mini_batch_size in prompts (x rollouts_per_prompt rows per optimizer update). "
        "verl splits a step's rows, one per segment and shuffled across groups, into mini-batches of that many "
        "rows: about segments-per-trajectory x tasks_per_batch / this updates per step. None = tasks_per_batch.",
    )
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto",
        description="verl actor/ref attention (model.override_config.attn_implementation). 'auto': "
        "flash_attention_2 when flash-attn is installed (verl's default), else sdpa.",
    )
    agent_workers: int = Field(8, ge=1, description="verl agent-loop workers (Ray actors).")
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
    extra_overrides: list[str] = Field(
        default_factory=list, description="Extra verl Hydra overrides ('key=value'); they win over ours."
    )


class WarmStartSettings(_Section):
    """Teacher warm start: supervised fine-tuning on teacher trajectories before GRPO (``agemem train --algo sft``)."""

    enabled: bool = Field(
        False, description="Run the warm start before GRPO (smoke: on; paper: off, it starts RL from the instruct model)."
    )
    teacher: Literal["scripted", "llm"] = Field(
        "scripted", description="'scripted': the deterministic sensible agent; 'llm': the llm section's model."
    )
    style: Literal["default", "compact"] = Field(
        "default", description="Scripted teacher's replies: 'compact' fits short turns (a small model's warm start)."
    )
    query_words: int = Field(
        6, ge=1, le=64, description="Compact style: the stage-3 Retrieve_memory query is the question's first N "
        "content words (a small model copies a short query more reliably than the whole question).",
    )
    episodes: int | None = Field(None, ge=1, description="Teacher episodes: the first N train episodes (None = all).")
    rollouts_per_episode: int = Field(1, ge=1, description="Teacher trajectories per episode (>1 for sampling LLMs).")
    keep_metric: Literal["reward", "judge_score"] = Field(
        "reward", description="Rejection sampling keeps trajectories whose reward (or judge score) reaches min_score."
    )
    min_score: float = Field(0.0, description="Threshold of rejection sampling on keep_metric.")
    drop_malformed: bool = Field(
        True, description="Rejection sampling also drops trajectories with a malformed teacher reply (e.g. one cut "
        "by episode.max_turn_tokens), which would teach that very format error; off keeps them.",
    )
    epochs: int = Field(3, ge=1, description="Passes over the kept trajectories.")
    lr: float = Field(1e-4, gt=0, description="Learning rate of the warm start (AdamW; LoRA per train.lora_rank).")
    batch_segments: int = Field(4, ge=1, description="Segments per optimizer step.")
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads of the warm start; None: every core (nothing runs beside it, unlike "
        "GRPO's rollouts, train.torch_threads). Not part of the warm start's cache key."
    )


class PolicySettings(_Section):
    """What plays the agent: a checkpoint (directory or ``models:/`` URI), an endpoint, or the scripted agent."""

    policy: Literal["checkpoint", "openai", "dashscope", "scripted"] = Field(
        "checkpoint", description="What plays: a local checkpoint, an endpoint, or the scripted agent."
    )
    model: str | None = Field(
        None, description="Checkpoint directory or models:/ URI (policy=checkpoint; None = the newest local "
        "checkpoint), or the endpoint's model name."
    )
    base_url: str | None = Field(None, description="OpenAI-compatible URL of the policy endpoint (policy=openai).")
    api_key: SecretStr | None = Field(None, description="Key for the openai/dashscope policy endpoint.")
    timeout_s: float = Field(120.0, gt=0, description="Per-turn timeout of an endpoint policy.")
    concurrency: int = Field(4, ge=1, description="Episodes evaluated (or endpoint calls made) at once.")

    @model_validator(mode="after")
    def _endpoint_needs(self) -> "PolicySettings":
        if self.policy == "openai" and not self.base_url:
            raise ValueError("policy 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
        return self


class EvalSettings(PolicySettings):
    """Evaluation runs (also the paper's ablations, through the episode section's flags)."""

    split: Literal["eval", "train", "all"] = Field(
        "eval", description="Which episodes to evaluate; 'eval' falls back to all when the file has none."
    )
    limit: int | None = Field(None, ge=1, description="Evaluate the first N episodes (None = all).")
    seed: int | None = Field(
        0, ge=0, description="Sampling seed of a checkpoint's episodes (one per episode and turn), so checkpoints are "
        "compared on the same random draws and a report is reproducible; None = unseeded."
    )
    output_dir: Path = Field(Path("runs/eval"), description="Reports land in <output_dir>/<policy>-<time>.")
    compare_checkpoints: bool = Field(
        False, description="The pipeline also evaluates the base and warm-start models, in one table with GRPO's."
    )
    temperature: float | None = Field(
        None, ge=0, description="Sampling temperature of the evaluated agent (0: greedy, like verl's validation "
        "default); None: episode.temperature, the rollouts' own."
    )

    def sampling_temperature(self, episode: "EpisodeSettings") -> float:
        """The temperature the evaluated agent samples at: this section's, else the rollouts'."""
        return episode.temperature if self.temperature is None else self.temperature


class ChatSettings(PolicySettings):
    """``agemem chat`` and the served agent (the registry's MLflow model): the policy and the memory space."""

    space: str = Field(
        "default", pattern=r"^[A-Za-z0-9_-]{1,58}$",
        description="Named memory space the chat reads and writes; it persists across chats (memory.spaces_file).",
    )
    max_rounds: int = Field(4, ge=1, description="Model calls per user message (tool calls, then the answer).")


class TrackingSettings(_Section):
    """MLflow tracking and registry."""

    tracking_uri: str | None = Field(None, description="None = MLFLOW_TRACKING_URI, else sqlite under runs_dir.")
    experiment: str = Field("agemem", description="MLflow experiment of every run.")
    registered_model: str = Field("agemem-policy", description="Registered model every trained policy goes to.")
    gate_metric: str = Field("judge_score", description="Eval aggregate the champion gate compares (J).")
    gate_min_delta: float = Field(0.0, description="The candidate must beat the champion by more than this.")
    crown_random_weights: bool = Field(
        False,
        description="Let the champion gate crown a random-weight model (the smoke profile's tiny-random-qwen2); "
        "off: such a version stays candidate only.",
    )
    log_merged_model: bool | None = Field(
        None, description="Also log the merged HF model; None = only when the base model cannot be reloaded by name."
    )
    prefect_results_dir: Path = Field(
        Path("runs/prefect-results"), description="Persisted Prefect task results and cache records."
    )


PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        # 40 records (36 train, 4 eval): a warm start on 6 teacher episodes memorises them and, on held-out
        # questions, writes ~4 malformed tool calls per question; on 24-29 it writes ~1 (measured on the
        # shared train sample, not on this eval split).
        "data": {"source": "sample", "limit": 40, "distractor_messages": 2},
        "episode": {
            # System prompt (~760 tokens) + the longest shipped stage-1 message (~1,900) must fit,
            # or stage 1 overflows before the first model call; costs ~10% more smoke time.
            "max_context_tokens": 4096,
            "stage1_max_rounds": 2,
            "stage2_max_rounds": 1,
            "stage3_max_rounds": 2,
            # A compact teacher reply (one tool call) is ~55 tokens: the warm-started model needs room for it.
            "max_turn_tokens": 64,
        },
        "train": {
            "backend": "local",
            "model": "tiny-random-qwen2",
            # 128 wide, not 64: as fast a warm start on 2 cores (the step cost is not the width's) and
            # fewer malformed calls on held-out questions (1.5 -> 1.1 a question; 3 layers: 1.25, no better).
            "tiny_hidden_size": 128,
            "tiny_num_layers": 2,
            "rollouts_per_prompt": 4,
            "tasks_per_batch": 2,
            "total_steps": 4,
            # The tiny model learns visibly only as a full fine-tune (LoRA over random weights barely
            # moves in a smoke budget). After the warm start 2e-4: at 2e-3 four GRPO steps undo what it
            # taught (held-out tool calls 4 -> 1.25, format errors 0.75 -> 4.25 on the train sample).
            "lr": 2e-4,
            # After the warm start a group's rewards often differ by noise (0.575 vs 0.573): scaled by their
            # std that noise becomes a full-size push (held-out reward 0.57 -> 0.32 in one run); unscaled, GRPO
            # keeps the warm start's level (0.57 -> 0.57 and 0.59; train sample, two warm starts).
            "norm_adv_by_std": False,
            # The paper's beta: it anchors GRPO to the warm-started policy, which calls tools (at 0.001 the
            # tiny model drops its tool calls within 4 steps and only answers).
            "kl_coef": 0.1,
            "lora_rank": 0,
            "lora_alpha": 16,
            "max_prompt_length": 4096,
            "n_gpus_per_node": 0,
        },
        # 14 epochs over 24 teacher episodes (loss ~0.3): held-out malformed calls 1.1 a question at 10
        # epochs, 0.82 at 14 (28 questions of the shared train sample, never this eval split). All 36
        # train episodes took 6 minutes at 10 epochs, too much of the smoke run's 10-minute budget.
        "warm_start": {"enabled": True, "style": "compact", "episodes": 24, "epochs": 14, "lr": 3e-3,
                       "batch_segments": 1},
        "eval": {"limit": 4, "concurrency": 2, "compare_checkpoints": True},
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
            "n_gpus_per_node": 8,
            "save_every": 20,
        },
        "warm_start": {"enabled": False, "teacher": "llm", "rollouts_per_episode": 4, "keep_metric": "judge_score",
                       "min_score": 0.8},
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

    profile: Literal["smoke", "paper"] = Field(
        "smoke", description="Values under env vars and flags: 'smoke' (CPU, shipped sample, tiny model) or 'paper'."
    )
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
    warm_start: WarmStartSettings = WarmStartSettings()
    eval: EvalSettings = EvalSettings()
    chat: ChatSettings = ChatSettings()
    tracking: TrackingSettings = TrackingSettings()

    @field_validator("runs_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        """Rules across sections, checked before anything runs."""
        if self.train.max_prompt_length < self.episode.max_context_tokens:
            raise ValueError(
                f"train.max_prompt_length ({self.train.max_prompt_length}) must be at least "
                f"episode.max_context_tokens ({self.episode.max_context_tokens}): a segment's prompt is the context"
            )
        segment = self.episode.max_context_tokens + self.episode.max_turn_tokens
        if self.train.max_response_length is not None and self.train.max_response_length < segment:
            raise ValueError(
                f"train.max_response_length ({self.train.max_response_length}) must be at least "
                f"episode.max_context_tokens + episode.max_turn_tokens ({segment}): a segment's response can hold "
                "the whole context plus a turn, and verl would cut it (leave it unset to derive it)"
            )
        sequence = self.train.max_prompt_length + self.response_budget
        if self.train.ppo_max_token_len_per_gpu is not None and self.train.ppo_max_token_len_per_gpu < sequence:
            raise ValueError(
                f"train.ppo_max_token_len_per_gpu ({self.train.ppo_max_token_len_per_gpu}) must be at least "
                f"max_prompt_length + the response budget ({sequence}): verl asserts a token budget holds the longest "
                "sequence (leave it unset to derive it)"
            )
        return self

    @property
    def response_budget(self) -> int:
        """verl's ``data.max_response_length``: ``train.max_response_length``, else the longest segment."""
        return self.train.max_response_length or self.episode.max_context_tokens + self.episode.max_turn_tokens

    @property
    def token_budget(self) -> int:
        """verl's per-GPU token budget (actor update, rollout and reference log-probs)."""
        return self.train.ppo_max_token_len_per_gpu or self.train.max_prompt_length + self.response_budget

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
            if not isinstance(node, dict):
                raise ValueError(f"override {pair!r}: {part!r} is a value, not a section")
        node[leaf] = value
    return out


# ------------------------------------------------------------------------------ keys and sources
SECTIONS: tuple[str, ...] = ("data", "llm", "judge", "memory", "episode", "train", "warm_start", "eval", "chat",
                             "tracking")


def setting_keys() -> dict[str, str]:
    """Every settable key (``section.field`` or a top-level field) with its description."""
    keys: dict[str, str] = {}
    for name, info in Settings.model_fields.items():
        if name in SECTIONS:
            section = info.annotation
            for field_name, field_info in section.model_fields.items():  # type: ignore[union-attr]
                keys[f"{name}.{field_name}"] = field_info.description or ""
        else:
            keys[name] = info.description or ""
    return keys


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and prefix == "":  # top-level dicts are sections (or misspelt ones)
            out.update(_flat(value, f"{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _env_key(name: str) -> str | None:
    """``AGEMEM_TRAIN__LR`` -> ``train.lr`` (None for names outside the prefix)."""
    if not name.upper().startswith(ENV_PREFIX):
        return None
    return name[len(ENV_PREFIX):].lower().replace("__", ".")


def _dotenv_values() -> dict[str, str]:
    path = Path(".env")
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def _unknown_key_error(key: str, origin: str) -> str:
    known = setting_keys()
    hint = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    suggestion = f"; did you mean '{hint[0]}'?" if hint else "; `agemem config keys` lists every key"
    return f"unknown setting '{key}' ({origin}){suggestion}"


#: ``AGEMEM_*`` variables that are not settings: the infra/prefect scripts' own knobs (the checkout a
#: deployment runs in, the work pool, how long to wait for the server). A flow run inherits them.
NOT_SETTINGS = frozenset({"AGEMEM_PROJECT_DIR", "AGEMEM_WORK_POOL", "AGEMEM_PREFECT_WAIT_S"})


def check_keys(overrides: dict[str, Any]) -> None:
    """Refuse unknown keys from flags, ``AGEMEM_*`` env vars and ``.env``, naming the closest key."""
    known = setting_keys()
    problems = [_unknown_key_error(k, "--set") for k in _flat(overrides) if k not in known]
    for origin, names in (("env", list(os.environ)), (".env", list(_dotenv_values()))):
        for name in names:
            if name.upper() in NOT_SETTINGS:
                continue
            key = _env_key(name)
            if key is not None and key not in known:
                problems.append(_unknown_key_error(key, f"{origin} {name}"))
    if problems:
        raise ValueError("; ".join(problems))


def explain_settings(profile: str | None = None, overrides: dict[str, Any] | list[str] | None = None
                     ) -> list[tuple[str, Any, str]]:
    """``(key, value, source)`` for every key, source one of default / profile / .env / env / flag."""
    init = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    settings = load_settings(profile, init)
    flags = _flat({**init, **({"profile": profile} if profile is not None else {})})
    env = {_env_key(n) for n in os.environ} - {None}
    if "DASHSCOPE_API_KEY" in os.environ:
        env.add("dashscope_api_key")
    dotenv = {_env_key(n) for n in _dotenv_values()} - {None}
    from_profile = _flat(PROFILES[settings.profile])
    values = _flat(settings.public_dict())
    out = []
    for key in setting_keys():
        source = ("flag" if key in flags else "env" if key in env else ".env" if key in dotenv
                  else "profile" if key in from_profile else "default")
        out.append((key, values.get(key), source))
    return out


def load_settings(profile: str | None = None, overrides: dict[str, Any] | list[str] | None = None) -> Settings:
    """Build settings for a profile plus overrides, with env vars in between.

    Raises ``ValueError`` naming the offending key when a key is unknown or a value is malformed.
    """
    init: dict[str, Any] = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    if profile is not None:
        init["profile"] = profile
    check_keys(init)
    try:
        return Settings(**init)
    except ValidationError as exc:
        problems = "; ".join(_describe_error(err) for err in exc.errors())
        raise ValueError(f"invalid settings: {problems}") from None


def _describe_error(err: Any) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "settings"
    if err["type"] == "extra_forbidden":
        return _unknown_key_error(key, "value")
    env = f"{ENV_PREFIX}{key.upper().replace('.', '__')}"
    shown = err.get("input")
    return f"{key}: {err['msg'].removeprefix('Value error, ')} (got {shown!r}; env {env})" if "." in key or \
        key in Settings.model_fields else f"{key}: {err['msg'].removeprefix('Value error, ')}"


def offline_env() -> dict[str, str]:
    """Environment for subprocesses that must not look up a model hub (tests, CI, smoke)."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


__all__ = [
    "NOT_SETTINGS",
    "SECTIONS",
    "check_keys",
    "explain_settings",
    "setting_keys",
    "ChatSettings",
    "DataSettings",
    "EpisodeSettings",
    "EvalSettings",
    "JudgeSettings",
    "LLMSettings",
    "MemorySettings",
    "PROFILES",
    "PolicySettings",
    "SAMPLE_DATA",
    "Settings",
    "TrackingSettings",
    "TrainSettings",
    "WarmStartSettings",
    "load_settings",
    "parse_overrides",
]
