"""The warm start on GPUs: kept teacher trajectories as verl multi-turn SFT data, trained by verl's SFT trainer.

Each segment of a kept teacher trajectory becomes one conversation row (``messages``: the context
when the segment opened, then every later turn; tool results are ``tool`` messages, tool calls
are the ``<tool_call>`` text of the assistant turns, the project's text protocol). verl's
``MultiTurnSFTDataset`` puts loss on every assistant message of a row. One difference from the
local warm start: in a segment opened by a context rewrite, the assistant turns that survive in
its prompt are trained again (the local trainer trains each model turn once).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from agemem.settings import offline_env
from agemem.train.verl.config import compose
from agemem.train.verl.launch import resolve_model, stream
from agemem.train.verl.merge import latest_verl_step_dir, merge_checkpoint
from agemem.train.verl.rows import write_rows

logger = logging.getLogger(__name__)


def sft_rows(trajectories: Sequence[Any]) -> list[dict[str, Any]]:
    """One ``{"messages": [...]}`` row per segment (with at least one assistant turn) of ``trajectories``."""
    rows = []
    for trajectory in trajectories:
        for seg in trajectory.result.segments:
            if any(m["role"] == "assistant" for m in seg.messages):
                rows.append({"messages": [{"role": m["role"], "content": m["content"]} for m in seg.messages],
                             "episode_id": trajectory.script.episode_id})
    return rows


def write_sft_parquet(trajectories: Sequence[Any], path: Path) -> Path:
    """The rows of :func:`sft_rows` as a parquet file verl's multi-turn SFT dataset reads (atomically)."""
    rows = sft_rows(trajectories)
    if not rows:
        raise ValueError("no teacher segment with an assistant turn to export")
    return write_rows(rows, path, what="verl SFT rows")


def sft_overrides(settings: Any, train_file: Path, model_path: str, output_dir: Path) -> list[str]:
    """Hydra overrides of verl's ``sft_trainer_engine`` config for the warm start."""
    t, w = settings.train, settings.warm_start
    out = [
        f"data.train_files={Path(train_file).resolve()}",
        "data.messages_key=messages",
        f"data.max_length={settings.episode.max_context_tokens + settings.episode.max_turn_tokens}",
        "data.truncation=left",
        f"model.path={model_path}",
        f"optim.lr={w.lr}",
        f"trainer.total_epochs={w.epochs}",
        f"trainer.default_local_dir={Path(output_dir).resolve()}",
        f"trainer.n_gpus_per_node={t.n_gpus_per_node}",
        f"trainer.nnodes={t.nnodes}",
        f"trainer.seed={t.seed}",
        "trainer.logger=[console]",
        "checkpoint.save_contents=[model,optimizer,extra,hf_model]",
    ]
    if t.lora_rank > 0:
        out += [f"model.lora_rank={t.lora_rank}", f"model.lora_alpha={t.lora_alpha}",
                f"model.target_modules={t.lora_target_modules}"]
    return out


def sft_command(overrides: list[str], *, nproc_per_node: int) -> list[str]:
    """``torchrun -m verl.trainer.sft_trainer`` with ``overrides`` (verl's SFT entry point)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", "verl.trainer.sft_trainer", *overrides]


def merged_model(step_dir: Path, target: Path) -> Path:
    """verl's merger on an SFT checkpoint, LoRA folded into the weights: the model GRPO starts from."""
    merged = merge_checkpoint(step_dir, target.with_name(target.name + "-merger"))
    adapter = merged / "lora_adapter"
    if not (adapter / "adapter_config.json").is_file():
        return merged
    from peft import PeftModel  # GPU machines: the warm-started policy is one plain HF model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(merged)), str(adapter))
    model.merge_and_unload().save_pretrained(target)
    AutoTokenizer.from_pretrained(str(merged)).save_pretrained(target)
    return target


def train_sft_verl(settings: Any, kept: Sequence[Any], work: Path, *, sink: Any = None) -> Path:
    """The warm start on GPUs: export ``kept``, run verl's SFT trainer, return the merged HF model."""
    sink = sink or (lambda line: logger.info("verl sft | %s", line))
    data = write_sft_parquet(kept, work / "sft.parquet")
    model_path, _ = resolve_model(settings, download=True)
    overrides = sft_overrides(settings, data, model_path or settings.train.model, work / "checkpoints")
    compose(overrides, config_name="sft_trainer_engine")  # a bad key fails here, not on the GPUs
    cmd = sft_command(overrides, nproc_per_node=max(1, settings.train.n_gpus_per_node))
    code = stream(cmd, env={**os.environ, **offline_env()}, sink=sink)
    if code != 0:
        raise RuntimeError(f"verl SFT trainer failed with exit code {code} (command: {' '.join(cmd[:6])} ...)")
    step_dir = latest_verl_step_dir(work / "checkpoints")
    if step_dir is None:
        raise RuntimeError(f"verl SFT trainer wrote no global_step_* under {work / 'checkpoints'}")
    return merged_model(step_dir, work / "model")


__all__ = ["merged_model", "sft_command", "sft_overrides", "sft_rows", "train_sft_verl", "write_sft_parquet"]
