"""agemem doctor: one line per requirement on this (CPU, offline) machine, each miss with its fix; a verl
launch stops with that report instead of a verl traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from agemem import doctor
from agemem.cli.doctor import doctor as doctor_command
from agemem.cli.train import train
from agemem.settings import load_settings


def _app(command) -> typer.Typer:
    app = typer.Typer()
    app.command()(command)
    return app


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_verl_on_this_cpu_machine_lists_each_missing_requirement(runs_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("AGEMEM_RUNS_DIR", str(runs_dir))
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    result = CliRunner().invoke(_app(doctor_command), ["--backend", "verl", "--profile", "paper"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    failed = [line for line in lines if line.startswith("FAIL ")]
    assert {line.split(":")[0].split()[1] for line in failed} >= {"gpus", "vllm", "model", "dashscope"}
    assert all("-> fix:" in line for line in failed)
    assert lines[-1] == f"{len(failed)} of {len(lines) - 1} requirements missing"
    assert "Traceback" not in result.output


def test_local_backend_needs_only_the_stores(runs_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("AGEMEM_RUNS_DIR", str(runs_dir))
    result = CliRunner().invoke(_app(doctor_command), [])
    assert result.exit_code == 0, result.output
    assert {line.split(":")[0] for line in result.output.splitlines()[:-1]} == {"ok   milvus", "ok   mlflow",
                                                                               "ok   dashscope"}


def test_cluster_checks_ray_cli_address_tracking_and_tool_server(runs_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(runs_dir))  # no `ray` here
    settings = load_settings("paper", {"runs_dir": str(runs_dir), "train": {"ray_address": f"http://127.0.0.1:{_closed_port()}"}})
    checks = {c.name: c for c in doctor.run_checks(settings, "verl")}
    assert checks["ray"].status == "fail" and "PATH" in checks["ray"].detail
    assert checks["ray-address"].status == "fail"
    assert checks["mlflow"].status == "fail" and "sqlite" in checks["mlflow"].detail
    assert checks["tool-server"].status == "fail" and "loopback" in checks["tool-server"].detail


def test_unreachable_servers_and_missing_keys_are_named(runs_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("DASHSCOPE_API_KEY", raising=False)
    port = _closed_port()
    settings = load_settings("smoke", {"runs_dir": str(runs_dir), "memory": {"uri": f"http://127.0.0.1:{port}"},
                                       "tracking": {"tracking_uri": f"http://127.0.0.1:{port}"},
                                       "judge": {"backend": "dashscope", "model": "qwen-max"}})
    checks = {c.name: c for c in doctor.run_checks(settings)}
    assert [checks[n].status for n in ("milvus", "mlflow", "dashscope")] == ["fail", "fail", "fail"]
    assert "judge" in checks["dashscope"].detail


def test_train_verl_stops_with_the_report(runs_dir: Path, episodes_file: Path, monkeypatch) -> None:
    monkeypatch.setenv("AGEMEM_RUNS_DIR", str(runs_dir))
    result = CliRunner().invoke(_app(train), ["--backend", "verl", "--episodes", str(episodes_file)])
    assert result.exit_code == 1
    assert "preflight failed (agemem doctor)" in result.output and "FAIL gpus" in result.output
    assert "Traceback" not in result.output and not (runs_dir / "verl" / "train.parquet").exists()
