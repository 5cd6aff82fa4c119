"""Pipeline inputs that are damaged (issue 16 §14): one clear line, and a rerun repairs what it can."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agemem.data.distractors import synthesize
from agemem.data.episodes_io import EpisodeFileError, read_episodes
from agemem.data.prepare import prepare_scripts
from agemem.settings import load_settings


@pytest.fixture
def episodes(runs_dir: Path) -> tuple[object, Path]:
    settings = load_settings("smoke", {"runs_dir": str(runs_dir), "data": {"limit": 5, "distractor_messages": 2}})
    return settings, synthesize(settings, prepare_scripts(settings))


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_a_corrupt_line_is_one_line_naming_file_and_line(episodes) -> None:
    _, path = episodes
    lines = _lines(path)
    lines[3] = b'{"episode_id": 17, "question": null}\n'
    path.write_bytes(b"".join(lines))
    with pytest.raises(EpisodeFileError) as info:
        read_episodes(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: not an episode script") and "\n" not in message, message
    assert len(message) < 300 and info.value.__cause__ is None and info.value.__suppress_context__


def test_a_line_that_is_not_utf8_is_named(episodes) -> None:
    _, path = episodes
    lines = _lines(path)
    lines[1] = lines[1][:40] + b"\xff\xfe" + lines[1][40:]
    path.write_bytes(b"".join(lines))
    with pytest.raises(EpisodeFileError, match=rf"^{path}:2: not UTF-8 text \(byte 40"):
        read_episodes(path)


def test_a_torn_last_line_is_skipped_as_documented(episodes, caplog) -> None:
    _, path = episodes
    whole = read_episodes(path)
    lines = _lines(path)
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a crash mid-append
    with caplog.at_level(logging.WARNING):
        assert read_episodes(path) == whole[:-1]
    assert f"{path}:{len(lines)}: skipping a torn last line" in caplog.text
    # A last line without its newline that is whole is an episode, not a tear.
    path.write_bytes(b"".join(lines)[:-1])
    assert read_episodes(path) == whole


def test_a_corrupted_episodes_file_is_rebuilt_not_reused(episodes, caplog) -> None:
    settings, path = episodes
    good = path.read_bytes()
    path.write_bytes(good[:-200] + b"garbage\n")  # damaged after it was written
    with caplog.at_level(logging.INFO):
        again = synthesize(settings, prepare_scripts(settings))
    assert again.read_bytes() == good
    assert f"{path} is up to date" not in caplog.text and "rebuilding it" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        synthesize(settings, prepare_scripts(settings))
    assert f"{path} is up to date" in caplog.text  # intact now: reused


def test_a_missing_tokenizer_path_is_one_clear_line(tmp_path: Path) -> None:
    from agemem.agent.context import ChatTokenizer

    missing = tmp_path / "no" / "tokenizer"
    with pytest.raises(ValueError) as info:
        ChatTokenizer.from_path(str(missing))
    message = str(info.value)
    assert str(missing) in message and "episode.tokenizer" in message and "\n" not in message
    assert info.value.__cause__ is None and info.value.__context__ is None  # no hub traceback behind it
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        ChatTokenizer.from_path(str(tmp_path))  # exists, holds no tokenizer
