"""What every CLI command shares: the app factory, profile / overrides / verbose options, logging,
and the one way a command reports a problem it knows (``error: ...`` on one line, exit code 2)."""

from __future__ import annotations

import functools
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, NoReturn, Optional, TypeVar

import typer

from agemem.llm import LLMError
from agemem.logs import quiet_third_party
from agemem.memory.base import MemoryUnavailableError
from agemem.settings import Settings, explain_settings, load_settings

if TYPE_CHECKING:
    from tqdm import tqdm

F = TypeVar("F", bound=Callable[..., Any])

#: Problems the user can fix (bad settings or inputs, a missing file, an unreachable service): one
#: line, no traceback. Anything else is a bug and keeps its traceback. ``--verbose`` shows it always.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, NotADirectoryError, PermissionError, LookupError, MemoryUnavailableError,
    LLMError,
)

ProfileOpt = Annotated[
    Optional[str],
    typer.Option("--profile", "-p", help="Settings profile: smoke (the default) or paper; env AGEMEM_PROFILE."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a setting, e.g. --set train.lr=2e-5 (repeatable; "
                                     "`agemem config keys` lists them)."),
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Debug logging, third-party progress bars, tracebacks on errors.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def new_app(help_text: str) -> typer.Typer:
    """A command group: ``-h``/``--help``, plain help text (flags shown as flags, defaults shown)."""
    return typer.Typer(help=help_text, no_args_is_help=True, rich_markup_mode=None, add_completion=False,
                       context_settings={"help_option_names": ["-h", "--help"], "show_default": True})


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_third_party(verbose)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit (the one way commands report a known problem)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def command(func: F) -> F:
    """Wrap a command: configure logging from its ``verbose`` flag, report known problems on one line."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = bool(kwargs.get("verbose"))
        configure_logging(verbose)
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as exc:
            if verbose:
                raise
            fail(str(exc).strip() or type(exc).__name__)

    return wrapper  # type: ignore[return-value]


def progress_bar(desc: str, unit: str, total: int | None = None) -> "tqdm":
    """A progress bar on stderr that appears only when the work takes more than two seconds."""
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, total=total, delay=2.0, leave=False, file=sys.stderr)


def settings_from_cli(profile: str | None, sets: list[str] | None, **extra: object) -> Settings:
    """Settings for a command: profile, then ``--set`` pairs, then command-specific flags.

    Raises ``ValueError`` naming the key (reported on one line by :func:`command`).
    """
    pairs = list(sets or [])
    pairs += [f"{key}={value}" for key, value in extra.items() if value is not None]
    return load_settings(profile, pairs)


def source_of(key: str, profile: str | None, sets: list[str] | None) -> str:
    """Where ``key``'s value comes from for these flags: default, profile, .env, env or flag."""
    return next(src for k, _, src in explain_settings(profile, list(sets or [])) if k == key)


def tool(name: str) -> str:
    """A command line tool of this environment as a path that works in a fresh shell.

    ``mlflow`` and ``prefect`` sit beside this Python (``.venv/bin``), which a new shell does not
    have on PATH unless the venv is activated.
    """
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return str(beside)
    return shutil.which(name) or name


__all__ = [
    "JsonOpt",
    "ProfileOpt",
    "SetOpt",
    "USER_ERRORS",
    "VerboseOpt",
    "command",
    "configure_logging",
    "fail",
    "new_app",
    "progress_bar",
    "settings_from_cli",
    "source_of",
    "tool",
]
