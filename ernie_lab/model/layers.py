"""Dense building blocks of ERNIE 4.5: RMSNorm, interleaved RoPE, GQA attention, SwiGLU MLP.

Axes: batch pos kv_pos d_model head kv_head d_head d_ff (glossary in model/ernie.py).
Module attribute names equal the checkpoint keys (``self_attn.q_proj``, ``mlp.gate_proj``...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.hook_points import HookPoint
from ernie_lab.model.kv_cache import LayerKV
from ernie_lab.model.weight_views import transposed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [... d_in]`` and ``weight [d_out d_in]``.

    Without a bias it is the same ``mm`` that ``F.linear`` runs (same numbers) on a cached transposed
    view of the weight (:mod:`ernie_lab.model.weight_views`): three operator calls instead of eight,
    which at decode is most of what a projection costs.
    """
    if bias is not None:
        return F.linear(x, weight, bias)
    wt = transposed(weight)
    if x.dim() == 2:
        return torch.mm(x, wt)
    flat = x.view(-1, x.shape[-1]) if x.is_contiguous() else x.reshape(-1, x.shape[-1])
    return torch.mm(flat, wt).view(*x.shape[:-1], wt.shape[1])


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[batch pos ...]`` -> ``[batch*pos features]`` (a view when the layout allows)."""
    n = x.shape[0] * x.shape[1]
    return x.view(n, -1) if x.is_contiguous() else x.reshape(n, -1)


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """Swap axes 1 and 2 (``[b p h d]`` <-> ``[b h p d]``); with one position a view of the same memory."""
    if (t.shape[1] == 1 or t.shape[2] == 1) and t.is_contiguous():
        return t.view(t.shape[0], t.shape[2], t.shape[1], t.shape[3])
    return t.transpose(1, 2)


def _merge_batch_heads(t: torch.Tensor) -> torch.Tensor:
    """``[b h n d]`` -> ``[b*h n d]``; a view for the cache's filled prefix (rows of a longer buffer)."""
    b, h, n, d = t.shape
    if t.stride(3) == 1 and t.stride(2) == d and t.stride(0) == h * t.stride(1):
        return t.view(b * h, n, d)
    return t.reshape(b * h, n, d)


def _plain_cpu(t: torch.Tensor) -> bool:
    """fp32 on the CPU, outside torch.compile: where the hand-written decode attention applies."""
    return t.is_cpu and t.dtype == torch.float32 and not torch.compiler.is_compiling()


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and checkpoint keys) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)``; statistics in fp32, result cast back before the scale
    (the order transformers' LlamaRMSNorm uses, which matters in bf16).

    Written as ``sum(x * x) / width + eps`` with the width and eps held as 0-dim fp32 tensors: the
    numbers of ``x.pow(2).mean(-1) + eps`` bit for bit (``mean`` is that sum and division), without
    the tensor a Python scalar is wrapped into at every call (four operator calls each).
    """

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps
        # plain attributes (not buffers): never cast to the model dtype; a 0-dim CPU tensor serves any device
        self._width = torch.tensor(float(d_model), dtype=torch.float32, device="cpu")
        self._eps = torch.tensor(eps, dtype=torch.float32, device="cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x if x.dtype == torch.float32 else x.float()
        var = (x32 * x32).sum(-1, keepdim=True).div_(self._width).add_(self._eps)
        x32 = x32 * var.rsqrt_()
        return self.weight * (x32 if x.dtype == torch.float32 else x32.to(x.dtype))


_ROPE_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _rope_constant(name: str, d_head: int, theta: float, device: torch.device) -> torch.Tensor:
    """A ``[d_head]`` constant of RoPE, made once per shape and device (fresh while compiling):

    - ``freq``: each pair's frequency ``theta ** (-2i / d_head)`` twice (RoFormer), in fp32 like
      transformers so the angles agree bit for bit;
    - ``sign``: the sign of each lane's sin term (-1, +1, -1, ...);
    - ``swap``: the index that swaps each pair (1, 0, 3, 2, ...).
    """
    key = (name, d_head, theta, device)
    compiling = torch.compiler.is_compiling()
    if key in _ROPE_CONSTANTS and not compiling:
        return _ROPE_CONSTANTS[key]
    with torch.inference_mode(False):  # a normal tensor: usable under autograd after an inference_mode call
        lanes = torch.arange(d_head, device=device)
        if name == "freq":
            made = 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.float, device=device) / d_head))
            made = made.repeat_interleave(2)
        elif name == "sign":
            made = (lanes % 2) * 2.0 - 1.0
        else:
            made = lanes + 1 - 2 * (lanes % 2)
    if not compiling:
        _ROPE_CONSTANTS[key] = made
    return made


def rope_tables(positions: torch.Tensor, d_head: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved cos and signed sin ``[batch pos 1 d_head]`` (fp32) for ``positions [batch pos]``:
    ``cos[2i] = cos[2i+1] = cos_i``, ``sin[2i] = -sin_i``, ``sin[2i+1] = sin_i`` of the angle
    ``position * theta ** (-2i / d_head)``. Computed once per forward and shared by every layer; the
    1 broadcasts over heads."""
    freq = _rope_constant("freq", d_head, theta, positions.device)
    sign = _rope_constant("sign", d_head, 0.0, positions.device)
    b, p = positions.shape
    angles = positions.float().unsqueeze(-1) * freq
    return angles.cos().view(b, p, 1, d_head), (angles.sin() * sign).view(b, p, 1, d_head)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[2i], x[2i+1])`` (GLM / interleaved style) of ``x`` ``[batch pos head d_head]``
    by the tables of :func:`rope_tables`: ``(x0 cos - x1 sin, x1 cos + x0 sin)``, in fp32.

    ``x * cos + swap_pairs(x) * sin`` is transformers' ``q * cos + rotate_half(q) * sin`` term for term.
    """
    x32 = x if x.dtype == torch.float32 else x.float()
    d = x.shape[-1]
    flat = x32.view(-1, d) if x32.is_contiguous() else x32.reshape(-1, d)
    swapped = flat.index_select(1, _rope_constant("swap", d, 0.0, x.device)).view(x.shape)
    rotated = x32 * cos + swapped * sin
    return rotated if x.dtype == torch.float32 else rotated.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention with interleaved RoPE.

    Fast path: ``scaled_dot_product_attention``. Explicit path (scores and pattern materialised) only
    when ``hook_attn_scores`` or ``hook_pattern`` has a hook; both give the same result.
    """

    def __init__(self, cfg: ErnieConfig, layer: int):
        super().__init__()
        d, h, kvh, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.d_head
        self.n_head, self.n_kv_head, self.d_head, self.rope_theta = h, kvh, dh, cfg.rope_theta
        self.q_proj = Linear(d, h * dh, bias=cfg.use_bias)
        self.k_proj = Linear(d, kvh * dh, bias=cfg.use_bias)
        self.v_proj = Linear(d, kvh * dh, bias=cfg.use_bias)
        self.o_proj = Linear(h * dh, d, bias=cfg.use_bias)
        self._scale = torch.tensor(dh**-0.5, dtype=torch.float32, device="cpu")  # sdpa's default scale
        prefix = f"blocks.{layer}.attn."
        names = ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z")
        for n in names:
            setattr(self, f"hook_{n}", HookPoint(prefix + f"hook_{n}", layer))

    # TransformerLens' per-head weight views (no copies: they share the projections' storage), so
    # ``q[h] = x @ W_Q[h]`` before RoPE and ``attn_out = sum_h z[h] @ W_O[h]`` (+ bias)
    @property
    def W_Q(self) -> torch.Tensor:
        """``[head d_model d_head]`` view of ``q_proj.weight``."""
        return self.q_proj.weight.view(self.n_head, self.d_head, -1).transpose(1, 2)

    @property
    def W_K(self) -> torch.Tensor:
        """``[kv_head d_model d_head]`` view of ``k_proj.weight`` (GQA: query head h reads kv head
        ``h // (head / kv_head)``; TransformerLens repeats them, we do not copy)."""
        return self.k_proj.weight.view(self.n_kv_head, self.d_head, -1).transpose(1, 2)

    @property
    def W_V(self) -> torch.Tensor:
        """``[kv_head d_model d_head]`` view of ``v_proj.weight``."""
        return self.v_proj.weight.view(self.n_kv_head, self.d_head, -1).transpose(1, 2)

    @property
    def W_O(self) -> torch.Tensor:
        """``[head d_head d_model]`` view of ``o_proj.weight``."""
        return self.o_proj.weight.view(-1, self.n_head, self.d_head).permute(1, 2, 0)

    def hook_points(self) -> list[HookPoint]:
        return [
            self.hook_q,
            self.hook_k,
            self.hook_v,
            self.hook_rot_q,
            self.hook_rot_k,
            self.hook_attn_scores,
            self.hook_pattern,
            self.hook_z,
        ]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv: LayerKV | None = None,
        pos: int = 0,
    ) -> torch.Tensor:
        """``x`` ``[batch pos d_model]`` -> ``[batch pos d_model]``.

        ``mask`` ``[batch 1 pos kv_pos]`` bool (True = may attend) or None for plain causal attention.
        With ``kv`` the new keys/values are written at ``pos`` and attention covers the filled prefix.
        """
        b, p, d = x.shape
        x2 = _rows(x)
        q = self.hook_q(self.q_proj(x2).view(b, p, -1, self.d_head))
        k = self.hook_k(self.k_proj(x2).view(b, p, -1, self.d_head))
        v = self.hook_v(self.v_proj(x2).view(b, p, -1, self.d_head))
        q = self.hook_rot_q(apply_rope(q, cos, sin))
        k = self.hook_rot_k(apply_rope(k, cos, sin))
        k, v = _heads_first(k), _heads_first(v)  # [b kv_head p d]
        if kv is not None:
            k, v = kv.update(pos, k, v)
        explicit = self.hook_attn_scores.active or self.hook_pattern.active
        if p == 1 and mask is None and not explicit and _plain_cpu(q):
            z = self._one_query(q, k, v)
            return self.o_proj(_rows(self.hook_z(z))).view(b, p, d)
        q = _heads_first(q)  # [b head p d]
        if explicit:
            z = self._explicit(q, k, v, mask)
        else:
            # a branch, not an expression: under torch.compile the shapes are symbolic and sdpa wants a bool
            causal = True if mask is None and q.shape[2] == k.shape[2] and q.shape[2] > 1 else False  # noqa: SIM210
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
            z = _heads_first(z)  # [b p h d]
        z = self.hook_z(z)
        return self.o_proj(_rows(z)).view(b, p, d)

    def _one_query(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A decode step without padding on the CPU: ``q [b 1 head d_head]`` over every cached key,
        two batched matmuls per (batch, kv_head) group and a softmax -> ``z [b 1 head d_head]``.

        The same attention as the sdpa call (fewer operator calls: no layout round trips), equal to
        it to fp32 round-off.
        """
        b, _, h, dh = q.shape
        kvh = k.shape[1]
        k, v = _merge_batch_heads(k), _merge_batch_heads(v)  # [b*kv_head kv_pos d_head]
        q = q.view(b * kvh, h // kvh, dh) if q.is_contiguous() else q.reshape(b * kvh, h // kvh, dh)
        scores = torch.bmm(q, k.transpose(1, 2))
        return torch.bmm(scores.mul_(self._scale).softmax(-1), v).view(b, 1, h, dh)

    def _explicit(self, q, k, v, mask) -> torch.Tensor:
        """Scores and softmax written out (softmax in fp32, as transformers' eager attention)."""
        group = self.n_head // self.n_kv_head
        q = rearrange(q, "b (kvh g) p d -> b kvh g p d", g=group)
        scores = einsum(q, k, "b kvh g p d, b kvh kv_pos d -> b kvh g p kv_pos") * self.d_head**-0.5
        scores = rearrange(scores, "b kvh g p kv_pos -> b (kvh g) p kv_pos")
        if mask is None:  # plain causal over a prefix of len kv_pos - pos
            n_q, n_k = scores.shape[-2:]
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
        pattern = self.hook_pattern(scores.softmax(-1, dtype=torch.float32).to(q.dtype))
        pattern = rearrange(pattern, "b (kvh g) p kv_pos -> b kvh g p kv_pos", g=group)
        z = einsum(pattern, v, "b kvh g p kv_pos, b kvh kv_pos d -> b p kvh g d")
        return rearrange(z, "b p kvh g d -> b p (kvh g) d")


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: the dense MLP and the shared experts."""

    def __init__(self, d_model: int, d_ff: int, bias: bool):
        super().__init__()
        self.gate_proj = Linear(d_model, d_ff, bias=bias)
        self.up_proj = Linear(d_model, d_ff, bias=bias)
        self.down_proj = Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        return self.down_proj(F.silu(self.gate_proj(rows)) * self.up_proj(rows)).view(x.shape)


class DenseMLP(SwiGLU):
    """A non-MoE layer's SwiGLU with ``hook_pre`` (gate pre-activation) and ``hook_post``."""

    def __init__(self, cfg: ErnieConfig, layer: int):
        super().__init__(cfg.hidden_size, cfg.intermediate_size, cfg.use_bias)
        self.hook_pre = HookPoint(f"blocks.{layer}.mlp.hook_pre", layer)
        self.hook_post = HookPoint(f"blocks.{layer}.mlp.hook_post", layer)

    def hook_points(self) -> list[HookPoint]:
        return [self.hook_pre, self.hook_post]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, _ = x.shape
        rows = _rows(x)
        pre = self.hook_pre(self.gate_proj(rows).view(b, p, -1))
        post = self.hook_post(F.silu(pre) * self.up_proj(rows).view(b, p, -1))
        return self.down_proj(post)
