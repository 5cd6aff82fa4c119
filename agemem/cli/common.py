"""Options every CLI command shares: profile, overrides, logging."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer

from agemem.settings import Settings, explain_settings, load_settings

ProfileOpt = Annotated[
    Optional[str], typer.Option("--profile", "-p", help="Settings profile: smoke or paper (env AGEMEM_PROFILE).")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a setting, e.g. --set train.lr=2e-5 (repeatable)."),
]


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def settings_from_cli(profile: str | None, sets: list[str] | None, **extra: object) -> Settings:
    """Settings for a command: profile, then ``--set`` pairs, then command-specific flags."""
    pairs = list(sets or [])
    pairs += [f"{key}={value}" for key, value in extra.items() if value is not None]
    try:
        return load_settings(profile, pairs)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def source_of(key: str, profile: str | None, sets: list[str] | None) -> str:
    """Where ``key``'s value comes from for these flags: default, profile, .env, env or flag."""
    try:
        return next(src for k, _, src in explain_settings(profile, list(sets or [])) if k == key)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
