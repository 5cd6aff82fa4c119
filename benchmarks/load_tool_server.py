"""Bounded load test of the memory tool server (issue 7 §3); loopback only, stops by itself.

Starts ``agemem serve-tools`` as a child process on 127.0.0.1 over a fresh milvus-lite file,
then runs ``--sessions`` concurrent sessions for ``--duration`` seconds. Each session repeats an
episode-shaped mix: stage 1 stores a few facts (Add_memory), stage 3 retrieves (Retrieve_memory)
and sometimes rewrites or drops one of its own memories (Update/Delete_memory); a session keeps at
most ``--keep`` memories, so the store's size, and the server's memory, should level off.
Afterwards every session's memories are listed and compared with what it wrote.

Two more phases follow on the same server (loopback only, bounded in time and connections):

- fairness: ``--quiet`` sessions make one small Retrieve_memory at a time, first alone, then
  beside a noisy neighbour that keeps 48 Add_memory calls of 8 KB in flight; per-session p50/p99
  of the quiet sessions, both ways (the embedding batches admit sessions round-robin).
- slow clients: ``--idle`` connections that never send a request, plus a few that trickle a
  request head byte by byte, held for ``--slow-duration`` seconds, while /healthz is polled and a
  connected worker keeps calling; the server must answer both, and close the idle connections
  after ``memory.header_timeout_s``.

    .venv/bin/python benchmarks/load_tool_server.py                 # 64 sessions, 60 s
    .venv/bin/python benchmarks/load_tool_server.py --duration 5 --sessions 16

Prints markdown tables; exits 1 on any error, lost/changed memory, or unanswered health check.
Targets: 0 errors, 0 lost, every health check and worker call answered during the slow-client phase.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import socket
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

from agemem.memory.client import KEEPALIVE_EXPIRY_S  # noqa: E402
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
    per_session_ms: dict[int, list[float]] = field(default_factory=dict)
    fairness: FairnessReport | None = None
    slow_clients: SlowClientReport | None = None

    @property
    def ops(self) -> int:
        return sum(len(v) for v in self.latencies_ms.values())

    @property
    def ok(self) -> bool:
        load_ok = self.errors == 0 and self.sessions_lost == 0 and self.sessions_checked == self.sessions and self.ops > 0
        return load_ok and (self.slow_clients is None or self.slow_clients.ok)

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
        if self.per_session_ms:
            p50s = sorted(_pct(v, 50) for v in self.per_session_ms.values() if v)
            p99s = sorted(_pct(v, 99) for v in self.per_session_ms.values() if v)
            lines += [
                "",
                "Per-session latency during the load (each session's own p50 / p99, over all its calls):",
                "",
                "| per-session | min ms | median ms | max ms |",
                "|---|---:|---:|---:|",
                f"| p50 | {p50s[0]:.1f} | {statistics.median(p50s):.1f} | {p50s[-1]:.1f} |",
                f"| p99 | {p99s[0]:.1f} | {statistics.median(p99s):.1f} | {p99s[-1]:.1f} |",
            ]
        for sample in self.error_samples + self.lost_samples:
            lines.append(f"\n- {sample}")
        if self.fairness is not None:
            lines += ["", self.fairness.table()]
        if self.slow_clients is not None:
            lines += ["", self.slow_clients.table()]
        return "\n".join(lines)


@dataclass
class FairnessReport:
    quiet_sessions: int
    noisy_in_flight: int
    alone_ms: dict[int, list[float]] = field(default_factory=dict)
    beside_noise_ms: dict[int, list[float]] = field(default_factory=dict)
    noisy_ms: list[float] = field(default_factory=list)
    errors: int = 0

    def table(self) -> str:
        lines = [
            f"Fairness: {self.quiet_sessions} quiet sessions (one small Retrieve_memory at a time), alone and beside "
            f"a noisy session keeping {self.noisy_in_flight} Add_memory calls of 8 KB in flight:",
            "",
            "| session | calls alone | p50 / p99 ms alone | calls beside the noise | p50 / p99 ms beside the noise | "
            "p50 ratio |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for i in sorted(self.alone_ms):
            a, b = self.alone_ms[i], self.beside_noise_ms.get(i, [])
            ratio = _pct(b, 50) / _pct(a, 50) if a and b else float("nan")
            lines.append(f"| quiet {i} | {len(a)} | {_pct(a, 50):.1f} / {_pct(a, 99):.1f} | {len(b)} | "
                         f"{_pct(b, 50):.1f} / {_pct(b, 99):.1f} | {ratio:.1f}x |")
        lines.append(f"| noisy (its adds) | - | - | {len(self.noisy_ms)} | {_pct(self.noisy_ms, 50):.1f} / "
                     f"{_pct(self.noisy_ms, 99):.1f} | - |")
        if self.errors:
            lines.append(f"\n{self.errors} calls failed in the fairness phase")
        return "\n".join(lines)


@dataclass
class SlowClientReport:
    idle: int
    trickling: int
    duration_s: float
    opened: int = 0
    open_failures: int = 0
    health_ok: int = 0
    health_total: int = 0
    health_ms: list[float] = field(default_factory=list)
    worker_ok: int = 0
    worker_total: int = 0
    worker_ms: list[float] = field(default_factory=list)
    closed_by_server: int = 0
    closed_after_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.health_total > 0 and self.health_ok == self.health_total and self.worker_ok == self.worker_total

    def table(self) -> str:
        closed = f"{self.closed_by_server} of {self.opened}"
        after = (f"{min(self.closed_after_s):.1f}-{max(self.closed_after_s):.1f} s after opening"
                 if self.closed_after_s else "-")
        return "\n".join([
            f"Slow clients: {self.idle} idle connections (never send a byte) and {self.trickling} trickling a request "
            f"head one byte per second, held {self.duration_s:.0f} s, while /healthz is polled and a connected worker "
            "calls Retrieve_memory:",
            "",
            "| check | value | target | pass |",
            "|---|---:|---:|---|",
            f"| health checks answered | {self.health_ok} of {self.health_total} (p99 {_pct(self.health_ms, 99):.1f} ms) "
            f"| all | {_yes(self.health_total > 0 and self.health_ok == self.health_total)} |",
            f"| connected worker's calls answered 200 | {self.worker_ok} of {self.worker_total} "
            f"(p99 {_pct(self.worker_ms, 99):.1f} ms) | all | {_yes(self.worker_ok == self.worker_total)} |",
            f"| slow connections closed by the server | {closed} ({after}) | report | - |",
            f"| connections the client could not open | {self.open_failures} | report | - |",
        ])


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
        elapsed = (time.perf_counter() - t0) * 1000
        self.report.latencies_ms[tool].append(elapsed)
        self.report.per_session_ms.setdefault(self.index, []).append(elapsed)
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
    limits = httpx.Limits(max_connections=sessions + 4, max_keepalive_connections=sessions + 4,
                          keepalive_expiry=KEEPALIVE_EXPIRY_S)
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


async def _session(http: httpx.AsyncClient) -> tuple[str, dict[str, str]]:
    r = await http.post("/sessions")
    r.raise_for_status()
    return r.json()["session_id"], {"Authorization": f"Bearer {r.json()['session_token']}"}


async def run_fairness(base_url: str, *, quiet: int = 4, noisy_in_flight: int = 48, duration_s: float = 10.0,
                       seed: int = 0) -> FairnessReport:
    """Quiet sessions alone for ``duration_s``, then beside a noisy neighbour for ``duration_s``."""
    report = FairnessReport(quiet_sessions=quiet, noisy_in_flight=noisy_in_flight)
    rng = random.Random(seed)
    filler = " ".join(rng.choice(_SUBJECTS) for _ in range(1400))[:8000]  # ~8 KB, under memory.max_content_bytes
    limits = httpx.Limits(max_connections=quiet + noisy_in_flight + 4, keepalive_expiry=KEEPALIVE_EXPIRY_S)
    async with httpx.AsyncClient(base_url=base_url, timeout=120.0, limits=limits) as http:
        quiet_sessions = [await _session(http) for _ in range(quiet)]
        for sid, auth in quiet_sessions:
            await http.post(f"/sessions/{sid}/tools/Add_memory", json={"content": "the quiet session's note"},
                            headers=auth)

        async def quiet_loop(i: int, until: float, into: dict[int, list[float]]) -> None:
            sid, auth = quiet_sessions[i]
            n = 0
            while time.monotonic() < until:
                n += 1
                t0 = time.perf_counter()
                # A new query each time: a cached vector would hide the embedding queue.
                r = await http.post(f"/sessions/{sid}/tools/Retrieve_memory", json={"query": f"note {i}.{n}"},
                                    headers=auth)
                if r.status_code != 200:
                    report.errors += 1
                    continue
                into.setdefault(i, []).append((time.perf_counter() - t0) * 1000)

        until = time.monotonic() + duration_s
        await asyncio.gather(*(quiet_loop(i, until, report.alone_ms) for i in range(quiet)))

        noisy_sid, noisy_auth = await _session(http)
        stop = asyncio.Event()

        async def noisy(k: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                t0 = time.perf_counter()
                r = await http.post(f"/sessions/{noisy_sid}/tools/Add_memory",
                                    json={"content": f"noise {k}.{n} {filler}"[:8000]}, headers=noisy_auth)
                if r.status_code != 200:
                    report.errors += 1
                    continue
                report.noisy_ms.append((time.perf_counter() - t0) * 1000)

        noise = [asyncio.create_task(noisy(k)) for k in range(noisy_in_flight)]
        await asyncio.sleep(min(2.0, duration_s / 4))  # the neighbour's queue fills first
        until = time.monotonic() + duration_s
        await asyncio.gather(*(quiet_loop(i, until, report.beside_noise_ms) for i in range(quiet)))
        stop.set()
        await asyncio.gather(*noise)
        await http.delete(f"/sessions/{noisy_sid}", headers=noisy_auth)
    return report


def _raise_own_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def run_slow_clients(base_url: str, *, idle: int = 1100, trickling: int = 8,
                           duration_s: float = 15.0) -> SlowClientReport:
    """Hold idle and trickling connections for ``duration_s`` while polling health and a connected worker."""
    report = SlowClientReport(idle=idle, trickling=trickling, duration_s=duration_s)
    host, port = base_url.rsplit("//", 1)[1].rsplit(":", 1)
    _raise_own_file_limit(idle + trickling + 256)
    loop = asyncio.get_running_loop()
    conns: list[tuple[socket.socket, float]] = []
    for _ in range(idle + trickling):
        try:
            sock = socket.create_connection((host, int(port)), timeout=5)
        except OSError:
            report.open_failures += 1
            continue
        sock.setblocking(False)
        conns.append((sock, time.monotonic()))
    report.opened = len(conns)
    trickle = [s for s, _ in conns[idle:]]
    head = b"POST /sessions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 10_000
    closed_at: dict[int, float] = {}

    async def watch(sock: socket.socket, opened: float) -> None:
        try:
            while True:
                if not await loop.sock_recv(sock, 4096):
                    break
        except OSError:
            pass
        closed_at[sock.fileno()] = time.monotonic() - opened

    watchers = [asyncio.create_task(watch(s, t)) for s, t in conns]

    async def trickler() -> None:
        for i in range(int(duration_s)):
            for sock in trickle:
                try:
                    sock.send(head[i : i + 1])
                except OSError:
                    pass
            await asyncio.sleep(1.0)

    limits = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S)
    async with httpx.AsyncClient(base_url=base_url, timeout=10.0, limits=limits) as worker, \
            httpx.AsyncClient(base_url=base_url, timeout=10.0, limits=limits) as prober:
        sid, auth = await _session(worker)
        deadline = time.monotonic() + duration_s

        async def poll() -> None:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                report.health_total += 1
                try:
                    if (await prober.get("/healthz")).status_code == 200:
                        report.health_ok += 1
                        report.health_ms.append((time.perf_counter() - t0) * 1000)
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.25)

        async def work() -> None:
            n = 0
            while time.monotonic() < deadline:
                n += 1
                t0 = time.perf_counter()
                report.worker_total += 1
                try:
                    r = await worker.post(f"/sessions/{sid}/tools/Retrieve_memory", json={"query": f"q {n}"},
                                          headers=auth)
                    if r.status_code == 200:
                        report.worker_ok += 1
                        report.worker_ms.append((time.perf_counter() - t0) * 1000)
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)

        await asyncio.gather(poll(), work(), trickler())
        await worker.delete(f"/sessions/{sid}", headers=auth)
    await asyncio.sleep(0.5)
    for task in watchers:
        task.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    report.closed_by_server = len(closed_at)
    report.closed_after_s = sorted(closed_at.values())
    for sock, _ in conns:
        sock.close()
    return report


def run_load(
    *,
    sessions: int = 64,
    duration_s: float = 60.0,
    seed: int = 0,
    keep: int = 12,
    workdir: Path | None = None,
    fairness_s: float = 0.0,
    quiet: int = 4,
    slow_s: float = 0.0,
    idle: int = 1100,
) -> LoadReport:
    """Start a server child over a fresh milvus-lite file, load it, stop it; the report says if it passed.

    ``fairness_s`` > 0 and ``slow_s`` > 0 add the fairness and slow-client phases.
    """
    with tempfile.TemporaryDirectory(prefix="agemem-load-") as tmp:
        root = Path(workdir or tmp)
        proc, base_url = start_server_process(root / "memory.db", log_path=root / "server.log")
        try:
            report = asyncio.run(
                run_load_against(base_url, proc.pid, sessions=sessions, duration_s=duration_s, seed=seed, keep=keep)
            )
            if fairness_s > 0:
                report.fairness = asyncio.run(run_fairness(base_url, quiet=quiet, duration_s=fairness_s, seed=seed))
            if slow_s > 0:
                report.slow_clients = asyncio.run(run_slow_clients(base_url, idle=idle, duration_s=slow_s))
            return report
        finally:
            stop_server_process(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--sessions", type=int, default=64, help="concurrent sessions (default 64)")
    parser.add_argument("--keep", type=int, default=12, help="most memories a session keeps (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fairness-duration", type=float, default=15.0,
                        help="seconds of each fairness half (quiet alone, then beside the noise); 0 = skip")
    parser.add_argument("--quiet", type=int, default=4, help="quiet sessions in the fairness phase (default 4)")
    parser.add_argument("--slow-duration", type=float, default=15.0,
                        help="seconds of the slow-client phase (default 15; memory.header_timeout_s is 10); 0 = skip")
    parser.add_argument("--idle", type=int, default=1100, help="idle connections in the slow-client phase")
    args = parser.parse_args(argv)
    report = run_load(sessions=args.sessions, duration_s=args.duration, seed=args.seed, keep=args.keep,
                      fairness_s=args.fairness_duration, quiet=args.quiet, slow_s=args.slow_duration, idle=args.idle)
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
