"""A transformers model behind verl's server-manager interface, for the local trainer.

``await server.generate(request_id, prompt_ids=..., sampling_params=...)`` returns an object with
``token_ids`` and ``log_probs`` exactly like verl's ``LLMServerClient.generate``, so the episode
engine (and the verl agent loop) drive it unchanged. ``temperature``, ``top_p``, ``top_k``,
``max_tokens``, ``stop`` and ``stop_token_ids`` are honoured; ``temperature == 0`` is greedy.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from agemem.agent.policy import GenerationOutput

logger = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    """Time spent inside ``generate`` (the engine-overhead benchmark subtracts it)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        self.calls = self.prompt_tokens = self.completion_tokens = 0
        self.seconds = 0.0


class LocalTokenServer:
    """Serialises generation on one model; runs it in a thread so tool I/O keeps flowing."""

    def __init__(self, model: Any, tokenizer: Any, *, device: str, default_max_tokens: int = 512) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.default_max_tokens = default_max_tokens
        self.stats = GenerationStats()
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()

    async def generate(
        self,
        request_id: str,
        *,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        **kwargs: Any,
    ) -> GenerationOutput:
        """Sample a continuation of ``prompt_ids``; extra verl kwargs (images, priority) are ignored."""
        if not prompt_ids:
            raise ValueError(f"request {request_id}: empty prompt_ids")
        async with self._lock:
            return await asyncio.to_thread(self._generate_sync, list(prompt_ids), dict(sampling_params))

    def _generate_sync(self, prompt_ids: list[int], params: dict[str, Any]) -> GenerationOutput:
        import torch

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
            out = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **gen_kwargs
            )
            if was_training:
                self.model.train()
        new_ids = out.sequences[0, len(prompt_ids) :].tolist()
        # Raw (untempered) log-probs of the sampled tokens, as vLLM reports them.
        log_probs = [
            float(torch.log_softmax(step_logits[0].float(), dim=-1)[tok])
            for step_logits, tok in zip(out.logits, new_ids)
        ]
        stop_reason = "stop" if new_ids and new_ids[-1] in eos else "length"
        self.stats.calls += 1
        self.stats.prompt_tokens += len(prompt_ids)
        self.stats.completion_tokens += len(new_ids)
        self.stats.seconds += time.perf_counter() - started
        return GenerationOutput(token_ids=new_ids, log_probs=log_probs, stop_reason=stop_reason)
