"""The policy model for the local trainer and evaluation: an HF model, a GGUF file, or a tiny random Qwen2.

``train.model`` may be
- ``tiny-random-qwen2``: a Qwen2-architecture model built from a config (random weights, NOT a
  trained model) with the shipped Qwen2.5 tokenizer, so the whole training path runs on CPU in
  seconds. Its directory carries a README and a config flag saying so;
- a ``.gguf`` file, or a folder holding exactly one ``.gguf`` (and no ``config.json``): loaded
  offline through transformers' GGUF support (the ``gguf`` extra), dequantised to a normal
  float model, so checkpoints saved from it are ordinary HF directories;
- an HF hub name or model directory.
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


#: The short label every number about a random-weight model carries (reports, artifacts, tags, logs).
RANDOM_WEIGHTS_LABEL = "RANDOM WEIGHTS"


def has_random_weights(model_or_dir: Any) -> bool:
    """Whether a loaded model, the tiny model's name, or a saved model / adapter directory started
    from random weights (checkpoints and warm starts of the tiny model keep the label).

    Saved models carry ``agemem_random_weights`` in ``config.json``; an adapter of the tiny model
    records no base (it was built from a config, not loaded from a name or path), or a base that
    carries the flag itself (a warm start of the tiny model).
    """
    if not isinstance(model_or_dir, (str, Path)):
        return bool(getattr(getattr(model_or_dir, "config", None), "agemem_random_weights", False))
    if is_tiny(str(model_or_dir)):
        return True
    folder = Path(model_or_dir).expanduser()
    try:
        if (folder / "config.json").is_file():
            return bool(json.loads((folder / "config.json").read_text()).get("agemem_random_weights"))
        if (folder / "adapter_config.json").is_file():
            base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
            return base is None or has_random_weights(str(base))
    except (OSError, ValueError):
        return False
    return False


def resolve_device(setting: str) -> str:
    """``train.device``: ``auto`` is CUDA when torch sees a GPU, else the CPU."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def is_tiny(model: str) -> bool:
    return model == TINY_MODEL


class ModelSourceError(ValueError):
    """``train.model`` (or a recorded base model) names something that cannot be loaded."""


def gguf_source(model: str) -> tuple[str, str] | None:
    """``(folder, file name)`` when ``model`` is a GGUF file or a folder holding exactly one; else None.

    A folder with a ``config.json`` is an HF model directory even if a GGUF lies beside it.
    """
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(f"train.model {model!r} is a file but not a .gguf; give a GGUF file or a model "
                                   "directory")
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p.name for p in path.glob("*.gguf"))
        if len(found) == 1:
            return str(path), found[0]
        if len(found) > 1:
            raise ModelSourceError(f"{model} holds {len(found)} .gguf files ({', '.join(found)}); set train.model "
                                   "to the one to use")
    return None


def _gguf_special_tokens(tokenizer: Any, folder: str, name: str) -> None:
    """Take eos/pad from the GGUF's own metadata (via the model config).

    transformers' GGUF tokenizer conversion can name the wrong eos (SmolLM2's came out as
    ``<|im_start|>``), and generation and the engine's turn closing both stop on eos.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for attr in ("eos", "pad"):
        token_id = getattr(config, f"{attr}_token_id", None)
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if token_id is not None and 0 <= int(token_id) < len(tokenizer):
            setattr(tokenizer, f"{attr}_token", tokenizer.convert_ids_to_tokens(int(token_id)))


def load_tokenizer(settings: Settings, model: str | None = None) -> Any:
    """The policy tokenizer: the shipped Qwen2.5 tokenizer for the tiny model, else the model's own.

    ``model`` overrides ``train.model`` (evaluation rebuilding a checkpoint's recorded base).
    """
    from transformers import AutoTokenizer

    model = model or settings.train.model
    if is_tiny(model):
        tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    elif (gguf := gguf_source(model)) is not None:
        tokenizer = AutoTokenizer.from_pretrained(gguf[0], gguf_file=gguf[1])
        _gguf_special_tokens(tokenizer, *gguf)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model)
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


def load_policy_model(settings: Settings, tokenizer: Any, *, device: str, model: str | None = None) -> Any:
    """The base causal LM on ``device`` in float32 (CPU) or bfloat16 (a GPU that supports it, else float32).

    ``model`` overrides ``train.model``. The returned model's ``name_or_path`` is that source
    (the GGUF file itself for GGUF), so a LoRA adapter's ``base_model_name_or_path`` names the base.
    """
    import torch
    from transformers import AutoModelForCausalLM

    source = model or settings.train.model
    if is_tiny(source):
        return build_tiny_qwen2(settings, tokenizer).to(device)
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    gguf = gguf_source(source)
    if gguf is not None:
        logger.info("loading %s from GGUF (dequantised to %s)", gguf[1], dtype)
        loaded = AutoModelForCausalLM.from_pretrained(gguf[0], gguf_file=gguf[1], dtype=dtype)
        loaded.name_or_path = str(Path(gguf[0], gguf[1]))
    else:
        loaded = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return loaded.to(device)


def base_model_lines(model: str) -> list[str]:
    """Model-card lines naming the base model (and that a GGUF base was dequantised)."""
    lines = [f"- base model: `{model}`"]
    if not is_tiny(model) and gguf_source(model) is not None:
        lines.append("- base loaded from GGUF and dequantised; this checkpoint is a plain HF model")
    return lines


def model_card_lines(model: str) -> list[str]:
    """Model-card lines naming the base model, with the random-weights label when it applies."""
    lines = base_model_lines(model)
    if has_random_weights(model):
        lines += ["", f"**{RANDOM_WEIGHTS_NOTE}**"]
    return lines


def write_model_card(directory: Path, settings: Settings, *, step: int, extra: dict[str, Any] | None = None) -> None:
    """A README.md beside a saved checkpoint, labelling random weights clearly."""
    lines = [f"# agemem checkpoint (step {step})", "", *model_card_lines(settings.train.model)]
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
