"""Check a run's inputs before anything starts: a wrong path costs a second, not a Prefect server start,
an MLflow parent run left FAILED, and a traceback from deep inside a stage.

:func:`check_pipeline_inputs` is what ``agemem pipeline`` and the ``agemem-pipeline`` flow call
before Prefect or MLflow start; it raises the same errors the stages would (``HotpotDataError``,
``ModelSourceError``, ``FileNotFoundError``: all ``ValueError`` / ``OSError``), one line each.
"""

from __future__ import annotations

from pathlib import Path

from agemem.data.hotpot import resolve_source
from agemem.settings import Settings
from agemem.tracking.uris import is_model_uri
from agemem.train.models import gguf_source, is_tiny


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or value.endswith(".gguf")


def check_model_source(model: str, key: str = "train.model") -> None:
    """A model given as a path must exist (a hub name is left to the loader: it may be cached)."""
    if is_tiny(model) or is_model_uri(model):
        return
    if _looks_like_path(model) and not Path(model).expanduser().exists():
        raise FileNotFoundError(f"{key} {model!r}: no such file or directory (give a model directory, a .gguf "
                                "file, or a hub name)")
    gguf_source(model)  # a file that is not a .gguf raises ModelSourceError


def check_pipeline_inputs(settings: Settings) -> None:
    """Everything the pipeline reads that can be checked without running it."""
    resolve_source(settings.data.source)
    if settings.train.backend == "local":
        check_model_source(settings.train.model)


__all__ = ["check_model_source", "check_pipeline_inputs"]
