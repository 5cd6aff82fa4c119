"""Per-request sampling for the local token server: vLLM's parameters, transformers' logits warpers.

:class:`SamplingParams` parses one request's ``sampling_params`` (the keys verl and the episode
engine send) and rejects bad values with a clear error before anything reaches the model.
:func:`select_tokens` picks one token per row of a batch, each row with its own parameters, and
returns the raw (untempered, unfiltered) log-probability of each picked token, which is what vLLM
reports and what the trainer's old-policy log-probs are compared with. :class:`StopStrings` is
transformers' ``StopStringCriteria``, built once per distinct set of stop strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling: ``temperature == 0`` is greedy; ``top_k <= 0`` and ``top_p == 1`` are off."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_request(cls, params: dict[str, Any], *, default_max_tokens: int,
                     eos_token_id: int | None) -> "SamplingParams":
        """Parse verl/vLLM-style ``sampling_params``; unknown keys (``logprobs``, ``repetition_penalty``) are ignored.

        ``ignore_eos`` (vLLM's name) keeps sampling past the tokenizer's eos; ``stop_token_ids`` still stop.

        The mapping of missing/None values is the one the server always had: a missing
        temperature is 1.0 and an explicit None is greedy; top_p None or 0 is 1.0.
        """
        try:
            max_tokens = int(params.get("max_tokens") or params.get("max_new_tokens") or default_max_tokens)
            temperature = float(params.get("temperature", 1.0) or 0.0)
            top_p = float(params.get("top_p", 1.0) or 1.0)
            top_k = int(params.get("top_k", -1) or -1)
            seed = params.get("seed")
            seed = None if seed is None else int(seed)
            stop_ids = {int(t) for t in (params.get("stop_token_ids") or [])}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad sampling_params {params!r}: {exc}") from exc
        stop = params.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"sampling_params.stop must be non-empty strings, got {params.get('stop')!r}")
        if max_tokens < 1:
            raise ValueError(f"sampling_params.max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0:
            raise ValueError(f"sampling_params.temperature must be >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"sampling_params.top_p must be in (0, 1], got {top_p}")
        if eos_token_id is not None and not params.get("ignore_eos"):
            stop_ids.add(int(eos_token_id))
        return cls(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop,
                   stop_token_ids=frozenset(stop_ids), seed=seed)


@lru_cache(maxsize=64)
def _warpers(temperature: float, top_k: int, top_p: float) -> Any:
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    # The order transformers' own sampling applies them in.
    chain: list[Any] = []
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        chain.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList(chain)


def select_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None]) -> tuple[list[int], list[float]]:
    """One token per row of ``logits`` ``[rows, vocab]``, and its raw log-probability.

    Rows without a generator draw from torch's global generator (seeded by the trainer).
    """
    logits = logits.float()
    greedy = [row for row, p in enumerate(params) if p.greedy]
    picked = torch.argmax(logits, dim=-1) if greedy else torch.zeros(len(params), dtype=torch.long,
                                                                        device=logits.device)
    groups: dict[tuple[float, int, float], list[int]] = {}
    for row, p in enumerate(params):
        if not p.greedy:
            groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(row)
    no_ids = torch.empty((1, 0), dtype=torch.long, device=logits.device)
    for key, rows in groups.items():
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        scores = logits if len(rows) == len(params) else logits.index_select(0, index)
        probs = torch.softmax(_warpers(*key)(no_ids, scores), dim=-1)
        # Inverse-CDF sampling, one uniform per row: torch.multinomial over a 150k vocabulary costs
        # several times more. The float32 cumsum is off by ~1e-7 of the total mass at most.
        cdf = probs.cumsum(dim=-1)
        if all(generators[r] is None for r in rows):
            u = torch.rand((len(rows), 1), device=logits.device)
        else:
            u = torch.cat([torch.rand((1, 1), device=logits.device, generator=generators[r]) for r in rows])
        # right=True: a token of probability 0 never has the first cdf value above u.
        chosen = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1)
        picked[index] = chosen[:, 0]
    rows_all = torch.arange(logits.shape[0], device=logits.device)
    log_probs = logits[rows_all, picked] - torch.logsumexp(logits, dim=-1)
    return picked.tolist(), log_probs.tolist()


class StopStrings:
    """transformers' ``StopStringCriteria`` per distinct tuple of stop strings (their set-up scans the vocab)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._criteria: dict[tuple[str, ...], Any] = {}

    def hit(self, stop: tuple[str, ...], generated: Sequence[int]) -> bool:
        """Whether the text of ``generated`` (this turn's tokens only) now ends with one of ``stop``."""
        if not stop or not generated:
            return False
        criteria = self._criteria.get(stop)
        if criteria is None:
            from transformers import StopStringCriteria

            criteria = self._criteria[stop] = StopStringCriteria(tokenizer=self.tokenizer, stop_strings=list(stop))
        ids = torch.tensor([list(generated[-criteria.maximum_token_len :])], dtype=torch.long)
        return bool(criteria(ids, None)[0])


__all__ = ["SamplingParams", "StopStrings", "select_tokens"]
