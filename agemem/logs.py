"""Quiet third-party output: a successful run prints no ERROR, no traceback and no trivial progress bar.

Each filter sits on the third-party logger (or warning) it silences and says why the message is
harmless; nothing of agemem's own is filtered, and real errors from these libraries still show.
:func:`quiet_third_party` is idempotent; the CLI calls it when it configures logging and the
Prefect flows call it when they start (a worker's flow-run process has no CLI around it).
"""

from __future__ import annotations

import logging
import os
import sys
import time

#: Progress bars of steps that take milliseconds on a smoke run (loading 27 tensors, converting a
#: 535-record JSON file, copying three artifacts). ``--verbose`` (or setting the variable) keeps them.
_PROGRESS_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" / "Writing model shards" too
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # "Generating train split: 535 examples"
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts: 3/3"
}

#: Loggers whose INFO lines narrate their own internals on every run.
_INFO_CHATTER = (
    # faiss tries its AVX512/AVX2 builds first and logs each miss as "ModuleNotFoundError(...)" at
    # INFO before loading the generic build it ships: not an error, but it reads like one.
    "faiss.loader",
    # milvus-lite logs every background index build and compaction of the local store.
    "milvus_lite",
    # "Creating initial MLflow database tables..." on every new sqlite store.
    "mlflow.store.db.utils",
    "alembic",
)


class _DropMatching(logging.Filter):
    """Drops records whose message (or exception) contains one of ``needles``."""

    def __init__(self, *needles: str) -> None:
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += f" {record.exc_info[1]!r}"
        return not any(needle in text for needle in self.needles)


# pymilvus' client asks the server for a timestamp (AllocTimestamp) after creating a collection;
# milvus-lite's gRPC server does not implement that call, grpc logs the NotImplementedError with a
# traceback at ERROR, and pymilvus carries on without it (the store works). Twice per fresh store.
_GRPC_FILTER = _DropMatching("Method not implemented")
# MLflow warns on every python_model object that CloudPickle serialises it; agemem's pyfunc class
# is our own code, logged into our own registry, so the warning tells the user nothing to do.
_PYFUNC_FILTER = _DropMatching("serialized using CloudPickle")
_PREDICT_HINT_FILTER = _DropMatching("Add type hints to the `predict` method")


def _has(logger: logging.Logger, flt: logging.Filter) -> bool:
    return flt in logger.filters


def quiet_third_party(verbose: bool = False) -> None:
    """Filter harmless third-party noise; ``verbose`` keeps progress bars and INFO chatter."""
    for name, flt in (("grpc._server", _GRPC_FILTER), ("mlflow.pyfunc", _PYFUNC_FILTER)):
        logger = logging.getLogger(name)
        if not _has(logger, flt):
            logger.addFilter(flt)
    # MLflow's hint to add type hints to PythonModel.predict, printed with raw ANSI colour codes. It
    # is raised inside log_model's own catch_warnings("once"), which overrides warnings filters, so
    # warnings go through logging (py.warnings) and the hint is dropped there. The registry's pyfunc
    # model takes a DataFrame or a list of prompts on purpose.
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    if not _has(warnings_logger, _PREDICT_HINT_FILTER):
        warnings_logger.addFilter(_PREDICT_HINT_FILTER)
    if verbose:
        return
    for name in _INFO_CHATTER:
        logging.getLogger(name).setLevel(logging.WARNING)
    for key, value in _PROGRESS_ENV.items():
        os.environ.setdefault(key, value)
    _disable_loaded_progress_bars()


def _disable_loaded_progress_bars() -> None:
    """The env vars above are read at import; libraries already imported are told directly."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1":
        return
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


class LogProgress:
    """A progress callback ``(done, total)`` that logs ``what: done/total`` at most every ``every_s``
    seconds, plus the last item: progress of long work (rollouts, evaluation, judge calls) where no
    terminal shows a bar, e.g. in the Prefect UI's logs."""

    def __init__(self, logger: logging.Logger, what: str, every_s: float = 10.0) -> None:
        self.logger, self.what, self.every_s = logger, what, every_s
        self._last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self._last >= self.every_s:
            self._last = now
            self.logger.info("%s: %d/%d", self.what, done, total)


__all__ = ["LogProgress", "quiet_third_party"]
