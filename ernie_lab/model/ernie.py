"""ErnieMoE: ERNIE 4.5 MoE causal LM with hook points (README: API tour, Hook points).

Axis glossary (einops strings, docstrings and hook docs use exactly these words):
    batch    sequences in a batch            pos      query positions (tokens of this call)
    kv_pos   key positions (cache + new)     d_model  residual width (hidden_size)
    head     query heads                     kv_head  key/value heads (GQA groups)
    d_head   width of one head               expert   routed experts of a MoE layer
    topk     selected-expert slots (moe_k)   d_ff     dense MLP width (intermediate_size)
    d_expert routed expert width             vocab    vocabulary

Module attribute paths equal the Hugging Face checkpoint keys (``model.layers.3.self_attn.q_proj``)
so loading is a straight copy; hook points carry TransformerLens-style names (``blocks.3.attn.hook_q``).
"""

from __future__ import annotations

import torch
from torch import nn

from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.generation_config import GenerationConfig
from ernie_lab.model.hook_points import HookPoint, HookRegistry
from ernie_lab.model.kv_cache import KVCache, LayerKV
from ernie_lab.model.layers import Attention, DenseMLP, Linear, RMSNorm, rope_tables
from ernie_lab.model.moe import MoE
from ernie_lab.model.offload import offload_stats
from ernie_lab.model.shortcuts import ShortcutsMixin
from ernie_lab.model.weight_views import forget


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x if x.device == device else x.to(device)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x += attn(norm(x)); x += mlp_or_moe(norm(x))``."""

    def __init__(self, cfg: ErnieConfig, layer: int):
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, layer) if self.is_moe else DenseMLP(cfg, layer)
        for n in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{n}", HookPoint(f"blocks.{layer}.hook_{n}", layer))

    def hook_points(self) -> list[HookPoint]:
        return [
            self.hook_resid_pre,
            *self.self_attn.hook_points(),
            self.hook_attn_out,
            self.hook_resid_mid,
            *self.mlp.hook_points(),
            self.hook_mlp_out,
            self.hook_resid_post,
        ]

    def forward(self, x, cos, sin, mask, kv: LayerKV | None = None, pos: int = 0) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(
            x + self.hook_attn_out(self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, pos))
        )
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.post_attention_layernorm(x))))


class Backbone(nn.Module):
    """The ``model.`` prefix of the checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ErnieMoE(ShortcutsMixin, HookRegistry, nn.Module):
    """ERNIE 4.5 MoE causal language model. ``model(input_ids)`` -> logits ``[batch pos vocab]``.

    TransformerLens' conveniences (``to_tokens``, ``to_str_tokens``, ``W_U``...): :mod:`ernie_lab.model.shortcuts`.
    """

    def __init__(self, config: ErnieConfig, *, init: bool = True):
        super().__init__()
        self.config = config
        self.generation_config = GenerationConfig.from_model_config(config)  # load_model reads the file's
        self.model = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=config.use_bias)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.hook_embed = HookPoint("hook_embed")
        self.hook_normalized = HookPoint("ln_final.hook_normalized")
        self.hook_logits = HookPoint("hook_logits")
        points = [self.hook_embed]
        for block in self.blocks:
            points += block.hook_points()
        points += [self.hook_normalized, self.hook_logits]
        self.hook_dict = {hp.name: hp for hp in points}
        if init:
            self.init_weights()

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() replace the weights' data: drop the cached views of the old data
        forget(self.parameters())
        return super()._apply(fn, recurse)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes of the parameters (and buffers) wherever they live, quantized storage and an
        offloaded model's host copies and device slots included (transformers' name and meaning)."""
        tensors = {id(t): t for t in self.parameters()}
        if return_buffers:
            tensors.update({id(t): t for t in self.buffers()})
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def offload_stats(self) -> dict:
        """Expert-offload counters summed over layers (``hits``, ``misses``, ``bytes_copied``) and
        per layer (``layers``); see :mod:`ernie_lab.model.offload`."""
        return offload_stats(self)

    @property
    def device(self) -> torch.device:
        """Device of the input embedding: where ``input_ids`` go (as transformers' ``model.device``)."""
        return self.model.embed_tokens.weight.device

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init as transformers does: N(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, MoE):
                module.gate.weight.normal_(0.0, std)
                module.experts.gate_up_proj.normal_(0.0, std)
                module.experts.down_proj.normal_(0.0, std)
                module.moe_statics.e_score_correction_bias.zero_()

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits ``[batch pos vocab]`` for ``input_ids`` ``[batch pos]`` (a 1-D ``[pos]`` is batch 1).

        ``attention_mask`` ``[batch pos]`` (1 = real token, 0 = padding; left padding is the norm)
        sets rotary positions per row from its cumulative sum, so a padded row's real tokens get the
        same logits as the unpadded sequence. With ``cache`` the tokens continue the cached prefix.
        """
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, cache)
        self.warn_if_padded(input_ids, attention_mask)
        return self.forward_unchecked(input_ids, attention_mask, cache)

    def forward_unchecked(self, input_ids, attention_mask=None, cache: KVCache | None = None) -> torch.Tensor:
        """``forward`` without input validation (no host sync): for the generation loop."""
        if cache is not None and cache.fill is not None and input_ids.shape[1] == 1 and attention_mask is None:
            positions, mask, pos0 = self._static_step(input_ids, cache)
        else:
            positions, mask, pos0 = self._positions_and_mask(input_ids, attention_mask, cache)
        cos, sin = rope_tables(positions, self.config.d_head, self.config.rope_theta)
        x = self.hook_embed(self.model.embed_tokens(input_ids))
        x = self._blocks_from(0, x, cos, sin, mask, cache, pos0)
        if cache is not None:
            cache.pos += input_ids.shape[1]
            if isinstance(pos0, torch.Tensor):
                cache.fill += 1
        x = self.hook_normalized(self.model.norm(_to(x, self.model.norm.weight.device)))
        return self.hook_logits(self.lm_head(_to(x, self.lm_head.weight.device)))

    def _blocks_from(self, start: int, x, cos, sin, mask, cache, pos0) -> torch.Tensor:
        for i in range(start, len(self.blocks)):
            block = self.blocks[i]
            device = block.input_layernorm.weight.device
            if x.device != device:  # layers spread over devices (device="auto")
                x, cos, sin = x.to(device), cos.to(device), sin.to(device)
                mask = None if mask is None else mask.to(device)
            x = block(x, cos, sin, mask, cache.layers[i] if cache else None, pos0)
        return x

    def forward_from(
        self, layer: int, resid: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``[batch pos vocab]`` running only blocks ``layer..`` from ``resid`` ``[batch pos d_model]``,
        the value ``blocks.{layer}.hook_resid_pre`` took in a run on the same ``input_ids`` and
        ``attention_mask``: the same numbers as that full run when nothing before ``layer`` is edited,
        without recomputing the earlier blocks (an intervention at layer L needs only blocks L..).
        Hooks on points of blocks ``layer..`` and after fire as usual; earlier ones do not."""
        if not 0 <= layer < len(self.blocks):
            raise ValueError(f"layer must lie in 0..{len(self.blocks) - 1}, got {layer}")
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, None)
        if tuple(resid.shape) != (*input_ids.shape, self.config.hidden_size):
            raise ValueError(f"resid must be [batch pos d_model] = {(*input_ids.shape, self.config.hidden_size)}")
        positions, mask, pos0 = self._positions_and_mask(input_ids, attention_mask, None)
        cos, sin = rope_tables(positions, self.config.d_head, self.config.rope_theta)
        x = self._blocks_from(layer, resid, cos, sin, mask, None, pos0)
        x = self.hook_normalized(self.model.norm(_to(x, self.model.norm.weight.device)))
        return self.hook_logits(self.lm_head(_to(x, self.lm_head.weight.device)))

    def _static_step(self, input_ids, cache: KVCache):
        """Positions ``[batch 1]``, mask ``[batch 1 1 capacity]`` and write index ``[1]`` of a
        one-token step on a static cache: device tensors only, fixed shapes (CUDA-graph safe)."""
        positions = cache.next_position.view(-1, 1).clone()
        cache.next_position += 1
        keys = torch.arange(cache.capacity, device=cache.fill.device)
        visible = cache.key_mask & (keys <= cache.fill)  # filled prefix + this step, minus padding
        return positions, visible[:, None, None, :], cache.fill

    def _positions_and_mask(self, input_ids, attention_mask, cache):
        """Rotary positions ``[batch pos]``, attention mask ``[batch 1 pos kv_pos]`` (None = causal)
        and the cache offset. Padded queries may always attend to themselves so no row is empty."""
        b, t = input_ids.shape
        device = input_ids.device
        pos0 = cache.pos if cache is not None else 0
        if attention_mask is None:
            real = None
            if cache is not None and t == 1:  # a decode step: each row's next position (a copy: it moves on below)
                positions = cache.next_position.view(b, 1).clone()
            else:
                offsets = cache.next_position[:, None] if cache is not None else 0
                positions = torch.arange(t, device=device).expand(b, t) + offsets
        else:
            real = attention_mask.to(device=device, dtype=torch.bool)
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)
            if cache is not None:
                positions = positions + cache.next_position[:, None]
        if cache is not None:
            n_real = real.sum(-1) if real is not None else t
            cache.next_position += n_real
            if real is not None:
                cache.key_mask[:, pos0 : pos0 + t] = real
                cache.padded = cache.padded or not bool(real.all())
            padded = cache.padded
            key_valid = cache.key_mask[:, : pos0 + t]
        else:
            padded = real is not None and not bool(real.all())
            key_valid = real
        if not padded and (t == 1 or pos0 == 0):
            return positions, None, pos0  # plain causal (or one query over the whole prefix)
        q_abs = torch.arange(t, device=device)[:, None] + pos0
        k_abs = torch.arange(pos0 + t, device=device)[None, :]
        mask = (k_abs <= q_abs)[None, None]
        if padded:
            mask = (mask & key_valid[:, None, None, :]) | (k_abs == q_abs)
        return positions, mask.expand(b, 1, t, pos0 + t), pos0

    def _check_inputs(self, input_ids, attention_mask, cache):
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        if input_ids.ndim != 2 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be [batch pos] with pos >= 1, got shape {tuple(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        input_ids = input_ids.to(device=self.model.embed_tokens.weight.device, dtype=torch.long)
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
                raise ValueError(f"attention_mask shape {got} does not match input_ids shape {tuple(input_ids.shape)}")
            valid = (attention_mask == 0) | (attention_mask == 1)
            if not bool(valid.all()):
                raise ValueError(
                    "attention_mask must contain only 0 (padding) and 1 (real token), "
                    f"found {attention_mask[~valid][0].item()}"
                )
            if not bool((attention_mask != 0).any(-1).all()):
                empty = (attention_mask == 0).all(-1).nonzero().flatten().tolist()
                raise ValueError(f"attention_mask rows {empty} have no real token (all 0)")
        if cache is not None:
            if not hasattr(cache, "check_fits"):
                raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
            cache.check_fits(self)
            if cache.batch != input_ids.shape[0]:
                raise ValueError(f"cache batch {cache.batch} != input batch {input_ids.shape[0]}")
            if cache.pos + input_ids.shape[1] > cache.capacity:
                raise ValueError(
                    f"{input_ids.shape[1]} new tokens after {cache.pos} cached exceed the cache capacity "
                    f"{cache.capacity}"
                )
        return input_ids, attention_mask

    # ------------------------------------------------------------------ hook shapes
    def hook_shape(self, name: str, batch: int, pos: int) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of hook point ``name`` for a ``[batch pos]`` input (no cache)."""
        c = self.config
        dtype = self.model.embed_tokens.weight.dtype
        suffix = name.split(".")[-1]
        shapes = {
            "hook_embed": (batch, pos, c.hidden_size),
            "hook_q": (batch, pos, c.num_attention_heads, c.d_head),
            "hook_rot_q": (batch, pos, c.num_attention_heads, c.d_head),
            "hook_z": (batch, pos, c.num_attention_heads, c.d_head),
            "hook_k": (batch, pos, c.num_key_value_heads, c.d_head),
            "hook_v": (batch, pos, c.num_key_value_heads, c.d_head),
            "hook_rot_k": (batch, pos, c.num_key_value_heads, c.d_head),
            "hook_attn_scores": (batch, c.num_attention_heads, pos, pos),
            "hook_pattern": (batch, c.num_attention_heads, pos, pos),
            "hook_pre": (batch, pos, c.intermediate_size),
            "hook_post": (batch, pos, c.intermediate_size),
            "hook_router_logits": (batch, pos, c.moe_num_experts),
            "hook_router_probs": (batch, pos, c.moe_num_experts),
            "hook_topk_idx": (batch, pos, c.moe_k),
            "hook_topk_weights": (batch, pos, c.moe_k),
            "hook_expert_post": (batch, pos, c.moe_k, c.moe_intermediate_size),
            "hook_expert_out": (batch, pos, c.moe_k, c.hidden_size),
            "hook_logits": (batch, pos, c.vocab_size),
        }
        if name not in self.hook_dict:
            self.resolve_names(name)  # raises with close matches
        if suffix in ("hook_router_logits", "hook_router_probs", "hook_topk_weights"):
            dtype = torch.float32
        elif suffix == "hook_topk_idx":
            dtype = torch.int64
        return shapes.get(suffix, (batch, pos, c.hidden_size)), dtype

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Generate continuations; see :func:`ernie_lab.generation.generate.generate`. Hooks fire at every step."""
        from ernie_lab.generation.generate import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs):
        """Yield new token ids step by step; see :func:`ernie_lab.generation.generate.stream`."""
        from ernie_lab.generation.generate import stream

        return stream(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)
