"""``agemem config show`` (resolved settings and where each value came from) and ``agemem config keys``."""

from __future__ import annotations

import json
from typing import Any

import typer

from agemem.cli.common import JsonOpt, ProfileOpt, SetOpt, VerboseOpt, command, new_app
from agemem.settings import explain_settings, setting_keys

app = new_app("Show the resolved settings and every settable key.")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip()
                     for row in rows)


@app.command("show")
@command
def show(profile: ProfileOpt = None, sets: SetOpt = None, as_json: JsonOpt = False,
         verbose: VerboseOpt = False) -> None:
    """Every setting's value and its source: default, profile, .env, env or flag (secrets masked)."""
    rows = explain_settings(profile, list(sets or []))
    if as_json:
        typer.echo(json.dumps({key: {"value": value, "source": source} for key, value, source in rows},
                              indent=2, default=str))
        return
    typer.echo(_columns([("key", "value", "source")] + [(key, _text(value), source) for key, value, source in rows]))


@app.command("keys")
@command
def keys(as_json: JsonOpt = False, verbose: VerboseOpt = False) -> None:
    """Every settable key (``--set KEY=VALUE``, env ``AGEMEM_SECTION__KEY``) with its description."""
    described = setting_keys()
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    typer.echo(_columns([("key", "description")] + list(described.items())))
