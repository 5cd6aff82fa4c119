"""Memory tool server benchmark (issue 4): embedding vs HTTP throughput, and search latency.

1. Raw batched embedding throughput (sentences/s): the bundled all-MiniLM-L6-v2 on the
   benchmark's real sentences (HotpotQA sample), in calls of ``memory.embed_batch_size`` texts,
   each cut by length into forward passes of ``memory.embed_forward_batch_size``: the server's
   own batching, without HTTP or search. For context, also one forward pass per 64 texts in
   arrival order (the server's batching before length grouping).
2. Search latency at 1k and 10k memories in one session of one collection: the Milvus store
   (milvus-lite file) beside the reference design, a pure-Python cosine store (a list of vectors
   scanned per query in Python, as in the authors' ``InMemoryVectorStore``), on the same vectors
   and queries. A numpy matrix scan is shown too, for scale.
3. Over HTTP (the server as a child process on 127.0.0.1, its store pre-filled with the 10k
   memories): Add_memory and Retrieve_memory at 1, 16 and 64 concurrent sessions (each session
   sends its next request when the last one returns), and Retrieve_memory in the 10k-memory session.

    .venv/bin/python benchmarks/memory_server.py            # full run, a few minutes
    .venv/bin/python benchmarks/memory_server.py --quick    # sizes 1k/3k, 4 s per HTTP row

Targets: retrieve throughput at 64 sessions >= 90 % of raw batched embedding throughput;
p99 retrieve < 100 ms at 10k memories; Milvus search >= 10x faster than the pure-Python store at
10k memories. Timings depend on the machine and on what else runs on it: note both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402


def _pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _yes(flag: bool) -> str:
    return "yes" if flag else "**NO**"


def sentences(n: int) -> list[str]:
    """``n`` distinct real sentences from the shipped HotpotQA sample."""
    from agemem.assets import SAMPLE_DATA

    seen: dict[str, None] = {}
    for record in json.loads(SAMPLE_DATA.read_text()):
        for title, sents in record["context"]:
            for s in sents:
                text = f"{title}: {s.strip()}"
                if len(text) > 20:
                    seen.setdefault(text, None)
    out = list(seen)
    if len(out) < n:
        out += [f"{out[i % len(out)]} (copy {i // len(out)})" for i in range(n - len(out))]
    return out[:n]


class PurePythonCosineStore:
    """The reference design: items in a list, cosine computed in pure Python per item per query."""

    def __init__(self) -> None:
        self.items: list[tuple[str, list[float]]] = []

    def add(self, memory_id: str, vector: list[float]) -> None:
        self.items.append((memory_id, vector))

    def search(self, query: list[float], top_k: int) -> list[tuple[str, float]]:
        qn = math.sqrt(sum(x * x for x in query))
        scored = []
        for memory_id, vec in self.items:
            dot = sum(a * b for a, b in zip(query, vec))
            norm = math.sqrt(sum(b * b for b in vec))
            score = dot / (qn * norm) if qn and norm else 0.0
            if score > 0:
                scored.append((memory_id, score))
        scored.sort(key=lambda t: t[1], reverse=True)
        return scored[: max(1, top_k)]


def _timed(fn, queries) -> list[float]:
    out = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def search_latency(db: Path, contents: list[str], vectors: np.ndarray, sizes: list[int], queries: np.ndarray,
                   py_queries: int) -> list[dict]:
    """Milvus vs pure Python vs numpy search latency (ms) at each size, one session, top_k 3."""
    from agemem.memory.base import MemoryItem
    from agemem.memory.store import MilvusMemoryStore

    store = MilvusMemoryStore(str(db), dim=vectors.shape[1], flush_rows=10**9, flush_interval_s=3600)
    session = secrets.token_hex(16)
    ref = PurePythonCosineStore()
    rows, have = [], 0
    for size in sizes:
        items = [MemoryItem(memory_id=f"m{i:08d}", content=contents[i]) for i in range(have, size)]
        for k in range(0, len(items), 1000):
            store.add(session, items[k : k + 1000], vectors[have + k : have + k + len(items[k : k + 1000])])
        for i in range(have, size):
            ref.add(f"m{i:08d}", vectors[i].tolist())
        have = size
        store.flush()
        store.search(session, queries[0], 3)  # the first search after a flush builds the index
        matrix = vectors[:size]
        milvus = _timed(lambda q: store.search(session, q, 3), queries)
        numpy_ms = _timed(lambda q: np.argsort(-(matrix @ q))[:3], queries)
        py_list = [q.tolist() for q in queries[:py_queries]]
        python_ms = _timed(lambda q: ref.search(q, 3), py_list)
        top_m = [m.memory_id for m in store.search(session, queries[0], 3)]
        top_p = [m for m, _ in ref.search(queries[0].tolist(), 3)]
        rows.append({"size": size, "milvus": milvus, "python": python_ms, "numpy": numpy_ms, "same_top": top_m == top_p})
    store.close()
    return rows


def _populate(db: str, session_id: str, token_hash: str, contents: list[str], vectors_path: str) -> None:
    """Child process: write one session of memories into the server's store file, then exit (lock freed)."""
    from agemem.memory.base import MemoryItem
    from agemem.memory.store import MilvusMemoryStore

    vectors = np.load(vectors_path)
    store = MilvusMemoryStore(db, dim=vectors.shape[1], flush_rows=10**9, flush_interval_s=3600)
    store.put_session(session_id, token_hash)
    now = time.time()
    items = [MemoryItem(memory_id=secrets.token_hex(16), content=c, created_at=now, updated_at=now) for c in contents]
    for k in range(0, len(items), 1000):
        store.add(session_id, items[k : k + 1000], vectors[k : k + 1000])
    store.close()


def _cpu_s(proc, *, children: bool = True) -> float:
    """CPU seconds used so far by ``proc`` (and its live children)."""
    import psutil

    total = 0.0
    for p in [proc, *(proc.children(recursive=True) if children else [])]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


async def http_rows(base_url: str, server_pid: int, concurrency: list[int], duration_s: float, texts: list[str],
                    big: tuple[str, str] | None) -> list[dict]:
    import httpx
    import psutil

    server, me = psutil.Process(server_pid), psutil.Process()

    rows = []
    limits = httpx.Limits(max_connections=max(concurrency) + 4, max_keepalive_connections=max(concurrency) + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:

        async def new_session() -> tuple[str, dict[str, str]]:
            body = (await http.post("/sessions")).json()
            return body["session_id"], {"Authorization": f"Bearer {body['session_token']}"}

        async def drive(tool: str, sessions: list[tuple[str, dict[str, str]]], seconds: float) -> dict:
            latencies: list[float] = []
            errors = 0
            deadline = time.monotonic() + seconds
            counter = iter(range(10**9))

            async def one(sid: str, auth: dict[str, str]) -> None:
                nonlocal errors
                while time.monotonic() < deadline:
                    i = next(counter)
                    text = texts[i % len(texts)]
                    body = {"content": text} if tool == "Add_memory" else {"query": text, "top_k": 3}
                    t0 = time.perf_counter()
                    r = await http.post(f"/sessions/{sid}/tools/{tool}", json=body, headers=auth)
                    latencies.append((time.perf_counter() - t0) * 1000)
                    if r.status_code != 200 or not r.json().get("ok"):
                        errors += 1

            # The server is this process's child: count only this process as the load generator.
            cpu0, t0 = (_cpu_s(server), _cpu_s(me, children=False)), time.monotonic()
            await asyncio.gather(*(one(sid, auth) for sid, auth in sessions))
            wall = time.monotonic() - t0
            server_cpu, client_cpu = _cpu_s(server) - cpu0[0], _cpu_s(me, children=False) - cpu0[1]
            return {"tool": tool, "sessions": len(sessions), "ops_s": len(latencies) / wall,
                    "p50": _pct(latencies, 50), "p99": _pct(latencies, 99), "n": len(latencies), "errors": errors,
                    "server_cores": server_cpu / wall, "client_cores": client_cpu / wall,
                    "server_ms_op": 1000 * server_cpu / max(1, len(latencies)),
                    "client_ms_op": 1000 * client_cpu / max(1, len(latencies))}

        warm = [await new_session()]
        await drive("Add_memory", warm, 1.0)
        await drive("Retrieve_memory", warm, 1.0)
        for c in concurrency:
            sessions = [await new_session() for _ in range(c)]
            rows.append(await drive("Add_memory", sessions, duration_s))
            rows.append(await drive("Retrieve_memory", sessions, duration_s))
        if big is not None:
            sid, token = big
            row = await drive("Retrieve_memory", [(sid, {"Authorization": f"Bearer {token}"})], duration_s)
            row["note"] = "session holding the big set"
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 1000,3000; 4 s per HTTP row; fewer queries")
    parser.add_argument("--sizes", default=None, help="memories in the search-latency rows (default 1000,10000)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per HTTP row (default 10)")
    parser.add_argument("--concurrency", default="1,16,64", help="concurrent sessions for the HTTP rows")
    parser.add_argument("--queries", type=int, default=None, help="search queries per size (default 100)")
    parser.add_argument("--server-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the server process, e.g. memory.embedding_threads=1 (repeatable)")
    parser.add_argument("--python-queries", type=int, default=None, help="of those, run on the pure-Python store (default 20)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("1000,3000" if args.quick else "1000,10000")).split(",")]
    duration = args.duration or (4.0 if args.quick else 10.0)
    n_queries = args.queries or (30 if args.quick else 100)
    py_queries = min(n_queries, args.python_queries or (5 if args.quick else 20))
    concurrency = [int(c) for c in args.concurrency.split(",")]

    import torch

    from agemem.memory.embedder import get_embedder
    from agemem.memory.process import start_server_process, stop_server_process
    from agemem.memory.service import hash_token
    from agemem.settings import load_settings

    mem = load_settings("smoke").memory
    embedder = get_embedder(mem.embedding_model, mem.embedding_device, batch_size=mem.embed_batch_size,
                            forward_batch_size=mem.embed_forward_batch_size)
    corpus = sentences(max(sizes) + n_queries)
    contents, query_texts = corpus[: max(sizes)], corpus[max(sizes) :]
    embedder.encode(contents[:64])  # warm-up

    def chunked(texts: list[str]) -> tuple[np.ndarray, float, float]:
        """Vectors, sentences/s, CPU ms per sentence (all threads of this process)."""
        t0, c0 = time.perf_counter(), time.process_time()
        out = np.concatenate([embedder.encode(texts[k : k + mem.embed_batch_size])
                              for k in range(0, len(texts), mem.embed_batch_size)])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return out, len(texts) / wall, 1000 * cpu / len(texts)

    vectors, raw, raw_ms = chunked(contents)
    embedder.forward_batch_size = 64
    _, raw_unsorted, raw_unsorted_ms = chunked(contents[:2000])
    embedder.forward_batch_size = mem.embed_forward_batch_size
    queries = embedder.encode(query_texts)

    with tempfile.TemporaryDirectory(prefix="agemem-bench-") as tmp:
        root = Path(tmp)
        search = search_latency(root / "search.db", contents, vectors, sizes, queries, py_queries)
        np.save(root / "vectors.npy", vectors)
        big_sid, big_token = secrets.token_hex(16), secrets.token_urlsafe(32)
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(target=_populate, args=(str(root / "server.db"), big_sid, hash_token(big_token), contents,
                                                    str(root / "vectors.npy")))
        child.start()
        child.join()
        if child.exitcode != 0:
            print(f"pre-filling the server store failed (exit {child.exitcode})", file=sys.stderr)
            return 1
        # The HTTP rows repeat texts: the server's vector cache would measure dictionary look-ups.
        proc, base_url = start_server_process(root / "server.db", log_path=root / "server.log",
                                              extra=["--set", "memory.embed_cache_size=0",
                                                     *(a for kv in args.server_set for a in ("--set", kv))])
        try:
            http = asyncio.run(http_rows(base_url, proc.pid, concurrency, duration, query_texts + contents[:2000],
                                         (big_sid, big_token)))
        finally:
            stop_server_process(proc)

    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; milvus-lite; server = child process "
          f"on 127.0.0.1; {duration:g} s per HTTP row.\n")
    print("| workload | sessions | throughput (/s) | p50 ms | p99 ms | vs raw embedding | errors | CPU cores: server + "
          "load generator | CPU ms per op: server + load generator | target | pass |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    print(f"| raw batched embedding (calls of {mem.embed_batch_size}, forward passes of "
          f"{mem.embed_forward_batch_size} by length) | - | {raw:.0f} sentences | - | - | 100% | - | "
          f"{raw * raw_ms / 1000:.2f} | {raw_ms:.1f} | - | - |")
    print(f"| for context: one forward pass per 64 texts in arrival order | - | {raw_unsorted:.0f} sentences | - | - | "
          f"{raw_unsorted / raw:.0%} | - | {raw_unsorted * raw_unsorted_ms / 1000:.2f} | {raw_unsorted_ms:.1f} | - | - |")
    for r in http:
        share = r["ops_s"] / raw
        target, ok = "-", "-"
        if r["tool"] == "Retrieve_memory" and r.get("note"):
            target, ok = "p99 < 100 ms", _yes(r["p99"] < 100)
        elif r["tool"] == "Retrieve_memory" and r["sessions"] == 64:
            target, ok = ">= 90% of raw", _yes(share >= 0.9)
        name = r["tool"] + (f" ({r['note']}, {max(sizes)} memories)" if r.get("note") else "")
        print(f"| {name} | {r['sessions']} | {r['ops_s']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {share:.0%} | "
              f"{r['errors']} | {r['server_cores']:.2f} + {r['client_cores']:.2f} | "
              f"{r['server_ms_op']:.1f} + {r['client_ms_op']:.1f} | {target} | {ok} |")
    print(f"\nSearch latency, one session, top_k 3, {n_queries} queries ({py_queries} on the pure-Python store):\n")
    print("| memories | Milvus p50 / p99 ms | pure-Python p50 / p99 ms | numpy scan p50 / p99 ms | Milvus speed-up vs "
          "pure-Python | same top-3 | target | pass |")
    print("|---:|---:|---:|---:|---:|---|---|---|")
    for s in search:
        speedup = statistics.median(s["python"]) / statistics.median(s["milvus"])
        big = s["size"] == max(sizes) and s["size"] >= 10_000
        print(f"| {s['size']} | {_pct(s['milvus'], 50):.2f} / {_pct(s['milvus'], 99):.2f} | "
              f"{_pct(s['python'], 50):.1f} / {_pct(s['python'], 99):.1f} | "
              f"{_pct(s['numpy'], 50):.2f} / {_pct(s['numpy'], 99):.2f} | {speedup:.0f}x | {s['same_top']} | "
              f"{'>= 10x' if big else '-'} | {_yes(speedup >= 10) if big else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
