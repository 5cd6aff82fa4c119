"""The policies an evaluation can drive: a local checkpoint, an endpoint, or the scripted policy.

- ``checkpoint``: a transformers model (an HF directory, or a PEFT adapter over
  ``train.model``) behind the local trainer's :class:`LocalTokenServer` (token-level, like verl).
- ``openai``: any OpenAI-compatible chat endpoint (a vLLM server) via :mod:`agemem.llm`.
- ``dashscope``: DashScope via :mod:`agemem.llm`.
- ``scripted``: :class:`ScriptedChatPolicy`, deterministic and model-free (smoke runs, tests).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from agemem.data.records import EpisodeScript
    from agemem.llm import LLMClient
    from agemem.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class PolicyHandle:
    """How to run one episode: ``mode`` 'tokens' or 'chat', and a factory per episode script."""

    mode: str
    for_script: Callable[["EpisodeScript"], Any]
    tokenizer: Any | None
    label: str
    close: Callable[[], Any] | None = None


class EndpointChatPolicy:
    """``ChatPolicy`` over an :class:`agemem.llm.LLMClient` (vLLM server, DashScope)."""

    def __init__(self, client: "LLMClient") -> None:
        self.client = client

    async def chat(self, messages: Sequence[dict[str, str]], sampling_params: dict[str, Any]) -> str:
        reply = await self.client.chat(
            list(messages), temperature=sampling_params.get("temperature"), max_tokens=sampling_params.get("max_tokens")
        )
        return reply.text


def adapter_base_model(settings: "Settings", adapter_dir: Path) -> str:
    """The base a PEFT adapter was trained on: its recorded ``base_model_name_or_path`` when that is
    loadable here (a local path, e.g. the GGUF file), else ``train.model``."""
    import json

    recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if recorded and Path(recorded).exists():
        if recorded != settings.train.model:
            logger.info("adapter %s: rebuilding its recorded base %s (train.model is %s)", adapter_dir, recorded,
                        settings.train.model)
        return str(recorded)
    # The tiny random model records no path (it is re-created from its seed); hub names resolve as given.
    return settings.train.model


def load_checkpoint_model(settings: "Settings", model_path: Path, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) from an HF model directory or a PEFT adapter directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agemem.train.tiny_model import load_policy_model, load_tokenizer

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


def build_policy(settings: "Settings", model_path: Path | None = None) -> PolicyHandle:
    """The policy ``settings.eval.policy`` names; ``model_path`` overrides ``eval.model``."""
    cfg = settings.eval
    if cfg.policy == "scripted":
        from agemem.agent.scripted import ScriptedChatPolicy

        return PolicyHandle("chat", ScriptedChatPolicy, None, "scripted")
    if cfg.policy == "checkpoint":
        from agemem.train.local import resolve_device
        from agemem.train.token_server import LocalTokenServer

        path = model_path or (Path(cfg.model) if cfg.model else None)
        if path is None:
            raise ValueError("eval.policy=checkpoint needs a model path (--model or eval.model)")
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        device = resolve_device(settings.train.device)
        model, tokenizer = load_checkpoint_model(settings, Path(path), device)
        server = LocalTokenServer.from_settings(model, tokenizer, settings, device=device)
        return PolicyHandle("tokens", lambda script: server, tokenizer, f"checkpoint:{path}")
    from agemem.llm import LLMClient, build_backend
    from agemem.settings import LLMSettings

    if not cfg.model:
        raise ValueError(f"eval.policy={cfg.policy} needs eval.model (the endpoint's model name)")
    if cfg.policy == "openai" and not cfg.base_url:
        raise ValueError("eval.policy=openai needs eval.base_url (e.g. http://127.0.0.1:8000/v1)")
    section = LLMSettings(backend=cfg.policy, model=cfg.model, base_url=cfg.base_url, api_key=cfg.api_key,
                          timeout_s=cfg.timeout_s, concurrency=cfg.concurrency)
    key = settings.secret_for(section)
    client = LLMClient(build_backend(section, key), model=cfg.model, timeout_s=cfg.timeout_s,
                       max_retries=section.max_retries, backoff_s=section.backoff_s, concurrency=cfg.concurrency,
                       temperature=settings.episode.temperature, max_tokens=settings.episode.max_turn_tokens,
                       seed=section.seed)
    policy = EndpointChatPolicy(client)
    return PolicyHandle("chat", lambda script: policy, None, f"{cfg.policy}:{cfg.model}", close=client.aclose)


__all__ = ["EndpointChatPolicy", "PolicyHandle", "adapter_base_model", "build_policy", "load_checkpoint_model"]
