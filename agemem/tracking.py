"""MLflow tracking and registry: pipeline runs, stage runs, model versions and the champion gate.

Everything goes through MLflow's own APIs (``MlflowClient`` and the ``pyfunc`` flavour); the store
is whatever ``settings.tracking_uri`` names (a sqlite file under ``runs_dir`` by default, or an
MLflow server). Layout:

- one parent run per pipeline run (tag ``agemem.kind=pipeline``), one child run per stage
  (``mlflow.parentRunId`` set, tag ``agemem.stage``);
- params: the settings, flattened (``train.lr``), secrets masked by ``Settings.public_dict``;
- registration: the LoRA adapter (plus the merged HF model when the base cannot be re-created by
  name, e.g. the tiny random smoke model) logged as a pyfunc model whose artifacts are those
  directories. Version tags carry the eval metrics and the adapter's content hash; the hash makes
  registration idempotent (same content -> the same version, nothing new). Alias ``candidate``
  always points at the newest registered content; ``champion`` moves only when the candidate
  beats the current champion on ``tracking.gate_metric`` by more than ``tracking.gate_min_delta``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from agemem.digests import update_with_file

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from agemem.settings import Settings

logger = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
HASH_TAG = "agemem.adapter_sha256"
METRIC_TAG_PREFIX = "eval."
_MAX_PARAM_LEN = 6000  # MLflow's param value limit (8000 on recent stores); long lists are cut


# ------------------------------------------------------------------------------------- setup
def artifact_root(settings: "Settings") -> Path:
    """Where a local (sqlite) store keeps artifacts: ``<runs_dir>/mlartifacts``."""
    return settings.runs_dir / "mlartifacts"


def configure(settings: "Settings") -> "MlflowClient":
    """Point MLflow (fluent API and a client) at the settings' store; create the experiment.

    MLFLOW_TRACKING_URI wins only when ``tracking.tracking_uri`` is unset (settings are the one
    source of configuration; the env var is MLflow's own convention and users expect it to work).
    """
    import mlflow
    from mlflow import MlflowClient

    uri = settings.tracking_uri
    if uri.startswith("sqlite:"):
        settings.runs_dir.mkdir(parents=True, exist_ok=True)
    # mlflow.set_*_uri also export MLFLOW_*_URI; left there, the first store configured would
    # shadow the settings of every later call in this process (read above as the user's choice).
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = settings.tracking.experiment
    if client.get_experiment_by_name(name) is None:
        # A file store location only makes sense for a local store; a server picks its own.
        location = artifact_root(settings).as_uri() if uri.startswith(("sqlite:", "file:")) or "://" not in uri else None
        try:
            client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - created concurrently by another process: fine
            if client.get_experiment_by_name(name) is None:
                raise
    return client


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-5}}`` -> ``{"train.lr": "1e-05"}`` (strings, cut to MLflow's limit)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = "" if value is None else str(value)
            out[name] = text[:_MAX_PARAM_LEN]
    return out


def settings_params(settings: "Settings") -> dict[str, str]:
    """The settings as flat MLflow params; secrets stay masked (``public_dict``)."""
    return flatten(settings.public_dict())


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key.replace("@", "_at_")] = number
    return out


def log_metrics(settings: "Settings", run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log numeric metrics (non-numbers and NaN/inf skipped) in one batch."""
    from mlflow.entities import Metric

    client = configure(settings)
    now = int(time.time() * 1000)
    batch = [Metric(key=k, value=v, timestamp=now, step=step or 0) for k, v in _finite(metrics).items()]
    if batch:
        client.log_batch(run_id, metrics=batch)


def log_params(settings: "Settings", run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    client = configure(settings)
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[start : start + 100])


# ---------------------------------------------------------------------------------------- runs
def start_pipeline_run(settings: "Settings", *, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> str:
    """Create the parent run of one pipeline run, with the settings as params; returns its id."""
    client = configure(settings)
    exp = client.get_experiment_by_name(settings.tracking.experiment)
    run = client.create_run(
        exp.experiment_id,
        run_name=run_name or f"pipeline-{settings.profile}",
        tags={"agemem.kind": "pipeline", "agemem.profile": settings.profile, **(tags or {})},
    )
    log_params(settings, run.info.run_id, settings_params(settings))
    return run.info.run_id


def end_run(settings: "Settings", run_id: str, *, status: str = "FINISHED") -> None:
    configure(settings).set_terminated(run_id, status=status)


@contextlib.contextmanager
def stage_run(settings: "Settings", parent_run_id: str | None, stage: str) -> Iterator[str]:
    """A child run for one stage (a top-level run when there is no parent); FAILED on error."""
    client = configure(settings)
    exp = client.get_experiment_by_name(settings.tracking.experiment)
    tags = {"agemem.kind": "stage", "agemem.stage": stage}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp.experiment_id, run_name=stage, tags=tags)
    try:
        yield run.info.run_id
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


def log_artifacts(settings: "Settings", run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    """Attach files (e.g. the eval report and plot) to a run; missing files are skipped with a warning."""
    client = configure(settings)
    for path in paths:
        if path is None or not Path(path).exists():
            logger.warning("artifact %s does not exist; not logged", path)
            continue
        if Path(path).is_dir():
            client.log_artifacts(run_id, str(path), artifact_path)
        else:
            client.log_artifact(run_id, str(path), artifact_path)


def run_url(settings: "Settings", run_id: str) -> str:
    """A human pointer to a run: the UI URL on a server, the store and id otherwise."""
    uri = settings.tracking_uri
    client = configure(settings)
    exp_id = client.get_run(run_id).info.experiment_id
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    return f"run {run_id} in {uri} (browse: mlflow ui --backend-store-uri {uri})"


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


def _pyfunc_model() -> Any:
    import mlflow.pyfunc

    class AgememPolicy(mlflow.pyfunc.PythonModel):
        """Loads the merged model, or the base model plus the LoRA adapter, and answers chats."""

        def load_context(self, context: Any) -> None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            arts = context.artifacts
            if "model" in arts:
                self.tokenizer = AutoTokenizer.from_pretrained(arts["model"])
                self.model = AutoModelForCausalLM.from_pretrained(arts["model"])
            else:
                from peft import AutoPeftModelForCausalLM

                self.model = AutoPeftModelForCausalLM.from_pretrained(arts["adapter"])
                self.tokenizer = AutoTokenizer.from_pretrained(self.model.peft_config["default"].base_model_name_or_path)

        def predict(self, context, model_input, params=None):  # untyped: MLflow validates hinted signatures
            import torch

            prompts = list(model_input["prompt"]) if hasattr(model_input, "__getitem__") and not isinstance(
                model_input, (list, str)) else ([model_input] if isinstance(model_input, str) else list(model_input))
            out = []
            max_new = int((params or {}).get("max_new_tokens", 64))
            for prompt in prompts:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": str(prompt)}],
                                                         add_generation_prompt=True, return_tensors="pt")
                ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
                with torch.no_grad():
                    gen = self.model.generate(ids, max_new_tokens=max_new, do_sample=False)
                out.append(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
            return out

    return AgememPolicy()


def _base_reloadable(settings: "Settings") -> bool:
    from agemem.train.tiny_model import is_tiny

    return not is_tiny(settings.train.model)


def _metric_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    return {f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in _finite(metrics).items()}


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
    adapter). ``metrics``: the eval aggregates, stored as version tags ``eval.<name>``.
    ``run_id``: the run the model is logged under (the pipeline's register stage run).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    artifacts: dict[str, str] = {}
    if adapter_dir is not None:
        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
        artifacts["adapter"] = str(adapter_dir)
    want_model = settings.tracking.log_merged_model
    if want_model is None:
        want_model = adapter_dir is None or not _base_reloadable(settings)
    if want_model:
        if model_dir is None or not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"a merged model directory is needed for registration, got {model_dir}")
        artifacts["model"] = str(model_dir)
    if not artifacts:
        raise ValueError("nothing to register: give adapter_dir or model_dir")
    sha = content_hash([Path(p) for p in artifacts.values()])
    client = configure(settings)
    name = settings.tracking.registered_model
    try:
        client.create_registered_model(name, description="AgeMem policy (LoRA adapter / merged model).")
    except MlflowException:
        pass  # already exists
    tags = {HASH_TAG: sha, **_metric_tags(metrics)}
    existing = client.search_model_versions(f"name='{name}' and tags.`{HASH_TAG}`='{sha}'")
    if existing:
        version = max(existing, key=lambda v: int(v.version))
        reused = True
        for key, value in _metric_tags(metrics).items():
            if key not in (version.tags or {}):
                client.set_model_version_tag(name, version.version, key, value)
        logger.info("model content %s already registered as %s v%s; reusing it", sha[:12], name, version.version)
    else:
        with mlflow.start_run(run_id=run_id) if run_id else contextlib.nullcontext():
            info = mlflow.pyfunc.log_model(
                name="policy",
                python_model=_pyfunc_model(),
                artifacts=artifacts,
                # Explicit requirements: inference would import and probe the whole environment.
                pip_requirements=["agemem", "transformers", "peft", "torch"],
            )
        version = client.create_model_version(
            name, source=info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id,
            description=f"adapter sha256 {sha}",
        )
        reused = False
        client.set_registered_model_alias(name, CANDIDATE, version.version)
        logger.info("registered %s v%s (%s)", name, version.version, info.model_uri)
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
    )


def resolve_alias(settings: "Settings", alias: str = CHAMPION) -> tuple[str, Path]:
    """Download the artifacts of ``<registered_model>@alias``; returns (version, local model dir).

    The returned directory is the merged model when one was logged, else the adapter.
    """
    import mlflow

    client = configure(settings)
    name = settings.tracking.registered_model
    version = _alias_version(client, name, alias)
    if version is None:
        raise LookupError(f"registered model {name!r} has no alias {alias!r} in {settings.tracking_uri}")
    dest = settings.runs_dir / "registry" / f"{name}-v{version.version}"
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=str(dest)))
    arts = local / "artifacts"
    for candidate in (arts / "model", arts / "adapter"):
        if candidate.is_dir():
            return str(version.version), candidate
    raise FileNotFoundError(f"{local} holds neither artifacts/model nor artifacts/adapter")


__all__ = [
    "CANDIDATE",
    "CHAMPION",
    "Registration",
    "apply_gate",
    "configure",
    "content_hash",
    "end_run",
    "flatten",
    "log_artifacts",
    "log_metrics",
    "register_model",
    "resolve_alias",
    "run_url",
    "settings_params",
    "stage_run",
    "start_pipeline_run",
]
