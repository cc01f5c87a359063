"""Static, preallocated key/value cache for incremental decoding.

Axes: batch kv_head kv_pos d_head. One :class:`LayerKV` per layer holds rotated keys and values;
:class:`KVCache` adds the bookkeeping shared by all layers: how many positions are filled
(``pos``), which of them are real tokens (``key_mask``, False on left padding) and each row's next
rotary position (``next_position``, so padded rows continue at their own offsets).
"""

from __future__ import annotations

import torch

from ernie_lab.config import ErnieConfig


class LayerKV:
    """Keys and values of one attention layer: ``[batch kv_head max_pos d_head]`` each."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k = k
        self.v = v

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` ``[batch kv_head new d_head]`` at ``pos``; return the filled prefix."""
        end = pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: writing up to position {end}, capacity {self.k.shape[2]}")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """All layers' caches plus position bookkeeping. Create with :meth:`allocate`."""

    def __init__(self, layers: list[LayerKV], key_mask: torch.Tensor):
        self.layers = layers
        self.key_mask = key_mask  # [batch max_pos] bool: True where the key is a real token
        self.pos = 0  # filled positions (same for every row; padding keeps rows aligned)
        self.padded = False  # any padding among the cached keys (set when a mask is written)
        self.next_position = torch.zeros(key_mask.shape[0], dtype=torch.long, device=key_mask.device)

    @classmethod
    def allocate(
        cls,
        config: ErnieConfig,
        batch: int,
        max_pos: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVCache:
        if max_pos > config.max_position_embeddings:
            raise ValueError(
                f"KV cache of {max_pos} positions exceeds max_position_embeddings={config.max_position_embeddings}"
            )
        shape = (batch, config.num_key_value_heads, max_pos, config.d_head)
        layers = [
            LayerKV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
        return cls(layers, torch.ones(batch, max_pos, dtype=torch.bool, device=device))

    @property
    def capacity(self) -> int:
        return self.key_mask.shape[1]

    @property
    def batch(self) -> int:
        return self.key_mask.shape[0]

    def nbytes(self) -> int:
        return sum(2 * lkv.k.numel() * lkv.k.element_size() for lkv in self.layers)
