"""The load benchmark as a CI check (short duration): no errors, no lost memories."""

from __future__ import annotations

import pytest

from benchmarks.load_tool_server import run_load


@pytest.mark.slow
def test_load_short_run_is_clean(tmp_path) -> None:
    report = run_load(sessions=16, duration_s=5.0, seed=1, keep=2, workdir=tmp_path)
    assert report.errors == 0, report.error_samples
    assert report.sessions_checked == 16 and report.sessions_lost == 0, report.lost_samples
    # Every kind of call ran, so the check covered the whole stage-1 / stage-3 mix.
    assert all(report.latencies_ms[t] for t in ("Add_memory", "Retrieve_memory", "Update_memory", "Delete_memory"))
    assert report.ok and report.rss_end_mb > 0
