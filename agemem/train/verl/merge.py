"""verl FSDP checkpoint -> Hugging Face model (and LoRA adapter) via verl's own model merger."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^global_step_(\d+)$")


def latest_verl_step_dir(checkpoint_root: Path) -> Path | None:
    """The newest ``global_step_N`` directory under verl's ``trainer.default_local_dir``."""
    root = Path(checkpoint_root)
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return max(steps)[1] if steps else None


def step_number(step_dir: Path) -> int:
    """N of a ``global_step_N`` directory (``ValueError`` for any other name)."""
    match = _STEP_DIR.match(Path(step_dir).name)
    if match is None:
        raise ValueError(f"{step_dir} is not a verl global_step_N directory")
    return int(match.group(1))


def record_adapter_base(adapter_dir: Path, base_model: str) -> None:
    """Write ``base_model_name_or_path`` into a merged ``lora_adapter/adapter_config.json``.

    verl's merger leaves it out (the base weights sit one directory up), so PEFT loaders and the
    registry would not know the base otherwise. An existing value is kept.
    """
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    if not config.get("base_model_name_or_path"):
        config["base_model_name_or_path"] = base_model
        path.write_text(json.dumps(config, indent=4))


def merge_command(actor_dir: Path, target_dir: Path, *, python: str | None = None) -> list[str]:
    """``python -m verl.model_merger merge --backend fsdp --local_dir ACTOR --target_dir OUT``."""
    return [
        python or sys.executable,
        "-m",
        "verl.model_merger",
        "merge",
        "--backend",
        "fsdp",
        "--local_dir",
        str(Path(actor_dir).resolve()),
        "--target_dir",
        str(Path(target_dir).resolve()),
    ]


def merge_checkpoint(checkpoint: Path, target_dir: Path, *, timeout_s: float = 3600.0) -> Path:
    """Merge a verl checkpoint into an HF model directory (LoRA runs also get ``lora_adapter/``).

    ``checkpoint`` is verl's ``default_local_dir`` (the newest step is taken), a
    ``global_step_N`` directory, or its ``actor`` directory. Raises ``FileNotFoundError`` when
    no actor checkpoint is found and ``RuntimeError`` with the merger's output when it fails.
    """
    checkpoint = Path(checkpoint)
    step_dir = checkpoint if _STEP_DIR.match(checkpoint.name) else latest_verl_step_dir(checkpoint)
    actor = checkpoint if checkpoint.name == "actor" else (step_dir / "actor" if step_dir else None)
    if actor is None or not actor.is_dir():
        raise FileNotFoundError(f"no verl actor checkpoint under {checkpoint}")
    cmd = merge_command(actor, target_dir)
    logger.info("merging %s -> %s", actor, target_dir)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"verl model merger failed ({proc.returncode}): {proc.stderr[-4000:]}")
    return Path(target_dir)
