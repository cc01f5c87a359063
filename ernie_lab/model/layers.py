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

# up to this many fp32 rows on the CPU, linear() multiplies row by row (decode steps)
THIN_ROWS = 3


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [... d_in]`` and ``weight [d_out d_in]``.

    A few fp32 rows on the CPU (decode steps, an expert's few tokens) are multiplied one by one as
    ``weight @ [row; row].T``: BLAS streams the weight about twice as fast in that layout as in
    ``x @ weight.T`` on the 2-core AMD development host, and a decode step is mostly weight
    streaming. A row goes in twice because with one column BLAS takes its (slowest) matrix-vector
    kernel; rows go one by one so that a row's rounding never depends on the rows beside it
    (patching one position must leave the other positions' numbers alone).
    """
    rows = x.numel() // x.shape[-1]
    if not (x.is_cpu and x.dtype == torch.float32 and 0 < rows <= THIN_ROWS):
        return F.linear(x, weight, bias)
    flat = x if x.dim() == 2 else x.reshape(rows, x.shape[-1])
    out = _row_product(weight, flat) if rows == 1 else torch.cat([_row_product(weight, r) for r in flat.split(1)])
    if x.dim() != 2:
        out = out.reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def _row_product(weight: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """``row @ weight.T`` for ``row [1 d_in]``. [row; row] is row-major, so its .T is a transposed
    view: the fast kernel (a column-major operand takes a slower one)."""
    return torch.mm(weight, torch.cat((row, row)).T)[:, :1].T


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and checkpoint keys) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)``; statistics in fp32, result cast back before the scale
    (the order transformers' LlamaRMSNorm uses, which matters in bf16)."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_angles(positions: torch.Tensor, d_head: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[batch pos d_head/2]`` in fp32 for integer ``positions`` ``[batch pos]``.

    Frequencies ``theta ** (-2i / d_head)`` (RoFormer), computed in fp32 like transformers so the
    angles agree bit for bit.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.float, device=positions.device) / d_head))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[2i], x[2i+1])`` (GLM / interleaved style) of ``x`` ``[batch pos head d_head]``.

    A pair is the complex number ``x[2i] + i x[2i+1]``; multiplying by ``cos + i sin`` gives
    ``(x0 cos - x1 sin, x1 cos + x0 sin)`` in one kernel instead of six. Under ``torch.compile``
    the real form is used (inductor fuses it; it has no complex kernels).
    """
    pairs = rearrange(x.float(), "b p h (half two) -> b p h half two", two=2)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    if torch.compiler.is_compiling():
        x0, x1 = pairs.unbind(-1)
        rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * torch.complex(cos, sin))
    return rearrange(rotated, "b p h half two -> b p h (half two)").to(x.dtype)


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
        prefix = f"blocks.{layer}.attn."
        names = ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z")
        for n in names:
            setattr(self, f"hook_{n}", HookPoint(prefix + f"hook_{n}", layer))

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
        q = self.hook_q(rearrange(self.q_proj(x), "b p (h d) -> b p h d", d=self.d_head))
        k = self.hook_k(rearrange(self.k_proj(x), "b p (h d) -> b p h d", d=self.d_head))
        v = self.hook_v(rearrange(self.v_proj(x), "b p (h d) -> b p h d", d=self.d_head))
        q = self.hook_rot_q(apply_rope(q, cos, sin))
        k = self.hook_rot_k(apply_rope(k, cos, sin))
        q, k, v = (rearrange(t, "b p h d -> b h p d") for t in (q, k, v))
        if kv is not None:
            k, v = kv.update(pos, k, v)
        if self.hook_attn_scores.active or self.hook_pattern.active:
            z = self._explicit(q, k, v, mask)
        else:
            # a branch, not an expression: under torch.compile the shapes are symbolic and sdpa wants a bool
            causal = True if mask is None and q.shape[2] == k.shape[2] and q.shape[2] > 1 else False  # noqa: SIM210
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
            z = rearrange(z, "b h p d -> b p h d")
        z = self.hook_z(z)
        return self.o_proj(rearrange(z, "b p h d -> b p (h d)"))

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
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DenseMLP(SwiGLU):
    """A non-MoE layer's SwiGLU with ``hook_pre`` (gate pre-activation) and ``hook_post``."""

    def __init__(self, cfg: ErnieConfig, layer: int):
        super().__init__(cfg.hidden_size, cfg.intermediate_size, cfg.use_bias)
        self.hook_pre = HookPoint(f"blocks.{layer}.mlp.hook_pre", layer)
        self.hook_post = HookPoint(f"blocks.{layer}.mlp.hook_post", layer)

    def hook_points(self) -> list[HookPoint]:
        return [self.hook_pre, self.hook_post]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(self.gate_proj(x))
        post = self.hook_post(F.silu(pre) * self.up_proj(x))
        return self.down_proj(post)
