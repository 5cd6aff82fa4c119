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
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from agemem import doctor

if TYPE_CHECKING:
    from agemem.settings import Settings

logger = logging.getLogger(__name__)

#: Train settings that do not change what is learned step by step: where and how often it is saved,
#: how long it runs (a longer run resumes a shorter one), threads and device, labels.
NOT_SHAPING_TRAINING = frozenset({
    "total_steps", "total_epochs", "save_every", "keep_checkpoints", "output_dir", "torch_threads", "device",
    "experiment_name", "ray_address", "backend",
    "collapse_entropy_min", "collapse_grad_norm_max", "collapse_patience", "stop_on_collapse",
})
#: Train settings only GRPO reads: the warm start (SFT) before it is the same without them, so a
#: GRPO sweep (learning rate, KL, group size) reuses one warm start instead of retraining it.
GRPO_ONLY_TRAINING = frozenset({
    "rollouts_per_prompt", "tasks_per_batch", "lr", "kl_coef", "kl_loss_type", "clip_ratio", "norm_adv_by_std",
    "ppo_epochs", "rollout_engine", "rollout_tp", "gpu_memory_utilization", "agent_workers",
    "token_server_cache_tokens", "token_server_max_batch",
})
#: Other sections' fields that shape rollouts and rewards during training.
SHAPING_FIELDS: dict[str, tuple[str, ...]] = {
    "llm": ("backend", "model", "base_url", "temperature", "max_tokens", "seed"),
    "memory": ("embedding_model", "default_top_k", "max_top_k"),
}
_HASH_VERSION = 1
#: The warm start's report (teacher, kept trajectories, SFT loss) beside its model directory.
WARM_START_REPORT = "warm_start.json"

#: ``progress(step, finished, total)``: rollouts of the current training step that have finished.
RolloutProgress = Callable[[int, int, int], None]


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


def _shaping(settings: "Settings", skip_train: frozenset[str] = NOT_SHAPING_TRAINING) -> dict[str, Any]:
    dump = settings.model_dump(mode="json")
    picked: dict[str, Any] = {
        "version": _HASH_VERSION,
        "backend": settings.train.backend,
        "train": {k: v for k, v in dump["train"].items() if k not in skip_train},
        "episode": dump["episode"],
        "judge": {k: v for k, v in dump["judge"].items() if k != "api_key"},
    }
    for section, names in SHAPING_FIELDS.items():
        picked[section] = {name: dump[section][name] for name in names}
    return picked


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(settings: "Settings") -> str:
    """16 hex digits naming the training configuration (every setting that shapes what is learned)."""
    return _digest(_shaping(settings))


def inputs_hash(settings: "Settings") -> str:
    """The configuration plus how long it trains: the key of a finished training result."""
    warm = warm_start_hash(settings) if settings.warm_start.enabled else None
    return _digest({"config": config_hash(settings), "total_steps": settings.train.total_steps,
                    "total_epochs": settings.train.total_epochs, "warm_start": warm})


def warm_start_hash(settings: "Settings") -> str:
    """16 hex digits naming a warm-start configuration: what shapes the policy before GRPO, and the
    warm_start section."""
    warm = settings.model_dump(mode="json", exclude={"warm_start": {"torch_threads"}})["warm_start"]
    return _digest({"config": _shaping(settings, NOT_SHAPING_TRAINING | GRPO_ONLY_TRAINING), "warm_start": warm})


Algo = Literal["grpo", "sft"]


class CheckpointConfigError(ValueError):
    """A checkpoint directory holds another training configuration than the settings ask for."""


#: Written beside the local trainer's step directories: the settings that shaped those checkpoints.
CONFIG_FILE = "train_config.json"


def local_checkpoint_root(settings: "Settings") -> Path:
    """``<train.output_dir>/local/<config hash>``: the local trainer's checkpoints of this configuration."""
    return settings.path(settings.train.output_dir) / "local" / config_hash(settings)


def _differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append(f"{prefix}{key} {old!r} -> {new!r}")
    return out


def claim_checkpoint_root(root: Path, settings: "Settings") -> None:
    """Record which configuration ``root``'s checkpoints belong to, or refuse a different one.

    The directory name is already the configuration's hash; the stored copy guards against what a
    name cannot (a folder copied or renamed by hand, a change of what the hash covers).
    """
    current = json.loads(json.dumps(_shaping(settings), default=str))
    path = Path(root) / CONFIG_FILE
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        changed = _differences(stored, current)
        if changed:
            raise CheckpointConfigError(
                f"checkpoints in {root} were trained with another configuration ({'; '.join(changed[:3])}); "
                f"resuming them would mix two runs: delete {root} or set train.output_dir to a new folder")
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=2, sort_keys=True), encoding="utf-8")


def set_aside_checkpoints(settings: "Settings") -> Path | None:
    """Move this configuration's local checkpoints aside (``--force``: train from step 0, lose nothing)."""
    root = local_checkpoint_root(settings)
    if not root.exists():
        return None
    dest = root.with_name(f"{root.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    root.rename(dest)
    logger.info("--force: previous checkpoints of this configuration moved to %s; training from step 0", dest)
    return dest


def warm_start_dir(settings: "Settings") -> Path:
    """``<train.output_dir>/warm_start/<warm start hash>``: one directory per warm-start configuration
    (its ``model/`` is what GRPO starts from, its report beside it)."""
    return settings.path(settings.train.output_dir) / "warm_start" / warm_start_hash(settings)


def grpo_settings(settings: "Settings") -> "Settings":
    """The settings GRPO trains with: after a warm start (when enabled) ``train.model`` is the
    warm-started model, which is also GRPO's reference policy, and the warm start is done."""
    if not settings.warm_start.enabled:
        return settings
    train = settings.train.model_copy(update={"model": str(warm_start_dir(settings) / "model")})
    done = settings.warm_start.model_copy(update={"enabled": False})
    return settings.model_copy(update={"train": train, "warm_start": done})


def newest_local_policy(settings: "Settings") -> Path | None:
    """What evaluation loads from the newest local checkpoint of this configuration (None: none yet);
    with the warm start on, that is the newest checkpoint of the GRPO run that started from it."""
    from agemem.train.checkpoint import latest_checkpoint, policy_dirs  # torch: only when asked

    latest = latest_checkpoint(local_checkpoint_root(grpo_settings(settings)))
    if latest is None:
        return None
    model_dir, adapter_dir = policy_dirs(latest)
    return model_dir or adapter_dir


def run(settings: "Settings", episodes_path: Path, *, algo: Algo = "grpo", mlflow_run_id: str | None = None,
        progress: RolloutProgress | None = None) -> TrainResult:
    """Train (or resume) on the train split of ``episodes_path``.

    ``algo="sft"``: only the teacher warm start. ``"grpo"``: GRPO with ``train.backend``, after the
    warm start when ``warm_start.enabled`` (GRPO then starts from the warm-started model).
    ``progress(step, finished, total)``: rollouts finished in the current step (local trainer; verl
    reports its own progress).
    """
    if settings.train.backend == "verl":
        doctor.require(settings, "verl")  # before the warm start too: a missing GPU stack is one report, not a traceback
    if algo == "sft" or settings.warm_start.enabled:
        from agemem.train.sft import warm_start  # torch: only when training locally

        warm = warm_start(settings, Path(episodes_path))
        if algo == "sft":
            return warm
        settings = grpo_settings(settings)
    if settings.train.backend == "verl":
        from agemem.train.verl.launch import train_verl

        return train_verl(settings, Path(episodes_path), mlflow_run_id=mlflow_run_id)
    # The local trainer imports torch, transformers and peft: only when it is the one asked for.
    from agemem.train.local import train_local

    return train_local(settings, Path(episodes_path), mlflow_run_id=mlflow_run_id, progress=progress)


__all__ = [
    "CONFIG_FILE",
    "NOT_SHAPING_TRAINING",
    "WARM_START_REPORT",
    "Algo",
    "CheckpointConfigError",
    "RolloutProgress",
    "TrainResult",
    "claim_checkpoint_root",
    "config_hash",
    "inputs_hash",
    "local_checkpoint_root",
    "newest_local_policy",
    "run",
    "set_aside_checkpoints",
    "grpo_settings",
    "warm_start_dir",
    "warm_start_hash",
]
