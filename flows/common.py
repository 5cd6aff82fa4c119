"""What every flow shares: settings from parameters, retry and cache options, MLflow stage runs.

Flows take ``profile`` + ``overrides`` (a list of ``"section.key=value"``) and build one
:class:`agemem.settings.Settings` from them, so a deployment's parameters are the same words as
the CLI's ``--profile``/``--set``.

Caching: an expensive deterministic task's key is the hash of its plain inputs (Prefect's
``INPUTS``, minus the ``settings`` object), the hash the producing module computes from the
settings (:class:`SettingsHash`) and the bytes of its input files (:class:`FileContents`). Results persist
under ``tracking.prefect_results_dir``, so a later process (a re-run after a crash) finds them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

from prefect.cache_policies import INPUTS, CachePolicy
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from prefect.tasks import exponential_backoff
from prefect.utilities.hashing import hash_objects

from agemem import tracking
from agemem.digests import update_with_file
from agemem.eval.report import markdown_table
from agemem.logs import quiet_third_party
from agemem.settings import Settings, load_settings
from agemem.train.models import RANDOM_WEIGHTS_NOTE, has_random_weights

if TYPE_CHECKING:
    from prefect import Task
    from prefect.context import TaskRunContext

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

#: The profiles a deployment's ``profile`` parameter accepts: a Literal, so the server's parameter
#: schema refuses anything else (enforce_parameter_schema) and the UI's run form offers a choice.
Profile = Literal["smoke", "paper"]


class _RunLogHandler(APILogHandler):
    """Prefect's API log handler, for records logged inside a flow or task run only (else silent)."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        super().emit(record)


def route_library_logs() -> None:
    """Send the ``agemem`` library's log records (training steps, resume, warnings) to the Prefect run
    they happen in, so its Logs tab shows them; quiet harmless third-party noise. Idempotent."""
    quiet_third_party()
    library = logging.getLogger("agemem")
    if not any(isinstance(h, _RunLogHandler) for h in library.handlers):
        library.addHandler(_RunLogHandler())
    if library.level == logging.NOTSET:
        library.setLevel(logging.INFO)  # a worker's root logger is at WARNING: keep the step lines


def load(profile: str, overrides: Sequence[str] | None = None, **extra: str | None) -> "Settings":
    """Settings from flow parameters; ``extra`` adds ``key=value`` pairs after the overrides.

    Also routes the library's logs to the current Prefect run (every flow starts here).
    """
    route_library_logs()
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
class SettingsHash(CachePolicy):
    """Cache key part: the hash the producing module itself computes from the settings.

    ``hasher`` is that module's input-hash function (e.g. :func:`agemem.train.run.inputs_hash`), so a
    task's cache key can never list fewer settings than the output depends on: there is one list,
    in the module. ``runs_dir`` is added because every output lives under it.
    """

    hasher: Callable[["Settings"], str] | None = None

    def compute_key(self, task_ctx: "TaskRunContext", inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        settings = inputs.get("settings")
        if settings is None or self.hasher is None:
            return None
        return hash_objects({"runs_dir": str(settings.runs_dir), "settings": self.hasher(settings)},
                            raise_on_failure=True)


def cache_policy(*, hasher: Callable[["Settings"], str], files: tuple[str, ...] = (),
                 exclude: tuple[str, ...] = ()) -> CachePolicy:
    """``INPUTS`` (without the settings object and ``exclude``) + file contents + the module's settings hash.

    ``exclude``: inputs that do not change the output (an MLflow run id to log into).
    """
    inputs = INPUTS - "settings"
    for name in exclude:
        inputs = inputs - name
    return inputs + FileContents(params=files) + SettingsHash(hasher=hasher)


def results_dir(settings: "Settings") -> Path:
    path = settings.path(settings.tracking.prefect_results_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def persisted(task: "Task", settings: "Settings", **options: Any) -> "Task":
    """``task`` with results (and cache records) persisted under ``tracking.prefect_results_dir``."""
    # A Path is Prefect's local-filesystem storage; it needs no block saved on the API server.
    return task.with_options(persist_result=True, result_storage=results_dir(settings), **options)


def run_cached(task: "Task", settings: "Settings", must_exist: Sequence[str], /, *, refresh: bool = False,
               **kwargs: Any) -> tuple[Any, bool]:
    """Run a cached task; returns (result, whether it came from the cache).

    A cached result naming files that are gone (someone cleaned ``runs/``) is not trusted: the
    task runs again with ``refresh_cache``. ``refresh`` (``--force``) ignores the cache from the start.
    """
    state = persisted(task, settings, refresh_cache=refresh or None)(**kwargs, return_state=True)
    result = state.result()
    cached = state.name == "Cached"
    if cached and not all(Path(str(result[key])).exists() for key in must_exist if result.get(key)):
        state = persisted(task, settings, refresh_cache=True)(**kwargs, return_state=True)
        result, cached = state.result(), False
    return result, cached


@contextlib.contextmanager
def stage(settings: "Settings", parent_run_id: str | None, name: str) -> Iterator[str]:
    """An MLflow child run for one stage (top-level when the flow runs on its own)."""
    with tracking.stage_run(settings, parent_run_id, name) as run_id:
        yield run_id


def mark_cached(settings: "Settings", run_id: str, cached: bool) -> None:
    """Tag a stage run whose work came from the Prefect cache (``agemem.cached``)."""
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
    return markdown_table(headers, rows)


def png_data_uri(path: str | Path) -> str:
    """A PNG as a ``data:`` URI: the Prefect UI shows it inside a markdown artifact, where a relative
    ``plot.png`` (right beside ``report.md`` on disk) is a broken image."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def ui_link(path: str) -> str:
    """A link into the Prefect UI: absolute when the UI's address is known, else relative to it
    (a link inside an artifact resolves against the UI that shows it)."""
    from prefect.settings import get_current_settings

    base = get_current_settings().ui_url
    return f"{str(base).rstrip('/')}{path}" if base else path


def artifact_link(artifact_id: Any) -> str:
    return ui_link(f"/artifacts/artifact/{artifact_id}")


def random_weights_banner(settings: "Settings") -> list[str]:
    """Markdown lines labelling numbers about the tiny random model (empty for any other model)."""
    if not has_random_weights(settings.train.model):
        return []
    return [f"> **{RANDOM_WEIGHTS_NOTE}**", ""]


__all__ = [
    "OUTSIDE_RETRIES",
    "TRAIN_RETRIES",
    "FileContents",
    "Profile",
    "SettingsHash",
    "artifact_link",
    "cache_policy",
    "file_digest",
    "load",
    "mark_cached",
    "md_table",
    "persisted",
    "png_data_uri",
    "random_weights_banner",
    "results_dir",
    "route_library_logs",
    "run_cached",
    "stage",
    "timed",
    "ui_link",
]
