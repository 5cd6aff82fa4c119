"""Bounded load test of the memory tool server (issue 7 §3); loopback only, stops by itself.

Starts ``agemem serve-tools`` as a child process on 127.0.0.1 over a fresh milvus-lite file,
then runs ``--sessions`` concurrent sessions for ``--duration`` seconds. Each session repeats an
episode-shaped mix: stage 1 stores a few facts (Add_memory), stage 3 retrieves (Retrieve_memory)
and sometimes rewrites or drops one of its own memories (Update/Delete_memory); a session keeps at
most ``--keep`` memories, so the store's size, and the server's memory, should level off.
Afterwards every session's memories are listed and compared with what it wrote.

    .venv/bin/python benchmarks/load_tool_server.py                 # 64 sessions, 60 s
    .venv/bin/python benchmarks/load_tool_server.py --duration 5 --sessions 16

Prints a markdown table; exits 1 on any error or lost/changed memory. Targets: 0 errors, 0 lost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import psutil  # noqa: E402

from agemem.memory.process import start_server_process, stop_server_process  # noqa: E402

TOOLS = ("Add_memory", "Retrieve_memory", "Update_memory", "Delete_memory")
_SUBJECTS = ["river", "mountain", "composer", "treaty", "island", "novel", "bridge", "comet", "painter", "dynasty"]


@dataclass
class LoadReport:
    sessions: int
    duration_s: float
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: {t: [] for t in TOOLS})
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    sessions_checked: int = 0
    sessions_lost: int = 0
    lost_samples: list[str] = field(default_factory=list)
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    memories_final: int = 0

    @property
    def ops(self) -> int:
        return sum(len(v) for v in self.latencies_ms.values())

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.sessions_lost == 0 and self.sessions_checked == self.sessions and self.ops > 0

    def error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(text[:300])

    def table(self) -> str:
        lines = [
            f"Load: {self.sessions} sessions for {self.duration_s:.0f} s (loopback, milvus-lite, server = child process)",
            "",
            "| op | count | ops/s | p50 ms | p99 ms |",
            "|---|---:|---:|---:|---:|",
        ]
        every = [x for v in self.latencies_ms.values() for x in v]
        for name, values in [*self.latencies_ms.items(), ("all", every)]:
            lines.append(
                f"| {name} | {len(values)} | {len(values) / self.duration_s:.1f} | {_pct(values, 50):.1f} | {_pct(values, 99):.1f} |"
            )
        growth = self.rss_end_mb - self.rss_start_mb
        lines += [
            "",
            "| check | value | target | pass |",
            "|---|---:|---:|---|",
            f"| errors | {self.errors} | 0 | {_yes(self.errors == 0)} |",
            f"| sessions with lost/changed memories | {self.sessions_lost} of {self.sessions_checked} | 0 | "
            f"{_yes(self.sessions_lost == 0 and self.sessions_checked == self.sessions)} |",
            f"| server RSS start -> end (MB) | {self.rss_start_mb:.0f} -> {self.rss_end_mb:.0f} ({growth:+.0f}) | report | - |",
            f"| memories stored at the end | {self.memories_final} | - | - |",
        ]
        for sample in self.error_samples + self.lost_samples:
            lines.append(f"\n- {sample}")
        return "\n".join(lines)


def _pct(values: list[float], q: int) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _yes(flag: bool) -> str:
    return "yes" if flag else "**NO**"


class _Session:
    def __init__(self, index: int, http: httpx.AsyncClient, report: LoadReport, seed: int, keep: int) -> None:
        self.index = index
        self.http = http
        self.report = report
        self.rng = random.Random(seed * 1000 + index)
        self.keep = keep
        self.sid = ""
        self.auth: dict[str, str] = {}
        self.expected: dict[str, str] = {}  # memory id -> content, what this session should hold
        self.counter = 0

    async def call(self, tool: str, body: dict) -> dict | None:
        t0 = time.perf_counter()
        try:
            r = await self.http.post(f"/sessions/{self.sid}/tools/{tool}", json=body, headers=self.auth)
        except httpx.HTTPError as exc:
            self.report.error(f"session {self.index} {tool}: {type(exc).__name__}: {exc}")
            return None
        self.report.latencies_ms[tool].append((time.perf_counter() - t0) * 1000)
        payload = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != 200 or not payload.get("ok"):
            self.report.error(f"session {self.index} {tool}: HTTP {r.status_code} {r.text[:200]}")
            return None
        return payload

    def fact(self) -> str:
        self.counter += 1
        subject = self.rng.choice(_SUBJECTS)
        return f"Session {self.index} note {self.counter}: the {subject} number {self.rng.randint(1, 10**6)} matters."

    async def run(self, deadline: float) -> None:
        r = await self.http.post("/sessions")
        r.raise_for_status()
        self.sid = r.json()["session_id"]
        self.auth = {"Authorization": f"Bearer {r.json()['session_token']}"}
        while time.monotonic() < deadline:
            # Stage 1: store a few facts.
            for _ in range(self.rng.randint(2, 4)):
                content = self.fact()
                got = await self.call("Add_memory", {"content": content, "memory_type": "knowledge"})
                if got:
                    self.expected[got["data"]["memory_id"]] = content
            # Stage 3: retrieve, sometimes correct or drop a memory.
            # An episode runs to its end even past the deadline: the run overshoots by one episode at most.
            for _ in range(self.rng.randint(2, 4)):
                await self.call("Retrieve_memory", {"query": f"which {self.rng.choice(_SUBJECTS)} matters", "top_k": 3})
            if self.expected and self.rng.random() < 0.5:
                mid = self.rng.choice(sorted(self.expected))
                content = self.fact() + " (updated)"
                if await self.call("Update_memory", {"memory_id": mid, "content": content}):
                    self.expected[mid] = content
            while len(self.expected) > self.keep:
                mid = self.rng.choice(sorted(self.expected))
                if not await self.call("Delete_memory", {"memory_id": mid}):
                    break
                del self.expected[mid]

    async def verify(self) -> bool:
        r = await self.http.get(f"/sessions/{self.sid}/memories", headers=self.auth)
        if r.status_code != 200:
            self.report.lost_samples.append(f"session {self.index}: list answered {r.status_code}")
            return False
        held = {m["memory_id"]: m["content"] for m in r.json()["memories"]}
        self.report.memories_final += len(held)
        if held != self.expected:
            missing = len(self.expected.keys() - held.keys())
            extra = len(held.keys() - self.expected.keys())
            changed = sum(1 for k in self.expected.keys() & held.keys() if held[k] != self.expected[k])
            self.report.lost_samples.append(
                f"session {self.index}: {missing} missing, {extra} unexpected, {changed} changed memories"
            )
            return False
        return True


def _rss_mb(proc: psutil.Process) -> float:
    # The milvus-lite engine runs inside the server process (threads), so this covers the store too.
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


async def run_load_against(
    base_url: str, server_pid: int, *, sessions: int = 64, duration_s: float = 60.0, seed: int = 0, keep: int = 12
) -> LoadReport:
    """Drive an already running server; see the module docstring for the workload."""
    report = LoadReport(sessions=sessions, duration_s=duration_s)
    server = psutil.Process(server_pid)
    limits = httpx.Limits(max_connections=sessions + 4, max_keepalive_connections=sessions + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=limits) as http:
        # Warm-up (first embedding, first search) before the baseline RSS.
        warm = _Session(-1, http, LoadReport(sessions=1, duration_s=1), seed, keep)
        await warm.run(time.monotonic() + 1.0)
        report.rss_start_mb = _rss_mb(server)
        workers = [_Session(i, http, report, seed, keep) for i in range(sessions)]
        t0 = time.monotonic()
        await asyncio.gather(*(w.run(t0 + duration_s) for w in workers))
        report.duration_s = time.monotonic() - t0
        report.rss_end_mb = _rss_mb(server)
        results = await asyncio.gather(*(w.verify() for w in workers))
        report.sessions_checked = len(results)
        report.sessions_lost = results.count(False)
    return report


def run_load(
    *,
    sessions: int = 64,
    duration_s: float = 60.0,
    seed: int = 0,
    keep: int = 12,
    workdir: Path | None = None,
) -> LoadReport:
    """Start a server child over a fresh milvus-lite file, load it, stop it; the report says if it passed."""
    with tempfile.TemporaryDirectory(prefix="agemem-load-") as tmp:
        root = Path(workdir or tmp)
        proc, base_url = start_server_process(root / "memory.db", log_path=root / "server.log")
        try:
            return asyncio.run(
                run_load_against(base_url, proc.pid, sessions=sessions, duration_s=duration_s, seed=seed, keep=keep)
            )
        finally:
            stop_server_process(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--sessions", type=int, default=64, help="concurrent sessions (default 64)")
    parser.add_argument("--keep", type=int, default=12, help="most memories a session keeps (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = run_load(sessions=args.sessions, duration_s=args.duration, seed=args.seed, keep=args.keep)
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
