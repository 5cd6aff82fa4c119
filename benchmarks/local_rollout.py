"""Local trainer rollouts: the sequential token server of before, the batching + prefix-reuse server, plain batched generate.

For each model (the tiny random Qwen2 and SmolLM2-135M-Instruct from its GGUF), side by side in one run:

1. **GRPO step**: one step's rollouts built exactly as ``agemem.train.local.LocalTrainer.rollouts`` builds
   them (the episode engine, in-process milvus-lite memory, offline judge, the smoke profile's
   episode shape, ``tasks_per_batch`` x ``rollouts_per_prompt`` trajectories at once, the trainer's
   LoRA-wrapped model), same episodes and the same torch seed, under
   - ``sequential``: a faithful copy of the server before issue 12 (one ``model.generate`` per call
     behind a lock, the whole prompt prefilled every turn);
   - ``batched+prefix``: :class:`agemem.train.token_server.LocalTokenServer`;
   - ``batched generate``: the requests the ``batched+prefix`` run made, replayed without tool turns
     as one left-padded ``model.generate`` per wave (the i-th call of every trajectory together):
     the limit of plain batching, with no prefix reuse.
2. **Next turn vs fresh prefill**: a real stage-1 prompt, a 24-token turn, then the next turn's
   prompt (prompt + response + the injected tokens the engine really added): time to the first
   token with the cached prefix vs a fresh prefill of the same total length.
3. **4 x 500 x 64**: four concurrent 500-token prompts, 64 new tokens each (``ignore_eos``), on
   the new server vs one batched ``model.generate`` (tokens/s), with the sequential server for scale.
4. **What the step costs at best**: the model's own batched decode forward (no server, no sampling)
   at the step's mean decode batch (rounded) and at one row, on the step's real prompts; the step's
   decode steps times it, plus its prefilled tokens at the fresh prefill's rate per token, is about
   the least any server could spend on this step with this model and these kernels.

    .venv/bin/python benchmarks/local_rollout.py                 # both models, 2 torch threads
    .venv/bin/python benchmarks/local_rollout.py --models tiny   # seconds
    .venv/bin/python benchmarks/local_rollout.py --models smollm2 --skip-sequential-step

Targets: next turn <= 0.3 of a fresh prefill; 4 x 500 x 64 >= 0.8 of batched generate's tokens/s;
SmolLM2 GRPO step >= 4x faster than the sequential server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ROOT.parent / "shared/models/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"


class SequentialTokenServer:
    """The token server as it was before issue 12, kept verbatim in behaviour for the comparison.

    One ``model.generate`` per call, serialised behind a lock, the whole prompt prefilled each time.
    """

    def __init__(self, model: Any, tokenizer: Any, *, device: str, default_max_tokens: int = 512) -> None:
        from agemem.train.token_server import GenerationStats

        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.default_max_tokens = default_max_tokens
        self.stats = GenerationStats()
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **kwargs: Any) -> Any:
        if not prompt_ids:
            raise ValueError(f"request {request_id}: empty prompt_ids")
        async with self._lock:
            return await asyncio.to_thread(self._generate_sync, list(prompt_ids), dict(sampling_params))

    def _generate_sync(self, prompt_ids: list[int], params: dict[str, Any]) -> Any:
        import torch

        from agemem.agent.policy import GenerationOutput

        max_tokens = int(params.get("max_tokens") or params.get("max_new_tokens") or self.default_max_tokens)
        temperature = float(params.get("temperature", 1.0) or 0.0)
        top_p = float(params.get("top_p", 1.0) or 1.0)
        top_k = int(params.get("top_k", -1) or -1)
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        eos += [t for t in (params.get("stop_token_ids") or []) if t not in eos]
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "do_sample": temperature > 0,
            "eos_token_id": eos or None,
            "pad_token_id": self.tokenizer.pad_token_id,
            "return_dict_in_generate": True,
            "output_logits": True,
        }
        if params.get("ignore_eos"):  # the 4 x 500 x 64 rows only; the old server had no such option
            gen_kwargs.update(eos_token_id=None, min_new_tokens=max_tokens)
        if temperature > 0:
            gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else 0)
        stop = params.get("stop")
        if stop:
            gen_kwargs.update(stop_strings=[stop] if isinstance(stop, str) else list(stop), tokenizer=self.tokenizer)
        started = time.perf_counter()
        with self._thread_lock, torch.no_grad():
            was_training = self.model.training
            self.model.eval()
            input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **gen_kwargs)
            if was_training:
                self.model.train()
        new_ids = out.sequences[0, len(prompt_ids):].tolist()
        log_probs = [float(torch.log_softmax(step_logits[0].float(), dim=-1)[tok])
                     for step_logits, tok in zip(out.logits, new_ids)]
        stop_reason = "stop" if new_ids and new_ids[-1] in eos else "length"
        self.stats.calls += 1
        self.stats.prompt_tokens += len(prompt_ids)
        self.stats.prefill_tokens += len(prompt_ids)
        self.stats.completion_tokens += len(new_ids)
        self.stats.seconds += time.perf_counter() - started
        return GenerationOutput(token_ids=new_ids, log_probs=log_probs, stop_reason=stop_reason)


@dataclass
class Call:
    request_id: str
    prompt_ids: list[int]
    sampling_params: dict[str, Any]
    token_ids: list[int] = field(default_factory=list)


class Recorder:
    """Forwards ``generate`` to a server and keeps every request (for the replay without tool turns)."""

    def __init__(self, server: Any) -> None:
        self.server, self.calls, self.stats = server, [], server.stats

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                       **kwargs: Any) -> Any:
        call = Call(request_id, list(prompt_ids), dict(sampling_params))
        self.calls.append(call)
        out = await self.server.generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params, **kwargs)
        call.token_ids = list(out.token_ids)
        return out


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    mem = next((int(line.split()[1]) // (1024 * 1024) for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()} {cpu}, {os.cpu_count()} cores, {mem} GiB RAM, {gpu}; torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}")


def batched_generate(model: Any, tokenizer: Any, prompts: list[list[int]], params: dict[str, Any],
                     device: str) -> tuple[float, int]:
    """One left-padded ``model.generate`` over ``prompts``: (seconds, new tokens before eos)."""
    import torch

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    temperature = float(params.get("temperature", 1.0) or 0.0)
    kwargs: dict[str, Any] = {"max_new_tokens": int(params["max_tokens"]), "do_sample": temperature > 0,
                              "pad_token_id": pad, "eos_token_id": tokenizer.eos_token_id}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=float(params.get("top_p", 1.0) or 1.0), top_k=0)
    if params.get("ignore_eos"):
        kwargs.update(eos_token_id=None, min_new_tokens=kwargs["max_new_tokens"])
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    seconds = time.perf_counter() - started
    if was_training:
        model.train()
    new = out[:, width:].tolist()
    eos = tokenizer.eos_token_id
    count = sum((row.index(eos) + 1 if (eos in row and not params.get("ignore_eos")) else len(row)) for row in new)
    return seconds, count


async def grpo_step(trainer: Any, engine: Any, scripts: list[Any], server: Any, seed: int) -> dict[str, Any]:
    import torch

    trainer.server = server
    server.stats.reset()
    torch.manual_seed(seed)
    started = time.perf_counter()
    rollouts = await trainer.rollouts(engine, scripts, step=1)
    wall = time.perf_counter() - started
    s = server.stats
    return {"wall": wall, "busy": s.seconds, "prefill_s": s.prefill_seconds, "decode_s": s.decode_seconds,
            "calls": s.calls, "prompt": s.prompt_tokens,
            "prefill": s.prefill_tokens, "new": s.completion_tokens, "hit": s.cache_hit_rate,
            "batch": s.mean_batch, "steps": s.decode_steps, "turns": sum(r.result.stats.total_rounds for r in rollouts)}


async def next_turn(model: Any, tokenizer: Any, device: str, calls: list[Call], max_turn: int) -> dict[str, float]:
    """A trajectory's second call, with its first call's K/V cached, vs a fresh prefill of it."""
    from agemem.train.token_server import LocalTokenServer

    by_traj: dict[str, list[Call]] = {}
    for call in calls:
        by_traj.setdefault(call.request_id, []).append(call)
    first, second = next((c[0], c[1]) for c in by_traj.values()
                         if len(c) > 1 and c[1].prompt_ids[: len(c[0].prompt_ids) + len(c[0].token_ids)]
                         == c[0].prompt_ids + c[0].token_ids)
    injected = second.prompt_ids[len(first.prompt_ids) + len(first.token_ids):]
    params = {**first.sampling_params, "max_tokens": max_turn}
    warm = LocalTokenServer(model, tokenizer, device=device)
    out = await warm.generate("t1", prompt_ids=first.prompt_ids, sampling_params=params)
    prompt2 = first.prompt_ids + out.token_ids + injected
    one = {**params, "max_tokens": 1}
    warm.stats.reset()
    t0 = time.perf_counter()
    await warm.generate("t2", prompt_ids=prompt2, sampling_params=one)
    cached = time.perf_counter() - t0
    reused = warm.stats.cached_prompt_tokens
    fresh_server = LocalTokenServer(model, tokenizer, device=device, max_cached_tokens=0)
    t0 = time.perf_counter()
    await fresh_server.generate("fresh", prompt_ids=prompt2, sampling_params=one)
    fresh = time.perf_counter() - t0
    return {"total": len(prompt2), "reused": reused, "new": len(prompt2) - reused, "cached_s": cached,
            "fresh_s": fresh}


def decode_floor(model: Any, device: str, calls: list[Call], rows: int, steps: int = 12) -> dict[str, float]:
    """The model's own batched decode forward, no server around it: seconds per step at ``rows`` and at 1 row.

    The rows are the step's real prompts whose lengths lie nearest the context the step decoded at (prompt
    lengths weighted by the tokens decoded after them), packed the way the server packs them; times
    exclude sampling.
    """
    import torch

    from agemem.train.kv_cache import RunningBatch, kv_of

    decoded = sum(len(c.token_ids) for c in calls) or 1
    context = sum(len(c.prompt_ids) * len(c.token_ids) for c in calls) / decoded
    chosen = sorted(calls, key=lambda c: abs(len(c.prompt_ids) - context))[:rows]
    was_training = model.training
    model.eval()
    out: dict[str, float] = {"context": context, "n": len(chosen)}
    with torch.inference_mode():
        kvs = [kv_of(model(input_ids=torch.tensor([c.prompt_ids], device=device), use_cache=True).past_key_values)
               for c in chosen]
        for label, group in (("rows", kvs), ("one", kvs[:1])):
            batch = RunningBatch()
            batch.update(add=group)
            ids = torch.full((len(group), 1), int(chosen[0].prompt_ids[-1]), dtype=torch.long, device=device)
            for i in range(steps + 2):  # two warm-up steps
                if i == 2:
                    started = time.perf_counter()
                mask, positions = batch.step_inputs(device)
                model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=batch.cache,
                      use_cache=True)
                batch.advance()
            out[label] = (time.perf_counter() - started) / steps
    if was_training:
        model.train()
    return out


async def four_by_500(model: Any, tokenizer: Any, device: str, calls: list[Call], temperature: float,
                      sequential: bool) -> dict[str, tuple[float, int]]:
    """4 concurrent 500-token prompts (distinct from the first token on), 64 new tokens each."""
    from agemem.train.token_server import LocalTokenServer

    text = " ".join(tokenizer.decode(c.prompt_ids) for c in calls[:8])
    base = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompts = [base[i * 37: i * 37 + 500] for i in range(4)]
    params = {"temperature": temperature, "top_p": 1.0, "max_tokens": 64, "ignore_eos": True}
    out: dict[str, tuple[float, int]] = {}
    servers: list[tuple[str, Any]] = [("batched+prefix", LocalTokenServer(model, tokenizer, device=device))]
    if sequential:
        servers.append(("sequential", SequentialTokenServer(model, tokenizer, device=device)))
    for name, server in servers:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(server.generate(f"q{i}", prompt_ids=p, sampling_params=params)
                                     for i, p in enumerate(prompts)))
        out[name] = (time.perf_counter() - t0, sum(len(r.token_ids) for r in res))
    out["batched generate"] = batched_generate(model, tokenizer, prompts, params, device)
    return out


async def bench_model(label: str, overrides: dict[str, Any], args: argparse.Namespace) -> list[str]:
    import torch

    from agemem.agent.episode import EpisodeEngine
    from agemem.data.samples import sample_episodes
    from agemem.settings import load_settings
    from agemem.train.local import LocalTrainer, batch_indices
    from agemem.train.token_server import LocalTokenServer

    runs = Path(tempfile.mkdtemp(prefix="agemem-bench-rollout-"))
    settings = load_settings("smoke", {**overrides, "runs_dir": str(runs)})
    t = settings.train
    episodes = [e for e in sample_episodes(settings) if e.split == "train"]
    trainer = LocalTrainer(settings, episodes)  # loads the model the way training does (LoRA-wrapped)
    torch.set_num_threads(args.threads)
    scripts = [episodes[i] for i in batch_indices(len(episodes), 0, t.tasks_per_batch, t.seed)]
    engine = EpisodeEngine.from_settings(settings, tokenizer=trainer.tokenizer)
    model, tok, device = trainer.model, trainer.tokenizer, trainer.device
    lines = [f"### {label}", "", f"model `{t.model}`, device {device}, {t.tasks_per_batch} tasks x "
             f"{t.rollouts_per_prompt} rollouts, max_turn_tokens {settings.episode.max_turn_tokens}, "
             f"max_context_tokens {settings.episode.max_context_tokens}, temperature {settings.episode.temperature}, "
             f"LoRA rank {t.lora_rank}", ""]
    try:
        # Warm-up (embedder, milvus-lite, first-call costs), not timed.
        await grpo_step(trainer, engine, scripts[:1], LocalTokenServer.from_settings(model, tok, settings, device=device),
                        t.seed + 1)
        rows: dict[str, dict[str, Any]] = {}
        loads: dict[str, str] = {}
        if not args.skip_sequential_step:
            loads["sequential"] = load_avg()
            rows["sequential"] = await grpo_step(trainer, engine, scripts,
                                                 SequentialTokenServer(model, tok, device=device,
                                                                       default_max_tokens=settings.episode.max_turn_tokens),
                                                 t.seed)
        loads["batched+prefix"] = load_avg()
        recorder = Recorder(LocalTokenServer.from_settings(model, tok, settings, device=device))
        rows["batched+prefix"] = await grpo_step(trainer, engine, scripts, recorder, t.seed)
        # The same requests without tool turns: wave i = the i-th call of every trajectory.
        loads["batched generate"] = load_avg()
        waves: dict[int, list[Call]] = {}
        seen: dict[str, int] = {}
        for call in recorder.calls:
            k = seen[call.request_id] = seen.get(call.request_id, -1) + 1
            waves.setdefault(k, []).append(call)
        torch.manual_seed(t.seed)
        total_s, total_new = 0.0, 0
        for wave in waves.values():
            s, n = batched_generate(model, tok, [c.prompt_ids for c in wave], wave[0].sampling_params, device)
            total_s, total_new = total_s + s, total_new + n
        calls = recorder.calls
        rows["batched generate"] = {"wall": total_s, "busy": total_s, "calls": len(calls),
                                    "prompt": sum(len(c.prompt_ids) for c in calls),
                                    "prefill": sum(len(c.prompt_ids) for c in calls), "new": total_new,
                                    "hit": 0.0, "batch": len(calls) / len(waves), "turns": None}
        floor = decode_floor(model, device, calls, max(1, round(rows["batched+prefix"]["batch"])))
        turn = await next_turn(model, tok, device, calls, settings.episode.max_turn_tokens)
        turn_load = load_avg()
        quad = await four_by_500(model, tok, device, calls, settings.episode.temperature, not args.skip_sequential_4x)
        quad_load = load_avg()
    finally:
        await engine.aclose()

    seq = rows.get("sequential")
    lines += ["| GRPO step mode | wall s | model busy s (prefill + decode) | generate calls | prompt tokens | prefilled tokens | "
              "new tokens | new tokens/s | prefix hit rate | mean decode batch | speed-up vs sequential | load avg at start |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        speed = f"{seq['wall'] / r['wall']:.2f}x" if seq else "-"
        split = f" ({r['prefill_s']:.1f} + {r['decode_s']:.1f})" if r.get("prefill_s", 0) + r.get("decode_s", 0) > 0 else ""
        lines.append(f"| {name} | {r['wall']:.2f} | {r['busy']:.2f}{split} | {r['calls']} | {r['prompt']} | {r['prefill']} | "
                     f"{r['new']} | {r['new'] / r['wall']:.1f} | {r['hit']:.1%} | {r['batch']:.2f} | {speed} | "
                     f"{loads[name]} |")
    ratio = turn["cached_s"] / turn["fresh_s"]
    q_new, q_ref = quad["batched+prefix"], quad["batched generate"]
    q_ratio = (q_new[1] / q_new[0]) / (q_ref[1] / q_ref[0])
    lines += ["", "| check | measured | target | met |", "|---|---|---|---|",
              f"| next turn ({turn['total']} tokens, {turn['reused']} reused, {turn['new']} new) vs fresh prefill of "
              f"{turn['total']} | {turn['cached_s']:.3f} s vs {turn['fresh_s']:.3f} s = {ratio:.3f} | <= 0.3 | "
              f"{'yes' if ratio <= 0.3 else 'NO'} |"]
    for name, (s, n) in quad.items():
        lines.append(f"| 4 x 500 x 64, {name} | {s:.2f} s, {n} tokens, {n / s:.1f} tokens/s | - | - |")
    lines.append(f"| 4 x 500 x 64: new server / batched generate tokens/s | {q_ratio:.2f} | >= 0.8 | "
                 f"{'yes' if q_ratio >= 0.8 else 'NO'} |")
    new = rows["batched+prefix"]
    n_rows = int(floor["n"])
    bound = new["steps"] * floor["rows"]
    lines += [f"| decode forward alone (no server, no sampling), {n_rows} rows / 1 row at a {floor['context']:.0f}-token "
              f"context | {floor['rows'] * 1e3:.1f} ms / {floor['one'] * 1e3:.1f} ms a step: {n_rows} rows cost "
              f"{floor['rows'] / floor['one']:.2f}x one | - | - |",
              f"| new server's decode vs its {new['steps']} decode steps x the {n_rows}-row forward | "
              f"{new['decode_s']:.1f} s vs {bound:.1f} s | - | - |"]
    if seq:
        speed = seq["wall"] / new["wall"]
        lines.append(f"| GRPO step: sequential / batched+prefix wall | {speed:.2f}x | >= 4x (SmolLM2) | "
                     f"{'yes' if speed >= 4 else 'NO'} |")
        # The prefill the cache cannot serve, at the fresh prefill's rate per token (the next-turn check's).
        prefill = new["prefill"] * turn["fresh_s"] / turn["total"]
        lines.append(f"| GRPO step at best: sequential wall / (decode steps x the {n_rows}-row forward + "
                     f"{new['prefill']} prefilled tokens at the fresh prefill's {turn['fresh_s'] / turn['total'] * 1e3:.2f} "
                     f"ms a token = {bound:.1f} + {prefill:.1f} s) | {seq['wall'] / (bound + prefill):.2f}x | - | - |")
    lines += ["", f"load average after the next-turn check: {turn_load}; after 4 x 500 x 64: {quad_load}", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,smollm2", help="comma list of: tiny, smollm2")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="auto", help="train.device: auto, cpu, cuda:0")
    parser.add_argument("--smollm2", default=str(SMOLLM2), help="the SmolLM2 GGUF file")
    parser.add_argument("--skip-sequential-step", action="store_true", help="no sequential GRPO step (slow)")
    parser.add_argument("--tasks", type=int, default=2, help="train.tasks_per_batch of the GRPO step")
    parser.add_argument("--rollouts", type=int, default=2, help="train.rollouts_per_prompt of the GRPO step")
    parser.add_argument("--skip-sequential-4x", action="store_true", help="no sequential 4 x 500 x 64 row")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"machine: {machine()}; load average at start {load_avg()}")
    print()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        overrides: dict[str, Any] = {"train": {"device": args.device, "torch_threads": args.threads,
                                               "tasks_per_batch": args.tasks, "rollouts_per_prompt": args.rollouts}}
        if name == "smollm2":
            if not Path(args.smollm2).is_file():
                print(f"### SmolLM2: {args.smollm2} not found, skipped\n")
                continue
            overrides["train"]["model"] = args.smollm2
        elif name != "tiny":
            raise SystemExit(f"unknown model {name!r}: use tiny or smollm2")
        label = "tiny-random-qwen2 (64 wide, 2 layers, random weights)" if name == "tiny" else "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32)"
        print("\n".join(asyncio.run(bench_model(label, overrides, args))), flush=True)


if __name__ == "__main__":
    main()
