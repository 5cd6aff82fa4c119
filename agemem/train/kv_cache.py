"""Keys/values for the local token server: an LRU store of token prefixes and the running decode batch.

Both hold transformers ``DynamicCache`` layers (``[batch, kv_heads, tokens, head_dim]`` per layer).

- :class:`PrefixKVCache` maps token sequences to the K/V of a single sequence. A lookup returns the
  longest common prefix with any stored sequence, so a trajectory's next turn (previous prompt +
  response + injected tokens) and a GRPO sibling (same stage-1 prompt) both reuse what was
  computed, and a rewritten context (a new segment) simply matches less. The bound is on stored
  tokens; least recently used sequences go first. A sequence that is a prefix of a newly stored one
  is dropped: the new one answers every lookup the old one could.
- :class:`RunningBatch` keeps the sequences being decoded right-aligned in one ``DynamicCache``
  (left padding), so one forward pass decodes a token for every sequence. Its layers keep spare
  positions, so a decode step writes one column instead of copying the whole batch. Sequences
  join and leave between decode steps; leading columns no sequence needs any more are cut off.

Stored prefixes are never written in place: a prefill's ``DynamicLayer.update`` concatenates into
new tensors, and a finished row leaves the batch as a copy.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
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


# Decode positions reserved per row when a batch is (re)built: a decode step writes its column in place.
DECODE_RESERVE = 256


@lru_cache(maxsize=1)
def _growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A ``DynamicLayer`` whose tensors are views into buffers with spare positions.

        ``DynamicLayer.update`` concatenates, copying the whole batch's keys and values on every
        decode step; here a step writes one column, and a full buffer grows by ``reserve``.
        """

        def __init__(self, key_buf: torch.Tensor, value_buf: torch.Tensor, length: int, reserve: int) -> None:
            super().__init__()
            self.lazy_initialization(key_buf, value_buf)
            self.reserve = max(1, reserve)
            self._key_buf, self._value_buf = key_buf, value_buf
            self.keys, self.values = key_buf[:, :, :length], value_buf[:, :, :length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
                   **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
            n, q = self.keys.shape[-2], key_states.shape[-2]
            if n + q > self._key_buf.shape[-2]:
                self._key_buf = _regrow(self._key_buf, n, n + q + self.reserve)
                self._value_buf = _regrow(self._value_buf, n, n + q + self.reserve)
            self._key_buf[:, :, n : n + q] = key_states
            self._value_buf[:, :, n : n + q] = value_states
            self.keys, self.values = self._key_buf[:, :, : n + q], self._value_buf[:, :, : n + q]
            return self.keys, self.values

    return GrowingLayer


def _buffer(like: torch.Tensor, rows: int, capacity: int) -> torch.Tensor:
    # Uninitialised: callers fill or zero every position before it is attended.
    return like.new_empty((rows, like.shape[1], capacity, like.shape[3]))


def _regrow(buf: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    new = _buffer(buf, buf.shape[0], capacity)
    new[:, :, :used] = buf[:, :, :used]
    return new


def growing_cache(buffers: list[tuple[torch.Tensor, torch.Tensor]], length: int, reserve: int) -> object:
    """A ``DynamicCache`` over per-layer (key, value) buffers whose first ``length`` positions are filled."""
    from transformers import DynamicCache

    layer = _growing_layer_class()
    cache = DynamicCache()
    cache.layers.extend(layer(k, v, length, reserve) for k, v in buffers)
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
    """The sequences being decoded, right-aligned in one ``DynamicCache``; ``lengths[i]`` = row i's tokens.

    Rows are (re)packed only when one joins or leaves; in between, decode steps write in place.
    """

    def __init__(self, reserve: int = DECODE_RESERVE) -> None:
        self.cache: object | None = None
        self.lengths: list[int] = []
        self.reserve = reserve

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    def _repack(self, sources: list[tuple[KV, int, int]], width: int) -> None:
        """New buffers of ``width`` (+ reserve) positions; ``sources``: (K/V, row in it, its length) per row."""
        template = sources[0][0]
        buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in range(len(template)):
            pair = []
            for part in (0, 1):
                like = template[layer][part]
                # One copy per kept row. The padding is masked, but must be finite (0 x NaN is NaN).
                buf = _buffer(like, len(sources), width + self.reserve)
                for row, (kv, index, length) in enumerate(sources):
                    src = kv[layer][part]
                    buf[row, :, : width - length] = 0
                    buf[row, :, width - length : width] = src[index, :, src.shape[2] - length :]
                pair.append(buf)
            buffers.append((pair[0], pair[1]))
        self.cache = growing_cache(buffers, width, self.reserve)

    def update(self, *, remove: Sequence[int] = (), add: Sequence[KV] = ()) -> None:
        """Drop rows ``remove`` and append one row per (batch 1) K/V in ``add``, in one repack."""
        if not remove and not add:
            return
        gone = set(remove)
        keep = [i for i in range(len(self.lengths)) if i not in gone]
        current = kv_of(self.cache) if self.cache is not None else None
        sources = [(current, i, self.lengths[i]) for i in keep]
        sources += [(kv, 0, int(kv[0][0].shape[-2])) for kv in add]
        lengths = [n for _, _, n in sources]
        if not sources:
            self.cache, self.lengths = None, []
            return
        self._repack(sources, max(lengths))  # type: ignore[arg-type]
        self.lengths = lengths

    def add(self, kv: KV) -> None:
        """Append one sequence (its K/V, batch 1) as the last row."""
        self.update(add=[kv])

    def remove(self, indices: Sequence[int]) -> None:
        self.update(remove=indices)

    def row(self, index: int) -> KV:
        """Row ``index``'s K/V without padding, copied (so the batch tensors can be freed)."""
        n = self.lengths[index]
        return [(k[index : index + 1, :, -n:].clone(), v[index : index + 1, :, -n:].clone())
                for k, v in kv_of(self.cache)]

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


__all__ = ["KV", "PrefixKVCache", "RunningBatch", "common_prefix", "dynamic_cache", "growing_cache", "kv_of"]
