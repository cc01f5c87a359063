"""Static, preallocated key/value cache for incremental decoding.

Axes: batch kv_head kv_pos d_head. One :class:`LayerKV` per layer holds rotated keys and values;
:class:`KVCache` adds the bookkeeping shared by all layers: how many positions are filled
(``pos``), which of them are real tokens (``key_mask``, False on left padding) and each row's next
rotary position (``next_position``, so padded rows continue at their own offsets).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ernie_lab.model.config import ErnieConfig


class CacheError(ValueError):
    """A KV cache that does not fit the model it is passed to (made for another config)."""


class LayerKV:
    """Keys and values of one attention layer: ``[batch kv_head max_pos d_head]`` each."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k = k
        self.v = v

    def update(self, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` ``[batch kv_head new d_head]`` at ``pos``; return the filled prefix.

        A ``pos`` tensor (``[1]`` long, on the cache's device: a static cache's ``fill``) writes one
        position there and returns the whole buffers (fixed shapes; the caller masks the unfilled
        positions)."""
        if isinstance(pos, torch.Tensor):
            self.k.index_copy_(2, pos, k)
            self.v.index_copy_(2, pos, v)
            return self.k, self.v
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
        self.fill: torch.Tensor | None = None  # [1] device copy of pos once static (make_static)

    @classmethod
    def allocate(
        cls,
        config: ErnieConfig,
        batch: int,
        max_pos: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | Sequence[torch.device | str] | None = None,
        home: torch.device | str | None = None,
        kv_heads: int | None = None,
    ) -> KVCache:
        """Zeroed keys and values for ``max_pos`` positions. ``device`` is one device for every layer,
        or one per layer (a model spread over devices); the bookkeeping (key mask, next positions)
        lives on ``home``, by default the first layer's device. ``kv_heads`` defaults to the config's
        (a tensor-parallel process caches only its own)."""
        if not isinstance(config, ErnieConfig):
            raise TypeError(f"config must be an ErnieConfig, got {type(config).__name__}")
        for name, value in (("batch", batch), ("max_pos", max_pos)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
        if max_pos > config.max_position_embeddings:
            raise ValueError(
                f"KV cache of {max_pos} positions exceeds max_position_embeddings={config.max_position_embeddings}"
            )
        n_layer = config.num_hidden_layers
        devices = list(device) if isinstance(device, (list, tuple)) else [device] * n_layer
        if len(devices) != n_layer:
            raise ValueError(f"{len(devices)} cache devices given for {n_layer} layers")
        shape = (batch, kv_heads or config.num_key_value_heads, max_pos, config.d_head)
        layers = [
            LayerKV(torch.zeros(shape, dtype=dtype, device=d), torch.zeros(shape, dtype=dtype, device=d))
            for d in devices
        ]
        return cls(layers, torch.ones(batch, max_pos, dtype=torch.bool, device=home or devices[0]))

    @classmethod
    def for_model(cls, model, batch: int, max_pos: int) -> KVCache:
        """A cache in ``model``'s dtype with each layer on the device of its decoder layer, and the
        bookkeeping on the embedding's device (where the input ids and positions live). It holds the
        key/value heads ``k_proj`` computes: all of them, or a tensor-parallel process's own."""
        devices = [block.input_layernorm.weight.device for block in model.blocks]
        embed = model.model.embed_tokens.weight
        kv_heads = model.blocks[0].self_attn.k_proj.out_features // model.config.d_head
        return cls.allocate(model.config, batch, max_pos, embed.dtype, devices, home=embed.device, kv_heads=kv_heads)

    def make_static(self) -> None:
        """Fixed-shape decode steps from now on (what a CUDA graph needs): each one-token step writes
        at the device counter ``fill`` and attends over the whole buffer with the unfilled positions
        masked, so no shape or Python number changes from step to step (``pos`` still counts on the
        host). Every layer must live on the bookkeeping's device."""
        if any(lkv.k.device != self.key_mask.device for lkv in self.layers):
            raise ValueError("a static KV cache needs every layer on one device")
        self.fill = torch.tensor([self.pos], dtype=torch.long, device=self.key_mask.device)

    def check_fits(self, model) -> None:
        """Raise :class:`CacheError` when this cache was made for another config than ``model``'s:
        its number of layers, key/value heads or head size differ (checked before any write)."""
        cfg = model.config
        kv_heads = model.blocks[0].self_attn.k_proj.out_features // cfg.d_head
        want = (cfg.num_hidden_layers, kv_heads, cfg.d_head)
        got = (len(self.layers), self.layers[0].k.shape[1], self.layers[0].k.shape[3]) if self.layers else (0, 0, 0)
        if got != want:
            raise CacheError(
                f"this KV cache was made for another config: (layers, kv_heads, d_head) = {got}, the model "
                f"needs {want}; make it with KVCache.for_model(model, batch, max_pos)"
            )

    @property
    def capacity(self) -> int:
        return self.key_mask.shape[1]

    @property
    def batch(self) -> int:
        return self.key_mask.shape[0]

    def nbytes(self) -> int:
        return sum(2 * lkv.k.numel() * lkv.k.element_size() for lkv in self.layers)
