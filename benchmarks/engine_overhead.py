"""Episode-engine overhead in the local trainer: everything but generation, as a share of wall time.

Runs episodes one at a time (so no time is spent waiting on another episode's generation)
through the same path the local trainer uses: ``run_episode`` -> ``EpisodeEngine.run_tokens`` ->
``LocalTokenServer`` (tiny random Qwen2 on CPU by default), with the in-process memory store
and the offline judge. Prints a markdown table per episode and the total.

    .venv/bin/python benchmarks/engine_overhead.py --episodes 4
    .venv/bin/python benchmarks/engine_overhead.py --episodes 4 --set train.tiny_hidden_size=256

Target: overhead < 5 % of episode wall time. With a random tiny model generation is cheap, so
this is a pessimistic bound: a real 7B policy makes generation, not the engine, dominate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


async def main(args: argparse.Namespace) -> None:
    import torch

    from agemem.agent.scripted import episode_from_raw
    from agemem.agent.verl_loop import build_engine, run_episode
    from agemem.assets import SAMPLE_DATA
    from agemem.settings import load_settings
    from agemem.train.local import resolve_device
    from agemem.train.tiny_model import load_policy_model, load_tokenizer
    from agemem.train.token_server import LocalTokenServer

    overrides = list(args.set or [])
    if args.runs_dir:
        overrides.append(f"runs_dir={args.runs_dir}")
    settings = load_settings(args.profile, overrides)
    torch.set_num_threads(settings.train.torch_threads)
    device = resolve_device(settings.train.device)
    tokenizer = load_tokenizer(settings)
    model = load_policy_model(settings, tokenizer, device=device)
    server = LocalTokenServer(model, tokenizer, device=device, default_max_tokens=settings.episode.max_turn_tokens)
    records = json.loads(SAMPLE_DATA.read_text())
    scripts = [episode_from_raw(records, i) for i in range(args.episodes)]
    engine, closers = await build_engine(settings, tokenizer=tokenizer)
    rows = []
    try:
        # Warm-up: embedder load and first-call costs are startup, not per-episode overhead.
        await run_episode(engine, scripts[0], server, trajectory_id="warmup")
        for i, script in enumerate(scripts):
            server.stats.reset()
            t0 = time.perf_counter()
            result = await run_episode(engine, script, server, trajectory_id=f"bench-{i}")
            wall = time.perf_counter() - t0
            gen = server.stats.seconds
            s = result.stats
            rows.append((script.episode_id[:14], wall, gen, s.judge_s, max(0.0, wall - gen - s.judge_s),
                         server.stats.calls, server.stats.completion_tokens, s.tool_call_count))
    finally:
        for close in closers:
            await close()

    print(f"device={device} model={settings.train.model} torch_threads={settings.train.torch_threads} "
          f"max_turn_tokens={settings.episode.max_turn_tokens}")
    print()
    print("| episode | wall s | generate s | judge s | engine+tools s | overhead share (excl. judge) | "
          "overhead share (all but generate) | gen calls | gen tokens | tool calls |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, wall, gen, judge, eng, calls, toks, tools in rows:
        print(f"| {name} | {wall:.2f} | {gen:.2f} | {judge:.3f} | {eng:.3f} | {eng / wall:.1%} | "
              f"{(wall - gen) / wall:.1%} | {calls} | {toks} | {tools} |")
    wall = sum(r[1] for r in rows)
    gen = sum(r[2] for r in rows)
    judge = sum(r[3] for r in rows)
    eng = sum(r[4] for r in rows)
    print(f"| **total** | {wall:.2f} | {gen:.2f} | {judge:.3f} | {eng:.3f} | {eng / wall:.1%} | "
          f"{(wall - gen) / wall:.1%} | {sum(r[5] for r in rows)} | {sum(r[6] for r in rows)} | "
          f"{sum(r[7] for r in rows)} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--runs-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--set", action="append", help="settings override, e.g. train.tiny_hidden_size=256")
    ns = parser.parse_args()
    if ns.runs_dir is None:
        import tempfile

        ns.runs_dir = tempfile.mkdtemp(prefix="agemem-bench-")
    asyncio.run(main(ns))
