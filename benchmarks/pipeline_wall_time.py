"""Smoke pipeline wall time by stage: a first run from a fresh runs dir, then a cached re-run.

Each run is the real command users type (``agemem pipeline``, a fresh process on Prefect's
ephemeral API), so the "whole command" row includes interpreter start, imports and the temporary
Prefect server. Stage times come from the flow's own result. Prints a markdown table.

    .venv/bin/python benchmarks/pipeline_wall_time.py [--profile smoke] [--set k=v ...] [--runs-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AGEMEM = str(Path(sys.executable).with_name("agemem"))
STAGES = ("prepare_data", "synthesize_distractors", "train", "evaluate", "register")


def run_once(profile: str, sets: list[str], runs_dir: Path, env: dict[str, str]) -> tuple[float, dict]:
    cmd = [AGEMEM, "pipeline", "--profile", profile, "--set", f"runs_dir={runs_dir}"]
    for pair in sets:
        cmd += ["--set", pair]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"pipeline failed with exit code {proc.returncode}")
    out = proc.stdout
    summary = json.loads(out[out.index('{\n  "metrics"'): out.index("\n}\n") + 2])
    for line in out.splitlines():
        if line.startswith(("MLflow run:", "Registered model:")):
            summary.setdefault("where", []).append(line)
    return wall, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="Settings override (repeatable).")
    parser.add_argument("--runs-dir", type=Path, default=None, help="Default: a fresh temporary directory.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary runs dir.")
    args = parser.parse_args()

    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="agemem-bench-")) / "runs"
    if runs_dir.exists() and any(runs_dir.iterdir()):
        raise SystemExit(f"{runs_dir} is not empty: the first run must start from a fresh runs dir")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # ephemeral API
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        first_wall, first = run_once(args.profile, args.sets, runs_dir, env)
        second_wall, second = run_once(args.profile, args.sets, runs_dir, env)
    finally:
        if args.runs_dir is None and not args.keep:
            shutil.rmtree(runs_dir.parent, ignore_errors=True)

    print(f"## Smoke pipeline wall time (profile {args.profile}, {os.cpu_count()} CPUs)\n")
    print("| stage | first run (s) | re-run, unchanged inputs (s) | re-run from cache |")
    print("|---|---|---|---|")
    for stage in STAGES:
        cached = second["cached"].get(stage)
        print(f"| {stage} | {first['timings_s'].get(stage, 0):.1f} | {second['timings_s'].get(stage, 0):.1f} | "
              f"{'yes' if cached else ('no' if cached is False else 'no (runs every time)')} |")
    print(f"| all stages | {sum(first['timings_s'].values()):.1f} | {sum(second['timings_s'].values()):.1f} | |")
    print(f"| whole command (process, imports, Prefect ephemeral API) | {first_wall:.1f} | {second_wall:.1f} | |")
    print()
    print(f"J={first['metrics'].get('judge_score')}, questions={first['metrics'].get('n')}; "
          + "; ".join(second.get("where", [])))


if __name__ == "__main__":
    main()
