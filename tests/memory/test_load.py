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


@pytest.mark.slow
def test_fairness_and_slow_client_phases(tmp_path) -> None:
    report = run_load(sessions=4, duration_s=2.0, seed=1, workdir=tmp_path, fairness_s=3.0, quiet=2, slow_s=12.0,
                      idle=300)
    assert report.ok, report.table()
    fair, slow = report.fairness, report.slow_clients
    assert fair is not None and fair.errors == 0 and all(fair.beside_noise_ms[i] for i in range(2))
    assert slow is not None and slow.health_total >= 20 and slow.health_ok == slow.health_total
    assert slow.worker_ok == slow.worker_total > 0
    assert slow.closed_by_server == slow.opened  # the head deadline (10 s) closed every slow connection
    assert "Per-session latency" in report.table() and "Slow clients" in report.table()
