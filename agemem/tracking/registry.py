"""MLflow model registry: model versions, aliases ``candidate`` / ``champion`` and the champion gate.

Registration logs the LoRA adapter (plus the merged HF model when the base cannot be re-created by
name, e.g. the tiny random smoke model) as the memory agent's MLflow model
(:class:`~agemem.tracking.agent_model.AgememAgent`, a ``ResponsesAgent``) whose artifacts are those
directories: ``mlflow models serve -m models:/agemem-policy@champion`` serves the agent.
Version tags carry the headline eval metrics (the rest are metrics of the logged model), whether
the weights are random, and the adapter's content hash; the hash makes registration idempotent
(same content -> the same version, nothing new). Alias ``candidate`` always points at the newest
registered content; ``champion`` moves only when the candidate beats the current champion on
``tracking.gate_metric`` by more than ``tracking.gate_min_delta``, and never to a random-weight
model unless ``tracking.crown_random_weights``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from agemem.digests import update_with_file
from agemem.tracking.runs import configure, finite_metrics
from agemem.tracking.uris import resolve_model_uri
from agemem.train.models import RANDOM_WEIGHTS_NOTE, has_random_weights

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from agemem.settings import Settings

logger = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
HASH_TAG = "agemem.adapter_sha256"
RANDOM_TAG = "agemem.random_weights"
METRIC_TAG_PREFIX = "eval."
#: Eval aggregates kept as version tags (the registry's list view shows tags; ~56 flooded it).
#: The gate metric is always added; every aggregate is also logged as a metric of the version's model.
TAGGED_METRICS = ("n", "judge_score", "em", "f1", "memory_quality")


# -------------------------------------------------------------------------------- registration
def content_hash(paths: list[Path]) -> str:
    """sha256 over the relative names and bytes of every file under ``paths`` (order-independent)."""
    digest = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            # README/model cards carry step metrics text; identical weights must hash the same anyway.
            if file.name.lower() == "readme.md":
                continue
            digest.update(str(file.relative_to(root) if root.is_dir() else file.name).encode())
            update_with_file(digest, file)
    return digest.hexdigest()


@dataclass
class Registration:
    """The outcome of :func:`register_model`."""

    name: str
    version: str
    aliases: list[str]
    reused: bool
    champion_moved: bool
    previous_champion: str | None
    gate: str
    content_sha256: str
    model_uri: str
    tags: dict[str, str] = field(default_factory=dict)
    random_weights: bool = False


def _base_reloadable(settings: "Settings", adapter_dir: Path | None) -> bool:
    """Whether an adapter's base can be re-created elsewhere by name: a hub name, not a local path
    (a warm start, a GGUF file) and not random weights."""
    base = settings.train.model
    if adapter_dir is not None and (Path(adapter_dir) / "adapter_config.json").is_file():
        base = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path") or base
    return not has_random_weights(base) and not Path(base).expanduser().exists()


def _metric_tags(metrics: Mapping[str, Any], gate_metric: str) -> dict[str, str]:
    keep = (*TAGGED_METRICS, gate_metric)
    return {f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in finite_metrics(metrics).items() if k in keep}


def _log_model_metrics(client: "MlflowClient", run_id: str | None, model_id: str | None,
                       metrics: Mapping[str, Any]) -> None:
    """Every eval aggregate as a metric of the logged model (shown on its page) and of the run."""
    from mlflow.entities import Metric

    if not run_id:
        return
    now = int(time.time() * 1000)
    batch = [Metric(key=f"{METRIC_TAG_PREFIX}{k}", value=v, timestamp=now, step=0, model_id=model_id, run_id=run_id)
             for k, v in finite_metrics(metrics).items()]
    for start in range(0, len(batch), 1000):  # MLflow caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=batch[start:start + 1000])


def version_description(sha: str, random_weights: bool) -> str:
    text = f"adapter sha256 {sha}"
    return f"{RANDOM_WEIGHTS_NOTE} {text}" if random_weights else text


def _gate_value(version: Any, metric: str) -> float | None:
    raw = (version.tags or {}).get(f"{METRIC_TAG_PREFIX}{metric}")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _alias_version(client: "MlflowClient", name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def apply_gate(settings: "Settings", name: str, version: str) -> tuple[bool, str | None, str]:
    """Move ``champion`` to ``version`` if it beats the current champion on the gate metric.

    Returns (moved, previous champion version, a one-line reason).
    """
    client = configure(settings)
    metric, delta = settings.tracking.gate_metric, settings.tracking.gate_min_delta
    candidate = client.get_model_version(name, version)
    champion = _alias_version(client, name, CHAMPION)
    cand_value = _gate_value(candidate, metric)
    if (candidate.tags or {}).get(RANDOM_TAG) == "true" and not settings.tracking.crown_random_weights:
        return False, str(champion.version) if champion else None, (
            f"version {version} has random weights ({settings.train.model}): not crowned champion; "
            "set tracking.crown_random_weights=true to allow it")
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        return True, None, f"no champion yet: version {version} becomes champion"
    if str(champion.version) == str(version):
        return False, str(champion.version), f"version {version} is already champion"
    champ_value = _gate_value(champion, metric)
    if cand_value is None:
        return False, str(champion.version), f"candidate has no {metric}; champion stays {champion.version}"
    if champ_value is None or cand_value > champ_value + delta:
        client.set_registered_model_alias(name, CHAMPION, version)
        return True, str(champion.version), (
            f"{metric} {cand_value:.4f} beats champion v{champion.version} ({champ_value}) by > {delta}")
    return False, str(champion.version), (
        f"{metric} {cand_value:.4f} does not beat champion v{champion.version} ({champ_value:.4f}) by > {delta}")


def registration_artifacts(settings: "Settings", adapter_dir: Path | None, model_dir: Path | None) -> dict[str, str]:
    """What a version carries: the adapter, plus the merged model when the base cannot be re-created
    by name (or there is no adapter); ``FileNotFoundError`` names a missing directory."""
    artifacts: dict[str, str] = {}
    if adapter_dir is not None:
        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
        artifacts["adapter"] = str(adapter_dir)
    want_model = settings.tracking.log_merged_model
    if want_model is None:
        want_model = adapter_dir is None or not _base_reloadable(settings, adapter_dir)
    if want_model:
        if model_dir is None or not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"a merged model directory is needed for registration, got {model_dir}")
        artifacts["model"] = str(model_dir)
    if not artifacts:
        raise ValueError("nothing to register: give adapter_dir or model_dir")
    return artifacts


def _log_version(client: "MlflowClient", settings: "Settings", name: str, artifacts: dict[str, str],
                 tags: dict[str, str], run_id: str | None, metrics: Mapping[str, Any]) -> Any:
    """Log the agent model (:mod:`agemem.tracking.agent_model`) under ``run_id``, its eval metrics, and
    create its version (alias ``candidate``)."""
    import mlflow

    with mlflow.start_run(run_id=run_id) if run_id else contextlib.nullcontext():
        from agemem.tracking.agent_model import log_agent_model  # mlflow.pyfunc: only when logging

        info = log_agent_model(artifacts, settings)
    _log_model_metrics(client, run_id, info.model_id, metrics)
    version = client.create_model_version(
        name, source=info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id,
        description=version_description(tags[HASH_TAG], tags.get(RANDOM_TAG) == "true"),
    )
    client.set_registered_model_alias(name, CANDIDATE, version.version)
    logger.info("registered %s v%s (%s)", name, version.version, info.model_uri)
    return version


def register_model(
    settings: "Settings",
    *,
    adapter_dir: Path | None,
    model_dir: Path | None = None,
    metrics: Mapping[str, Any],
    run_id: str | None = None,
) -> Registration:
    """Register the trained policy (idempotent by content hash), tag it, move the aliases.

    ``adapter_dir``: the LoRA adapter (``None`` for a full fine-tune, then ``model_dir`` is required).
    ``model_dir``: the merged HF model; logged when the base cannot be re-created by name (or no
    adapter). ``metrics``: the eval aggregates: a few (:data:`TAGGED_METRICS` and the gate metric)
    become version tags ``eval.<name>``, all of them metrics of the logged model and of ``run_id``.
    A random-weight model is tagged ``agemem.random_weights=true`` and labelled in its description.
    ``run_id``: the run the model is logged under (the pipeline's register stage run).
    """
    from mlflow.exceptions import MlflowException

    artifacts = registration_artifacts(settings, adapter_dir, model_dir)
    sha = content_hash([Path(p) for p in artifacts.values()])
    client = configure(settings)
    name = settings.tracking.registered_model
    try:
        client.create_registered_model(name, description="AgeMem policy (LoRA adapter / merged model).")
    except MlflowException:
        pass  # already exists
    random = has_random_weights(settings.train.model) or any(has_random_weights(p) for p in artifacts.values())
    tags = {HASH_TAG: sha, RANDOM_TAG: str(random).lower(), **_metric_tags(metrics, settings.tracking.gate_metric)}
    existing = client.search_model_versions(f"name='{name}' and tags.`{HASH_TAG}`='{sha}'")
    reused = bool(existing)
    if existing:
        version = max(existing, key=lambda v: int(v.version))
        for key, value in tags.items():
            if key not in (version.tags or {}):
                client.set_model_version_tag(name, version.version, key, value)
        logger.info("model content %s already registered as %s v%s; reusing it", sha[:12], name, version.version)
    else:
        version = _log_version(client, settings, name, artifacts, tags, run_id, metrics)
    moved, previous, gate = apply_gate(settings, name, str(version.version))
    current = client.get_model_version(name, str(version.version))
    return Registration(
        name=name,
        version=str(version.version),
        aliases=sorted(current.aliases or []),
        reused=reused,
        champion_moved=moved,
        previous_champion=previous,
        gate=gate,
        content_sha256=sha,
        model_uri=f"models:/{name}/{version.version}",
        tags=dict(current.tags or {}),
        random_weights=(current.tags or {}).get(RANDOM_TAG) == "true",
    )


def resolve_alias(settings: "Settings", alias: str = CHAMPION) -> tuple[str, Path]:
    """Download the artifacts of ``<registered_model>@alias``; returns (version, local model dir).

    The returned directory is the merged model when one was logged, else the adapter.
    """
    resolved = resolve_model_uri(settings, f"models:/{settings.tracking.registered_model}@{alias}")
    return str(resolved.version), resolved.path


__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "Registration",
    "apply_gate",
    "content_hash",
    "register_model",
    "resolve_alias",
]
