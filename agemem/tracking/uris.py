"""``models:/`` URIs: the one place a registered model becomes a local directory.

Accepted wherever agemem takes a model to evaluate (``agemem eval --model``, ``eval.model``, the
evaluate flows): ``models:/<name>@<alias>`` (``models:/agemem-policy@champion``),
``models:/<name>/<version>`` and any other URI MLflow's artifact download understands (a logged
model ``models:/m-<id>``). The download lands under ``<runs_dir>/registry/`` and the returned path
is the merged HF model the version carries, else its LoRA adapter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agemem.tracking.runs import configure

if TYPE_CHECKING:
    from agemem.settings import Settings

SCHEME = "models:/"
_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ResolvedModel:
    """A model URI downloaded: registered ``name`` and ``version`` (None for a logged model) and its directory."""

    uri: str
    name: str | None
    version: str | None
    path: Path


def is_model_uri(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


def _version_of(settings: "Settings", name: str, alias: str | None, version: str | None) -> str:
    from mlflow.exceptions import MlflowException

    client = configure(settings)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        raise LookupError(_missing(client, settings, name, alias, version)) from None
    return str(found.version)


def _missing(client: object, settings: "Settings", name: str, alias: str | None, version: str | None) -> str:
    """One line: what is missing, what the registry has instead and how to get what was asked for."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = sorted(client.get_registered_model(name).aliases or {})  # type: ignore[attr-defined]
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version}"
        return (f"registered model {name!r} has no {what} in {settings.tracking_uri} (no such model); run the "
                "pipeline first (or pass a checkpoint directory)")
    have = f"it has {', '.join(f'@{a}' for a in aliases)}" if aliases else "it has no aliases"
    if alias is None:
        return f"registered model {name!r} has no version {version} in {settings.tracking_uri} ({have})"
    fix = "; use one of those"
    if alias == "champion" and "candidate" in aliases:
        fix = ("; the champion gate has not crowned a version (a RANDOM WEIGHTS model is crowned only with "
               f"tracking.crown_random_weights=true): use models:/{name}@candidate")
    return f"registered model {name!r} has no alias {alias!r} in {settings.tracking_uri} ({have}){fix}"


def resolve_model_uri(settings: "Settings", uri: str) -> ResolvedModel:
    """Download ``uri`` (a ``models:/`` URI) into ``<runs_dir>/registry``; returns where its model is."""
    import mlflow

    match = _REGISTERED.match(uri)
    name = match["name"] if match else None
    version = _version_of(settings, match["name"], match["alias"], match["version"]) if match else None
    configure(settings)
    folder = f"{name}-v{version}" if match else re.sub(r"[^A-Za-z0-9_.-]+", "_", uri.removeprefix(SCHEME))
    source = f"models:/{name}/{version}" if match else uri
    local = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(settings.runs_dir / "registry" / folder)))
    for candidate in (local / "artifacts" / "model", local / "artifacts" / "adapter"):
        if candidate.is_dir():
            return ResolvedModel(uri, name, version, candidate)
    raise FileNotFoundError(f"{uri} ({local}) holds neither artifacts/model nor artifacts/adapter")


__all__ = ["SCHEME", "ResolvedModel", "is_model_uri", "resolve_model_uri"]
