"""Distractor synthesis: offline and OpenAI-compatible, validation, fallback, resume, determinism, CLI."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agemem.cli.data import app
from agemem.data.distractors import PARTIAL_SUFFIX, Validator, parse_lines, synthesize
from agemem.data.episodes_io import read_episodes
from agemem.data.prepare import prepare_scripts
from agemem.settings import load_settings
from tests.fake_openai import FakeOpenAI

TOPICS = ["baking bread", "my bike commute", "learning the guitar", "rainy weekends", "houseplants", "chess openings"]


def _settings(runs_dir: Path, server: FakeOpenAI | None = None, **data):
    over = {"runs_dir": str(runs_dir), "data": {"limit": 6, "distractor_messages": 3, **data}}
    if server is not None:
        over["data"]["distractor_backend"] = "llm"
        over["llm"] = server.llm_overrides(max_retries=0)
    return load_settings("smoke", over)


def _question(req: dict) -> str:
    return re.search(r'unrelated to this question: "(.*)"', req["messages"][-1]["content"]).group(1)


def numbered_reply(req: dict) -> str:
    """Deterministic, valid, numbered distractors unique per question (and per attempt)."""
    key = hashlib.sha256(req["messages"][-1]["content"].encode()).hexdigest()[:6]
    n = int(re.search(r"Write (\d+) different", req["messages"][-1]["content"]).group(1))
    lines = [f"{i + 1}. I have been thinking about {TOPICS[i % len(TOPICS)]} a lot lately, ref {key}{i}." for i in range(n)]
    return "Here are the messages:\n" + "\n".join(lines)


def test_parse_lines_strips_whole_markers() -> None:
    text = "Here you go:\n1. first one\n10. tenth one\n- dash\n• bullet\n2) paren\n\n# heading\n\"quoted\""
    assert parse_lines(text) == ["first one", "tenth one", "dash", "bullet", "paren", "quoted"]


def test_validator_rejects_entities_lengths_duplicates() -> None:
    v = Validator(["Ed Wood (film)", "Scott Derrickson"], "Were they American?", 10, 60)
    assert v.reject_reason("I loved that ed wood movie last night") is not None  # base title, any case
    assert "too short" == v.reject_reason("hi there")
    assert "too long" == v.reject_reason("x" * 61)
    assert v.reject_reason("My garden is blooming this week.") is None
    assert v.reject_reason("my garden is blooming, this week!") == "duplicate"
    assert v.reject_reason("Redwood forests are tall") is None  # word boundaries: 'Wood' inside a word is fine


def test_offline_disjoint_deterministic_and_byte_identical(tmp_path: Path) -> None:
    paths = []
    for run in ("a", "b"):
        settings = _settings(tmp_path / run)
        paths.append(synthesize(settings, prepare_scripts(settings)))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    episodes = read_episodes(paths[0])
    assert len(episodes) == 6
    for ep in episodes:
        assert len(ep.distractors) == 3 and ep.distractors_filled
        assert all(d.source.startswith("offline:") and d.source != f"offline:{ep.record_id}" for d in ep.distractors)
        assert not any(t in d.text for d in ep.distractors for t in ep.titles if len(t) > 4)
        assert ep.provenance["distractors"] == {"synthesizer": "offline", "model": None, "seed": 42}
    other = _settings(tmp_path / "c", seed=1)
    assert synthesize(other, prepare_scripts(other)).read_bytes() != paths[0].read_bytes()


def test_llm_synthesizer_against_openai_server(fake_openai: FakeOpenAI, runs_dir: Path) -> None:
    fake_openai.reply = numbered_reply
    settings = _settings(runs_dir, fake_openai)
    path = synthesize(settings, prepare_scripts(settings))
    episodes = read_episodes(path)
    assert fake_openai.count == 6  # one call per episode fills all 3 slots
    for ep in episodes:
        assert [d.source for d in ep.distractors] == ["llm:fake-model"] * 3
        assert all(d.text.startswith("I have been thinking about") for d in ep.distractors)
        assert ep.provenance["distractors"]["model"] == "openai:fake-model"
        assert ep.provenance["distractors"]["fallbacks"] == 0
    # Unchanged inputs: nothing is redone.
    synthesize(settings)
    assert fake_openai.count == 6


def test_invalid_outputs_regenerated_one_per_call(fake_openai: FakeOpenAI, runs_dir: Path) -> None:
    def reply(req: dict) -> str:
        content = req["messages"][-1]["content"]
        titles = re.search(r"Do not mention any of these names or topics: (.*)\.", content).group(1).split(", ")
        if "rejected" not in content:  # first attempt: entity mention, too short, valid
            return f"I just read about {titles[0]} online.\nok\n"
        return numbered_reply(req)

    fake_openai.reply = reply
    settings = _settings(runs_dir, fake_openai, distractors_per_call=1, limit=2)
    episodes = read_episodes(synthesize(settings, prepare_scripts(settings)))
    for ep in episodes:
        assert len(ep.distractors) == 3 and all(d.source == "llm:fake-model" for d in ep.distractors)
        assert len({d.text for d in ep.distractors}) == 3
    assert all("Write 1 different" in r["messages"][-1]["content"] for r in fake_openai.requests)


def test_fallback_after_max_attempts(fake_openai: FakeOpenAI, runs_dir: Path) -> None:
    fake_openai.reply = "1. no\n2. nope"  # always too short
    settings = _settings(runs_dir, fake_openai, synth_max_attempts=2, limit=2)
    episodes = read_episodes(synthesize(settings, prepare_scripts(settings)))
    assert fake_openai.count == 4  # 2 episodes x 2 attempts
    for ep in episodes:
        assert [d.source for d in ep.distractors] == ["fallback"] * 3
        assert ep.provenance["distractors"]["fallbacks"] == 3


def test_failing_endpoint_falls_back_without_losing_episodes(fake_openai: FakeOpenAI, runs_dir: Path) -> None:
    fake_openai.fail_first, fake_openai.fail_status = 1000, 400
    settings = _settings(runs_dir, fake_openai, synth_max_attempts=1, limit=3)
    episodes = read_episodes(synthesize(settings, prepare_scripts(settings)))
    assert len(episodes) == 3 and all(d.source == "fallback" for ep in episodes for d in ep.distractors)


class Crash(RuntimeError):
    pass


def test_resume_after_crash_redoes_only_missing_work(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    fake_openai.reply = numbered_reply
    clean = _settings(tmp_path / "clean", fake_openai)
    expected = synthesize(clean, prepare_scripts(clean)).read_bytes()
    fake_openai.reset()
    fake_openai.reply = numbered_reply

    settings = _settings(tmp_path / "crash", fake_openai, synth_concurrency=1)
    scripts = prepare_scripts(settings)

    def crash_after_4(done: int, total: int) -> None:
        if done >= 4:
            raise Crash

    with pytest.raises(Crash):
        synthesize(settings, scripts, progress=crash_after_4)
    partial = scripts.with_name("episodes.jsonl" + PARTIAL_SUFFIX)
    assert len(partial.read_text().splitlines()) == 4 and not scripts.with_name("episodes.jsonl").exists()
    # A torn write: cut the last line in half, as a kill mid-write would.
    data = partial.read_bytes()
    partial.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1 + 40])
    before = fake_openai.count
    final = synthesize(settings, scripts)
    assert final.read_bytes() == expected
    assert fake_openai.count - before == 3  # 6 episodes - 3 intact lines
    assert not partial.exists()


def test_stale_partial_from_other_inputs_is_discarded(fake_openai: FakeOpenAI, runs_dir: Path) -> None:
    settings = _settings(runs_dir)
    scripts = prepare_scripts(settings)
    partial = scripts.with_name("episodes.jsonl" + PARTIAL_SUFFIX)
    # Leftover from an LLM run with other settings: must not leak into an offline run.
    fake_openai.reply = numbered_reply
    llm = _settings(runs_dir, fake_openai)
    with pytest.raises(Crash):
        synthesize(llm, scripts, progress=lambda d, t: (_ for _ in ()).throw(Crash) if d >= 2 else None)
    assert partial.exists()
    episodes = read_episodes(synthesize(settings, scripts))
    assert all(d.source.startswith("offline:") for ep in episodes for d in ep.distractors)


def test_prepare_reuses_only_matching_inputs(runs_dir: Path) -> None:
    settings = _settings(runs_dir)
    path = prepare_scripts(settings)
    mtime = path.stat().st_mtime_ns
    assert prepare_scripts(settings).stat().st_mtime_ns == mtime
    other = _settings(runs_dir, limit=3)
    assert len(read_episodes(prepare_scripts(other))) == 3


def test_cli_prepare_and_distractors(runs_dir: Path) -> None:
    runner = CliRunner()
    args = ["--profile", "smoke", "--set", f"runs_dir={runs_dir}"]
    result = runner.invoke(app, ["prepare", *args])
    assert result.exit_code == 0, result.output
    assert f"scripts: {runs_dir / 'data' / 'scripts.jsonl'}" in result.output
    result = runner.invoke(app, ["distractors", *args])
    assert result.exit_code == 0, result.output
    out = runs_dir / "data" / "episodes.jsonl"
    assert f"episodes: {out}" in result.output
    assert len(read_episodes(out)) == 40  # the smoke profile's data.limit


def test_cli_reports_bad_source(tmp_path: Path, runs_dir: Path) -> None:
    result = CliRunner().invoke(
        app, ["prepare", "--set", f"runs_dir={runs_dir}", "--set", f"data.source={tmp_path / 'missing.json'}"]
    )
    assert result.exit_code == 2 and "missing.json: no such file" in result.output


def test_cli_distractors_without_scripts(runs_dir: Path) -> None:
    result = CliRunner().invoke(app, ["distractors", "--set", f"runs_dir={runs_dir}"])
    assert result.exit_code == 2 and "run `agemem data prepare` first" in result.output
