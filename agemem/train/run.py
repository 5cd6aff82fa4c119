"""Training, whatever the backend: ``run(settings, episodes_path) -> TrainResult``.

The CLI (``agemem train``) and the Prefect flow call :func:`run`; it dispatches to the local
trainer (:func:`agemem.train.local.train_local`, CPU / one GPU) or to verl
(:func:`agemem.train.verl.launch.train_verl`, GPUs and Ray). Both return a :class:`TrainResult`.

:func:`config_hash` is the one definition of "the same training configuration": it names the
local trainer's checkpoint directory (so a changed seed or learning rate never resumes another
configuration's checkpoint) and, with the step count, keys the Prefect cache of the train task.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from agemem.settings import Settings

#: Train settings that do not change what is learned step by step: where and how often it is saved,
#: how long it runs (a longer run resumes a shorter one), threads and device, labels.
NOT_SHAPING_TRAINING = frozenset({
    "total_steps", "total_epochs", "save_every", "keep_checkpoints", "output_dir", "torch_threads", "device",
    "experiment_name", "ray_address", "backend",
    "collapse_entropy_min", "collapse_grad_norm_max", "collapse_patience", "stop_on_collapse",
})
#: Other sections' fields that shape rollouts and rewards during training.
SHAPING_FIELDS: dict[str, tuple[str, ...]] = {
    "llm": ("backend", "model", "base_url", "temperature", "max_tokens", "seed"),
    "memory": ("embedding_model", "default_top_k", "max_top_k"),
}
_HASH_VERSION = 1
#: The warm start's report (teacher, kept trajectories, SFT loss) beside its model directory.
WARM_START_REPORT = "warm_start.json"


@dataclass
class TrainResult:
    """Where the trained policy is and what the run did (the same shape for every backend).

    ``model_dir``: an HF model directory holding the trained weights (None when only an adapter
    holds them, as after verl's merger on a LoRA run, whose directory has the *base* weights);
    ``adapter_dir``: the LoRA adapter (None for a full fine-tune); ``checkpoint_dir``: the newest
    checkpoint (the local trainer's HF model directory when one was written, verl's
    ``global_step_N``).
    """

    backend: str
    checkpoint_dir: Path
    model_dir: Path | None
    adapter_dir: Path | None
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    config_hash: str = ""

    @property
    def policy_path(self) -> Path:
        """What evaluation loads: the trained HF model, else the adapter (its base is recorded in it)."""
        return self.model_dir or self.adapter_dir or self.checkpoint_dir

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("checkpoint_dir", "model_dir", "adapter_dir"):
            out[key] = str(out[key]) if out[key] is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainResult":
        paths = {k: Path(data[k]) if data.get(k) else None for k in ("checkpoint_dir", "model_dir", "adapter_dir")}
        return cls(backend=data["backend"], steps=int(data["steps"]), history=list(data.get("history") or []),
                   config_hash=str(data.get("config_hash", "")), **paths)  # type: ignore[arg-type]


def _shaping(settings: "Settings") -> dict[str, Any]:
    dump = settings.model_dump(mode="json")
    picked: dict[str, Any] = {
        "version": _HASH_VERSION,
        "backend": settings.train.backend,
        "train": {k: v for k, v in dump["train"].items() if k not in NOT_SHAPING_TRAINING},
        "episode": dump["episode"],
        "judge": {k: v for k, v in dump["judge"].items() if k != "api_key"},
    }
    for section, names in SHAPING_FIELDS.items():
        picked[section] = {name: dump[section][name] for name in names}
    return picked


def config_hash(settings: "Settings") -> str:
    """16 hex digits naming the training configuration (every setting that shapes what is learned)."""
    text = json.dumps(_shaping(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def inputs_hash(settings: "Settings") -> str:
    """The configuration plus how long it trains: the key of a finished training result."""
    warm = warm_start_hash(settings) if settings.warm_start.enabled else None
    text = json.dumps({"config": config_hash(settings), "total_steps": settings.train.total_steps,
                       "total_epochs": settings.train.total_epochs, "warm_start": warm}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def warm_start_hash(settings: "Settings") -> str:
    """16 hex digits naming a warm-start configuration (the policy's base configuration plus the warm_start section)."""
    text = json.dumps({"config": config_hash(settings), "warm_start": settings.model_dump(mode="json")["warm_start"]},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


Algo = Literal["grpo", "sft"]


def run(settings: "Settings", episodes_path: Path, *, algo: Algo = "grpo",
        mlflow_run_id: str | None = None) -> TrainResult:
    """Train (or resume) on the train split of ``episodes_path``.

    ``algo="sft"``: only the teacher warm start. ``"grpo"``: GRPO with ``train.backend``, after the
    warm start when ``warm_start.enabled`` (GRPO then starts from the warm-started model).
    """
    if algo == "sft" or settings.warm_start.enabled:
        from agemem.train.sft import after_warm_start, warm_start  # torch: only when training locally

        warm = warm_start(settings, Path(episodes_path))
        if algo == "sft":
            return warm
        settings = after_warm_start(settings, warm)
    if settings.train.backend == "verl":
        from agemem.train.verl.launch import train_verl

        return train_verl(settings, Path(episodes_path), mlflow_run_id=mlflow_run_id)
    # The local trainer imports torch, transformers and peft: only when it is the one asked for.
    from agemem.train.local import train_local

    return train_local(settings, Path(episodes_path), mlflow_run_id=mlflow_run_id)


__all__ = ["NOT_SHAPING_TRAINING", "WARM_START_REPORT", "Algo", "TrainResult", "config_hash", "inputs_hash", "run", "warm_start_hash"]
