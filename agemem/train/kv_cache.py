"""Keys/values for the local token server: an LRU store of token prefixes and the running decode batch.

Both hold transformers ``DynamicCache`` layers (``[batch, kv_heads, tokens, head_dim]`` per layer).

- :class:`PrefixKVCache` maps token sequences to the K/V of a single sequence. A lookup returns the
  longest common prefix with any stored sequence, so a trajectory's next turn (previous prompt +
  response + injected tokens) and a GRPO sibling (same stage-1 prompt) both reuse what was
  computed, and a rewritten context (a new segment) simply matches less. The bound is on stored
  tokens; least recently used sequences go first. A sequence that is a prefix of a newly stored one
  is dropped: the new one answers every lookup the old one could.
- :class:`RunningBatch` keeps the sequences being decoded right-aligned in one ``DynamicCache``
  (left padding), so one forward pass decodes a token for every sequence. Sequences join and leave
  between decode steps; leading columns that no sequence needs any more are cut off.

Stored tensors are never written in place (``DynamicLayer.update`` concatenates into new ones), so
a stored prefix can be handed to a prefill as it is.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# Per layer (keys, values), each [batch, kv_heads, tokens, head_dim].
KV = list[tuple[torch.Tensor, torch.Tensor]]


def kv_of(cache: object) -> KV:
    """The per-layer tensors of a transformers ``DynamicCache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[attr-defined]


def dynamic_cache(kv: KV | None) -> object:
    """A ``DynamicCache`` holding ``kv`` as it is (no copy); an empty one for None."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    for keys, values in kv or []:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass
class _Entry:
    tokens: np.ndarray
    kv: KV
    nbytes: int


class PrefixKVCache:
    """Token sequences -> single-sequence K/V, at most ``max_tokens`` tokens in all (0 = disabled)."""

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self.max_tokens = max_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self._next_key = 0
        self.tokens = 0
        self.nbytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: np.ndarray, *, limit: int) -> tuple[int, KV | None]:
        """(length, K/V of ``tokens[:length]``) of the longest stored common prefix, at most ``limit`` long."""
        best_key, best = None, 0
        for key, entry in self._entries.items():
            m = common_prefix(entry.tokens, tokens)
            if m > best:
                best_key, best = key, m
        best = min(best, limit)
        if best_key is None or best <= 0:
            return 0, None
        self._entries.move_to_end(best_key)
        kv = self._entries[best_key].kv
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in kv]

    def insert(self, tokens: np.ndarray, kv: KV) -> None:
        """Store the K/V of ``tokens`` (one sequence, exactly ``len(tokens)`` positions)."""
        n = len(tokens)
        if n == 0 or n > self.max_tokens:
            return
        for key, entry in list(self._entries.items()):
            m = common_prefix(entry.tokens, tokens)
            if m == n:  # already held inside a longer (or equal) stored sequence
                self._entries.move_to_end(key)
                return
            if m == len(entry.tokens):  # the new sequence extends this one
                self._drop(key)
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        self._entries[self._next_key] = _Entry(np.array(tokens, dtype=np.int64), kv, nbytes)
        self._next_key += 1
        self.tokens += n
        self.nbytes += nbytes
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = self.nbytes = 0

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.tokens -= len(entry.tokens)
        self.nbytes -= entry.nbytes


class RunningBatch:
    """The sequences being decoded, right-aligned in one ``DynamicCache``; ``lengths[i]`` = row i's tokens."""

    def __init__(self) -> None:
        self.cache: object | None = None
        self.lengths: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    def add(self, kv: KV) -> None:
        """Append one sequence (its K/V, batch 1) as the last row."""
        new_len = int(kv[0][0].shape[-2])
        if self.cache is None:
            self.cache = dynamic_cache([(k.contiguous(), v.contiguous()) for k, v in kv])
            self.lengths = [new_len]
            return
        old = kv_of(self.cache)
        width, rows = max(self.width, new_len), len(self.lengths)
        merged: KV = []
        for (bk, bv), (k, v) in zip(old, kv):
            pair = []
            for batch_t, new_t in ((bk, k), (bv, v)):
                # One allocation per tensor; zeros in the padding are never attended (masked).
                out = batch_t.new_zeros((rows + 1, batch_t.shape[1], width, batch_t.shape[3]))
                out[:rows, :, width - batch_t.shape[2] :] = batch_t
                out[rows:, :, width - new_len :] = new_t
                pair.append(out)
            merged.append((pair[0], pair[1]))
        self.cache = dynamic_cache(merged)
        self.lengths.append(new_len)

    def row(self, index: int) -> KV:
        """Row ``index``'s K/V without padding, copied (so the batch tensors can be freed)."""
        n = self.lengths[index]
        return [(k[index : index + 1, :, -n:].clone(), v[index : index + 1, :, -n:].clone())
                for k, v in kv_of(self.cache)]

    def remove(self, indices: Sequence[int]) -> None:
        gone = set(indices)
        keep = [i for i in range(len(self.lengths)) if i not in gone]
        if not keep:
            self.cache, self.lengths = None, []
            return
        lengths = [self.lengths[i] for i in keep]
        cut = self.width - max(lengths)
        index = torch.tensor(keep, dtype=torch.long, device=kv_of(self.cache)[0][0].device)
        self.cache = dynamic_cache([(k[:, :, cut:].index_select(0, index), v[:, :, cut:].index_select(0, index))
                                    for k, v in kv_of(self.cache)])
        self.lengths = lengths

    def step_inputs(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask ``[rows, width + 1]``, position ids ``[rows, 1]``) for one decode step."""
        width = self.width
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=device)
        columns = torch.arange(width + 1, device=device)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        return mask, lengths[:, None]

    def advance(self) -> None:
        """Every row gained one position (the decode step's forward pass appended it)."""
        self.lengths = [n + 1 for n in self.lengths]


__all__ = ["KV", "PrefixKVCache", "RunningBatch", "common_prefix", "dynamic_cache", "kv_of"]
