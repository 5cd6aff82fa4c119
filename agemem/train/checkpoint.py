"""Local-trainer checkpoints: HF model + LoRA adapter + trainer state, written atomically per step.

Layout under ``<train.output_dir>/local``::

    step_000002/
      adapter/            peft adapter (LoRA runs)
      model/              HF model (full fine-tune: every save; LoRA: merged, on the final step)
      trainer_state.pt    step, optimizer state, RNG states, history
      README.md           what this is (random weights are labelled)

A step directory is built under a temporary name and renamed into place, so a killed run never
leaves a half-written checkpoint that resume would pick up.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

_STEP = re.compile(r"^step_(\d{6})$")
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainerState:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    optimizer: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete step directory under ``root`` (None when there is none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / STATE_FILE).exists()]
    return max(found)[1] if found else None


def policy_dirs(directory: Path) -> tuple[Path | None, Path | None]:
    """(HF model dir, LoRA adapter dir) of a step directory; either is None when not written.

    A LoRA run writes the merged HF model on its final step only; earlier steps carry the adapter.
    """
    model_dir, adapter = Path(directory) / "model", Path(directory) / "adapter"
    return (model_dir if (model_dir / "config.json").is_file() else None,
            adapter if adapter.is_dir() else None)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Base-model weights with the LoRA update folded in, keyed as the plain HF model expects."""
    model.merge_adapter()
    try:
        state = {}
        for key, value in model.get_base_model().state_dict().items():
            if "lora_" in key:
                continue
            state[key.replace(".base_layer.", ".")] = value.detach().to("cpu", copy=True)
        return state
    finally:
        model.unmerge_adapter()


def save_checkpoint(
    root: Path,
    *,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    write_model: bool,
    card: str,
    keep: int = 0,
) -> Path:
    """Write step ``state.step`` atomically; returns its directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, state.step)
    tmp = root / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if is_peft(model):
        model.save_pretrained(tmp / "adapter")
        if write_model:
            base = model.get_base_model()
            base.save_pretrained(tmp / "model", state_dict=merged_state_dict(model))
            tokenizer.save_pretrained(tmp / "model")
    else:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
    torch.save(
        {"step": state.step, "history": state.history, "optimizer": optimizer.state_dict(), "rng": rng_state()},
        tmp / STATE_FILE,
    )
    (tmp / "README.md").write_text(card)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    logger.info("checkpoint step %d -> %s", state.step, final)
    prune(root, keep=keep)
    return final


def prune(root: Path, *, keep: int) -> None:
    """Delete all but the newest ``keep`` step directories (0 keeps everything)."""
    if keep <= 0:
        return
    steps = sorted((int(m.group(1)), p) for p in Path(root).iterdir() if (m := _STEP.match(p.name)))
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(directory: Path, *, model: Any, optimizer: torch.optim.Optimizer, device: str) -> TrainerState:
    """Restore weights, optimizer state and RNG from a step directory; returns its state."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if is_peft(model):
        from peft import set_peft_model_state_dict

        weights = load_file(str(directory / "adapter" / "adapter_model.safetensors"), device=device)
        set_peft_model_state_dict(model, weights)
    else:
        weights = {}
        for file in sorted((directory / "model").glob("*.safetensors")):
            weights.update(load_file(str(file), device=device))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # Tied embeddings are saved once; anything else missing means a different architecture.
        real_missing = [k for k in missing if k != "lm_head.weight"]
        if real_missing or unexpected:
            raise ValueError(f"checkpoint {directory} does not match the model: missing={real_missing[:5]}, "
                             f"unexpected={unexpected[:5]}")
    raw = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(raw["optimizer"])
    restore_rng(raw["rng"])
    return TrainerState(step=int(raw["step"]), history=list(raw.get("history", [])))

def append_metrics(root: Path, metrics: dict[str, float]) -> None:
    """One step's metrics as a line of ``<root>/metrics.jsonl``."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(metrics) + "\n")


def rewrite_metrics(root: Path, history: list[dict[str, float]]) -> None:
    """On resume, ``metrics.jsonl`` is made to match the checkpoint's history (no duplicate steps)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(m) + "\n" for m in history))
    tmp.replace(root / "metrics.jsonl")
