"""PyTorch SDPA with grouped-query attention also under a padding mask, for batched decoding on CPU.

transformers' ``sdpa`` attention hands grouped-query attention to PyTorch (``enable_gqa``) only
when there is no attention mask, because CUDA's fused kernels do not take both; with a mask it
first repeats every key/value head ``num_key_value_groups`` times, a full copy of the keys and
values per layer and step. A left-padded decode batch always has a mask, so on CPU that copy
costs more than the attention itself (SmolLM2-135M: 3 query heads per key/value head). PyTorch's
CPU SDPA accepts ``enable_gqa`` together with a mask, so this registers, under
:data:`ATTENTION`, transformers' ``sdpa`` with that one difference (same masks, same kernel).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

ATTENTION = "agemem_sdpa_gqa"


def _forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
             scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or groups == 1 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(ATTENTION, _forward)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_gqa_sdpa_on_cpu(model: Any, device: str) -> bool:
    """Switch ``model`` (or a PEFT model's base) from ``sdpa`` to :data:`ATTENTION` on CPU; True if switched.

    Results are the same: only where the grouped key/value heads are expanded changes.
    """
    if not str(device).startswith("cpu"):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(base, "set_attn_implementation"):
        return False
    heads, kv_heads = getattr(config, "num_attention_heads", 0), getattr(config, "num_key_value_heads", None)
    if not kv_heads or heads == kv_heads:
        return False
    _register()
    base.set_attn_implementation(ATTENTION)
    logger.info("attention %s for batched decoding on CPU (%d query heads per key/value head)", ATTENTION,
                heads // kv_heads)
    return True


__all__ = ["ATTENTION", "use_gqa_sdpa_on_cpu"]
