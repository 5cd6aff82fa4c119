"""The policies the episode engine can drive: a local checkpoint, an endpoint, or the scripted policy.

One loader for evaluation, ``agemem episode``, ``agemem chat`` and the served agent; each names its
settings section (``eval`` or ``chat``, both :class:`~agemem.settings.PolicySettings`).

- ``checkpoint``: a transformers model (an HF directory, or a PEFT adapter over
  ``train.model``) behind the local trainer's :class:`LocalTokenServer` (token-level, like verl).
- ``openai``: any OpenAI-compatible chat endpoint (a vLLM server) via :mod:`agemem.llm`.
- ``dashscope``: DashScope via :mod:`agemem.llm`.
- ``scripted``: :class:`ScriptedChatPolicy` per episode script, :class:`ScriptedConversationPolicy`
  for a conversation; deterministic and model-free (smoke runs, tests).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from agemem.agent.policy import LLMChatPolicy
from agemem.agent.scripted import ScriptedChatPolicy, ScriptedConversationPolicy
from agemem.llm import LLMClient, build_backend
from agemem.settings import LLMSettings, PolicySettings
from agemem.tracking.uris import is_model_uri, resolve_model_uri
from agemem.train.models import (
    RANDOM_WEIGHTS_LABEL,
    gguf_source,
    has_random_weights,
    is_tiny,
    load_policy_model,
    load_tokenizer,
    resolve_device,
)
from agemem.train.run import local_checkpoint_root, newest_local_policy

if TYPE_CHECKING:
    from agemem.data.records import EpisodeScript
    from agemem.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class PolicyHandle:
    """How to run the engine: ``mode`` 'tokens' or 'chat', a policy factory per episode script and
    one for a conversation; ``close`` releases what the policy holds (an endpoint's client)."""

    mode: str
    for_script: Callable[["EpisodeScript"], Any]
    tokenizer: Any | None
    label: str
    close: Callable[[], Any] | None = None
    random_weights: bool = False
    for_conversation: Callable[[], Any] | None = None

    def conversation_policy(self) -> Any:
        if self.for_conversation is None:
            raise ValueError(f"policy {self.label} cannot hold a conversation")
        return self.for_conversation()


def adapter_base_model(settings: "Settings", adapter_dir: Path) -> str:
    """The base a PEFT adapter was trained on: its recorded ``base_model_name_or_path`` when that is
    loadable here (a local path, e.g. the GGUF file); else, for verl's merger layout
    (``<merged>/lora_adapter``), the base weights the merger saved beside it; else ``train.model``."""
    import json

    adapter_dir = Path(adapter_dir)
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if recorded and Path(recorded).exists():
        if recorded != settings.train.model:
            logger.info("adapter %s: rebuilding its recorded base %s (train.model is %s)", adapter_dir, recorded,
                        settings.train.model)
        return str(recorded)
    if (adapter_dir.parent / "config.json").is_file():
        # verl's merger saves the base weights (the LoRA layers' base_layer) and tokenizer one level up.
        return str(adapter_dir.parent)
    # The tiny random model records no path (it is re-created from its seed); hub names resolve as given.
    return settings.train.model


def is_base_source(model: str | Path) -> bool:
    """A base model named the way ``train.model`` names it (the tiny model, a GGUF file or folder), not a checkpoint."""
    return is_tiny(str(model)) or gguf_source(str(model)) is not None


def load_checkpoint_model(settings: "Settings", model_path: Path | str, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) from an HF model directory, a PEFT adapter directory, or a base model source."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_base_source(model_path):
        tokenizer = load_tokenizer(settings, str(model_path))
        return load_policy_model(settings, tokenizer, device=device, model=str(model_path)).eval(), tokenizer
    model_path = Path(model_path)
    is_adapter = (model_path / "adapter_config.json").is_file()
    base_source = adapter_base_model(settings, model_path) if is_adapter else None
    has_tokenizer = (model_path / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path)) if has_tokenizer else load_tokenizer(settings, base_source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if is_adapter:
        from peft import PeftModel

        base = load_policy_model(settings, tokenizer, device=device, model=base_source)
        model = PeftModel.from_pretrained(base, str(model_path)).to(device)
    elif (model_path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(model_path)).to(device)
    else:
        raise FileNotFoundError(f"{model_path} is neither an HF model (config.json) nor a PEFT adapter")
    model.eval()
    return model, tokenizer


def checkpoint_path(settings: "Settings", model: Path | str | None = None,
                    section: PolicySettings | None = None) -> tuple[Path, str]:
    """The checkpoint to load and how to name it: ``model`` (a directory or a ``models:/`` URI), else
    ``section.model`` (default ``eval.model``), else the newest local checkpoint of the current
    training configuration."""
    chosen = model if model is not None else (section or settings.eval).model
    if chosen is None:
        newest = newest_local_policy(settings)
        if newest is None:
            raise FileNotFoundError(
                f"no checkpoint of this training configuration under {local_checkpoint_root(settings)}: train "
                "first (`agemem pipeline` or `agemem train`, same --profile/--set), or pass --model "
                "<checkpoint dir> or --model models:/<name>@champion")
        logger.info("evaluating the newest checkpoint of this configuration: %s", newest)
        return newest, f"checkpoint:{newest}"
    if is_base_source(chosen):
        return Path(str(chosen)), f"base:{chosen}"
    if is_model_uri(chosen):
        resolved = resolve_model_uri(settings, str(chosen))
        return resolved.path, f"{chosen} (v{resolved.version})" if resolved.version else str(chosen)
    if not Path(chosen).exists():
        raise FileNotFoundError(f"checkpoint {chosen} does not exist (give a model or adapter directory, or a "
                                "models:/ URI)")
    return Path(chosen), f"checkpoint:{chosen}"


def build_policy(settings: "Settings", model_path: Path | str | None = None, *,
                 section: PolicySettings | None = None) -> PolicyHandle:
    """The policy ``section.policy`` names (``section``: default ``settings.eval``; ``settings.chat``
    for a conversation); ``model_path`` (a directory or a ``models:/`` URI) overrides ``section.model``."""
    cfg = section or settings.eval
    if cfg.policy == "scripted":
        return PolicyHandle("chat", ScriptedChatPolicy, None, "scripted", for_conversation=ScriptedConversationPolicy)
    if cfg.policy == "checkpoint":
        return _checkpoint_policy(settings, model_path, cfg)
    if not cfg.model:
        raise ValueError(f"policy {cfg.policy} needs the endpoint's model name (--model or "
                         f"{_key(settings, cfg)}.model)")
    if cfg.policy == "openai" and not cfg.base_url:
        raise ValueError(f"policy openai needs the endpoint's URL, e.g. http://127.0.0.1:8000/v1 "
                         f"({_key(settings, cfg)}.base_url)")
    section_llm = LLMSettings(backend=cfg.policy, model=cfg.model, base_url=cfg.base_url, api_key=cfg.api_key,
                              timeout_s=cfg.timeout_s, concurrency=cfg.concurrency)
    key = settings.secret_for(section_llm)
    client = LLMClient(build_backend(section_llm, key), model=cfg.model, timeout_s=cfg.timeout_s,
                       max_retries=section_llm.max_retries, backoff_s=section_llm.backoff_s,
                       concurrency=cfg.concurrency, temperature=settings.episode.temperature,
                       max_tokens=settings.episode.max_turn_tokens, seed=section_llm.seed)
    policy = LLMChatPolicy(client)
    return PolicyHandle("chat", lambda script: policy, None, f"{cfg.policy}:{cfg.model}", close=client.aclose,
                        for_conversation=lambda: policy)


def _key(settings: "Settings", section: PolicySettings) -> str:
    return "chat" if section is settings.chat else "eval"


def _checkpoint_policy(settings: "Settings", model_path: Path | str | None, cfg: PolicySettings) -> PolicyHandle:
    from agemem.train.token_server import LocalTokenServer  # torch: only for checkpoints

    path, label = checkpoint_path(settings, model_path, cfg)
    device = resolve_device(settings.train.device)
    model, tokenizer = load_checkpoint_model(settings, path, device)
    random = has_random_weights(model)
    if random:
        label += f" [{RANDOM_WEIGHTS_LABEL}]"
    server = LocalTokenServer.from_settings(model, tokenizer, settings, device=device)
    return PolicyHandle("tokens", lambda script: server, tokenizer, label, random_weights=random,
                        for_conversation=lambda: server)


__all__ = ["PolicyHandle", "adapter_base_model", "build_policy", "checkpoint_path", "load_checkpoint_model"]
