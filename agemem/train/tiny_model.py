"""The policy model for the local trainer: a real HF checkpoint, or a tiny random Qwen2 for smoke runs.

``tiny-random-qwen2`` is a Qwen2-architecture model built from a config (random weights, NOT a
trained model) with the shipped Qwen2.5 tokenizer, so the whole training path runs on CPU in
seconds. Its directory carries a README and a config flag saying so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from agemem.assets import TOKENIZER_DIR
from agemem.settings import Settings

logger = logging.getLogger(__name__)

TINY_MODEL = "tiny-random-qwen2"
RANDOM_WEIGHTS_NOTE = (
    "RANDOM WEIGHTS: 'tiny-random-qwen2' is a Qwen2-architecture model initialised from a config with "
    "random weights for smoke tests of the training path. It is not a trained language model."
)


def is_tiny(model: str) -> bool:
    return model == TINY_MODEL


def load_tokenizer(settings: Settings) -> Any:
    """The policy tokenizer: the shipped Qwen2.5 tokenizer for the tiny model, else the model's own."""
    from transformers import AutoTokenizer

    source = str(TOKENIZER_DIR) if is_tiny(settings.train.model) else settings.train.model
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tiny_qwen2(settings: Settings, tokenizer: Any) -> Any:
    """A randomly initialised Qwen2ForCausalLM sized by ``train.tiny_*`` (seeded)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden = settings.train.tiny_hidden_size
    heads = max(1, hidden // 16)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=settings.train.tiny_num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max(4096, settings.episode.max_context_tokens + settings.episode.max_turn_tokens),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.agemem_random_weights = True  # travels into every saved config.json
    config.agemem_note = RANDOM_WEIGHTS_NOTE
    torch.manual_seed(settings.train.seed)
    model = Qwen2ForCausalLM(config)
    logger.warning("%s (hidden=%d, layers=%d)", RANDOM_WEIGHTS_NOTE, hidden, settings.train.tiny_num_layers)
    return model


def load_policy_model(settings: Settings, tokenizer: Any, *, device: str) -> Any:
    """The base causal LM on ``device`` in float32 (CPU) or bfloat16 (GPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    if is_tiny(settings.train.model):
        model = build_tiny_qwen2(settings, tokenizer)
    else:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(settings.train.model, dtype=dtype)
    return model.to(device)


def write_model_card(directory: Path, settings: Settings, *, step: int, extra: dict[str, Any] | None = None) -> None:
    """A README.md beside a saved checkpoint, labelling random weights clearly."""
    lines = [f"# agemem checkpoint (step {step})", "", f"- base model: `{settings.train.model}`"]
    if is_tiny(settings.train.model):
        lines += ["", f"**{RANDOM_WEIGHTS_NOTE}**"]
    lines += ["", "```json", json.dumps(extra or {}, indent=2, default=str), "```", ""]
    (directory / "README.md").write_text("\n".join(lines))


def materialise_tiny_model(settings: Settings, directory: Path) -> Path:
    """Save the tiny random model + tokenizer as an HF directory (for verl, which wants a path)."""
    tokenizer = load_tokenizer(settings)
    model = build_tiny_qwen2(settings, tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_model_card(directory, settings, step=0)
    return directory
