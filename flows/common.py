"""What every flow shares: settings from parameters, retry and cache options, MLflow stage runs.

Flows take ``profile`` + ``overrides`` (a list of ``"section.key=value"``) and build one
:class:`agemem.settings.Settings` from them, so a deployment's parameters are the same words as
the CLI's ``--profile``/``--set``.

Caching: an expensive deterministic task's key is the hash of its plain inputs (Prefect's
``INPUTS``, minus the ``settings`` object), the settings sections that shape its output
(:class:`SettingsSlice`) and the bytes of its input files (:class:`FileContents`). Results persist
under ``tracking.prefect_results_dir``, so a later process (a re-run after a crash) finds them.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from prefect.cache_policies import INPUTS, CachePolicy
from prefect.tasks import exponential_backoff
from prefect.utilities.hashing import hash_objects

from agemem.digests import update_with_file

if TYPE_CHECKING:
    from prefect import Task
    from prefect.context import TaskRunContext

    from agemem.settings import Settings

#: Options for tasks that touch the outside (downloads, LLM calls, judge, training launch,
#: registry): transient failures are retried after 2 s, 4 s, 8 s (+ up to 50 % jitter, so many
#: runs hitting one endpoint do not retry in lockstep).
OUTSIDE_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
}
#: Training is long: one retry (it resumes from its newest checkpoint, so little is lost).
TRAIN_RETRIES: dict[str, Any] = {
    "retries": 1,
    "retry_delay_seconds": exponential_backoff(backoff_factor=10),
    "retry_jitter_factor": 0.5,
}

def load(profile: str, overrides: Sequence[str] | None = None, **extra: str | None) -> "Settings":
    """Settings from flow parameters; ``extra`` adds ``key=value`` pairs after the overrides."""
    from agemem.settings import load_settings

    pairs = list(overrides or [])
    pairs += [f"{key}={value}" for key, value in extra.items() if value is not None]
    settings = load_settings(profile, pairs)
    # Pin the store (MLFLOW_TRACKING_URI applies when tracking.tracking_uri is unset) so every
    # stage, the trainer included, logs to the same place.
    tracking = settings.tracking.model_copy(update={"tracking_uri": settings.tracking_uri})
    return settings.model_copy(update={"tracking": tracking})


def file_digest(paths: Sequence[str | Path]) -> str:
    """sha256 over the names and bytes of files (directories: every file under them, sorted)."""
    digest = hashlib.sha256()
    for raw in paths:
        path = Path(raw)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file).encode())
            if not file.exists():
                digest.update(b"<missing>")
                continue
            update_with_file(digest, file)
    return digest.hexdigest()


@dataclass
class FileContents(CachePolicy):
    """Cache key part: the content hash of the files named by the task inputs ``params``.

    An input may be one path or a list of paths; editing a file (even keeping its name, size
    and mtime) changes the key.
    """

    params: tuple[str, ...] = ()

    def compute_key(self, task_ctx: "TaskRunContext", inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        paths: list[str | Path] = []
        for name in self.params:
            value = inputs.get(name)
            if value is None:
                continue
            paths.extend(value if isinstance(value, (list, tuple)) else [value])
        return file_digest(paths) if paths else None


@dataclass
class SettingsSlice(CachePolicy):
    """Cache key part: the settings sections that shape a task's output (plus ``runs_dir``).

    Secrets are masked by ``model_dump(mode="json")``, so keys never carry them; a changed
    ``train.lr`` does not invalidate the data steps because they key on ``data`` only.
    """

    sections: tuple[str, ...] = ()
    fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def compute_key(self, task_ctx: "TaskRunContext", inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        settings = inputs.get("settings")
        if settings is None:
            return None
        dump = settings.model_dump(mode="json")
        picked: dict[str, Any] = {"runs_dir": dump["runs_dir"]}
        for section in self.sections:
            picked[section] = dump[section]
        for section, names in self.fields.items():
            picked[f"{section}.*"] = {name: dump[section][name] for name in names}
        return hash_objects(picked, raise_on_failure=True)


def cache_policy(*, files: tuple[str, ...] = (), sections: tuple[str, ...] = (),
                 fields: Mapping[str, tuple[str, ...]] | None = None, exclude: tuple[str, ...] = ()) -> CachePolicy:
    """``INPUTS`` (without the settings object and ``exclude``) + file contents + a settings slice.

    ``exclude``: inputs that do not change the output (an MLflow run id to log into).
    """
    inputs = INPUTS - "settings"
    for name in exclude:
        inputs = inputs - name
    return inputs + FileContents(params=files) + SettingsSlice(sections=sections, fields=fields or {})


def results_dir(settings: "Settings") -> Path:
    path = settings.path(settings.tracking.prefect_results_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def persisted(task: "Task", settings: "Settings", **options: Any) -> "Task":
    """``task`` with results (and cache records) persisted under ``tracking.prefect_results_dir``."""
    # A Path is Prefect's local-filesystem storage; it needs no block saved on the API server.
    return task.with_options(persist_result=True, result_storage=results_dir(settings), **options)


def run_cached(task: "Task", settings: "Settings", must_exist: Sequence[str], /, **kwargs: Any) -> tuple[Any, bool]:
    """Run a cached task; returns (result, whether it came from the cache).

    A cached result naming files that are gone (someone cleaned ``runs/``) is not trusted: the
    task runs again with ``refresh_cache``.
    """
    state = persisted(task, settings)(**kwargs, return_state=True)
    result = state.result()
    cached = state.name == "Cached"
    if cached and not all(Path(str(result[key])).exists() for key in must_exist if result.get(key)):
        state = persisted(task, settings, refresh_cache=True)(**kwargs, return_state=True)
        result, cached = state.result(), False
    return result, cached


@contextlib.contextmanager
def stage(settings: "Settings", parent_run_id: str | None, name: str) -> Iterator[str]:
    """An MLflow child run for one stage (top-level when the flow runs on its own)."""
    from agemem import tracking

    with tracking.stage_run(settings, parent_run_id, name) as run_id:
        yield run_id


def mark_cached(settings: "Settings", run_id: str, cached: bool) -> None:
    """Tag a stage run whose work came from the Prefect cache (``agemem.cached``)."""
    from agemem import tracking

    tracking.configure(settings).set_tag(run_id, "agemem.cached", str(cached).lower())


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of a block in ``timings[name]`` (also on failure)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - started, 2)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    from agemem.eval.report import markdown_table

    return markdown_table(headers, rows)


__all__ = [
    "OUTSIDE_RETRIES",
    "TRAIN_RETRIES",
    "FileContents",
    "SettingsSlice",
    "cache_policy",
    "file_digest",
    "load",
    "mark_cached",
    "md_table",
    "persisted",
    "results_dir",
    "run_cached",
    "stage",
    "timed",
]
