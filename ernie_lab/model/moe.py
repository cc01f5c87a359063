"""ERNIE 4.5 mixture-of-experts block: fp32 router with a correction bias, routed and shared experts.

Axes: batch pos d_model expert topk d_expert; ``n`` = batch*pos flattened tokens, ``slot`` = one
(token, topk) assignment. Routed expert weights are stacked ``[expert, ...]`` (gate and up fused as
``gate_up_proj [expert 2*d_expert d_model]``, ``down_proj [expert d_model d_expert]``); the loader
maps the hub's per-expert keys onto them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.hook_points import HookPoint
from ernie_lab.model.layers import SwiGLU, linear
from ernie_lab.model.weight_views import expert_halves, expert_transposed


class _Fp32Module(nn.Module):
    """Keeps its tensors in fp32 through ``model.to(bfloat16)`` (device moves still apply):
    routing decisions flip on tiny differences, so the router never runs in low precision."""

    def _apply(self, fn, recurse=True):
        # the pre-conversion values, so a bf16 round trip never rounds the router
        before = {n: t.data for n, t in [*self._parameters.items(), *self._buffers.items()] if t is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            t = self._parameters.get(name, self._buffers.get(name))
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float() if old.is_meta or t.is_meta else old.to(t.device, torch.float32)
        return self


class Gate(_Fp32Module):
    """Router weight ``[expert d_model]``, kept in fp32 whatever the model dtype."""

    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.moe_num_experts, cfg.hidden_size, dtype=torch.float32))


class MoeStatics(_Fp32Module):
    """``e_score_correction_bias [1 expert]``: aux-loss-free balancing bias, used for selection only."""

    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        bias = torch.zeros(1, cfg.moe_num_experts, dtype=torch.float32)
        self.register_buffer("e_score_correction_bias", bias)


class Experts(nn.Module):
    """The routed experts, stacked. Each is ``down(silu(gate(x)) * up(x))`` of width d_expert.

    The MoE block uses only ``post``, ``down`` and ``gather``: quantized and offloaded experts
    (``model/quant.py``, ``model/offload.py``) provide the same three methods.
    """

    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        e, d, f = cfg.moe_num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))

    def post(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate(x)) * up(x)`` of expert ``e`` on ``x [n d_model]`` -> ``[n d_expert]``."""
        gate, up = expert_halves(self.gate_up_proj, e)
        return F.silu(torch.mm(x, gate)) * torch.mm(x, up)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """``down(h)`` of expert ``e`` on ``h [n d_expert]`` -> ``[n d_model]``."""
        return torch.mm(h, expert_transposed(self.down_proj, e))

    def gather(self, idx: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights of the experts ``idx``: ``gate_up [*idx 2*d_expert d_model]``, ``down [*idx d_model d_expert]``."""
        return self.gate_up_proj[idx], self.down_proj[idx]


def _sorted_slots(idx: torch.Tensor, n_expert: int):
    """Group token-slot assignments by expert: (order, token of each sorted slot, counts per expert)."""
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_expert).tolist()  # one host sync per layer
    return order, order // idx.shape[-1], counts


def _per_expert(fn, x_sorted: torch.Tensor, counts: list[int], d_out: int) -> torch.Tensor:
    """Apply ``fn(e, rows)`` to each expert's contiguous block of sorted rows (one matmul each)."""
    parts, start = [], 0
    for e, c in enumerate(counts):
        if c:
            parts.append(fn(e, x_sorted[start : start + c]))
            start += c
    return torch.cat(parts) if parts else x_sorted.new_empty(0, d_out)


# up to this many (token, expert) slots an accelerator gathers expert weights instead of sorting: a
# copy of GATHER_MAX_SLOTS experts per layer at most (16 x 23.6 MB at ERNIE-4.5-21B's shape in bf16)
GATHER_MAX_SLOTS = 16


def on_accelerator(x: torch.Tensor) -> bool:
    """Whether ``x`` lives on an accelerator (anything but the CPU): there the few-token decode path
    gathers expert weights instead of reading expert ids on the host."""
    return x.device.type != "cpu"


def _gathered_experts(ex: Experts, xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Every slot's expert output ``[n topk d_model]`` for ``xs [n d_model]``, ``idx [n topk]``.

    Indexes the stacked weights with the expert ids (a copy of ``topk`` experts per token) and runs
    batched matmuls: no data-dependent shapes, so no host sync and CUDA-graph friendly.
    """
    gate_up, down = ex.gather(idx, xs.dtype)
    gate, up = einsum(gate_up, xs, "n k f d, n d -> n k f").chunk(2, dim=-1)
    return einsum(down, F.silu(gate) * up, "n k d f, n k f -> n k d")


def _unsort(t_sorted: torch.Tensor, order: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows sorted by expert back to slot order: ``[(b p k) f]`` -> ``[b p k f]``."""
    # the inverse permutation as a gather: index_select copies whole rows (10x faster than t[...] = ...)
    slots = t_sorted.index_select(0, order.argsort())
    return rearrange(slots, "(b p k) f -> b p k f", b=idx.shape[0], p=idx.shape[1])


def _mix(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the selected experts' outputs ``[b p k d]`` -> ``[b p d]``.

    One batched matmul ``[n 1 k] @ [n k d]``, shared by both paths so they agree bit for bit; a
    scatter-add (index_add_) would be simpler but runs as a multi-threaded region even for a handful
    of rows, which costs milliseconds per call on a busy CPU.
    """
    b, p, k, d = out.shape
    if b * p == 1 and out.is_contiguous():
        return _mix_one(out.view(k, d), weights)
    rows = out.view(b * p, k, d) if out.is_contiguous() else out.reshape(b * p, k, d)
    mix = weights.view(b * p, 1, k) if weights.is_contiguous() else weights.reshape(b * p, 1, k)
    return torch.bmm(mix, rows).view(b, p, d)


def _mix_one(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`_mix` for one token: ``out [topk d]``, ``weights [1 1 topk]`` -> ``[1 1 d]`` as ``[1 k] @ [k d]``."""
    mix = weights.view(1, -1) if weights.is_contiguous() else weights.reshape(1, -1)
    return torch.mm(mix, out).view(1, 1, -1)


class MoE(nn.Module):
    """Router -> top-k routed experts (weighted) + shared experts (unweighted)."""

    def __init__(self, cfg: ErnieConfig, layer: int):
        super().__init__()
        self.n_expert, self.k, self.norm_min = cfg.moe_num_experts, cfg.moe_k, cfg.moe_norm_min
        self.d_expert = cfg.moe_intermediate_size
        self.gate = Gate(cfg)
        self.moe_statics = MoeStatics(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.d_shared, cfg.use_bias) if cfg.moe_num_shared_experts else None
        )
        names = [
            "router_logits",
            "router_probs",
            "topk_idx",
            "topk_weights",
            "expert_post",
            "expert_out",
            "routed_out",
        ] + (["shared_out"] if self.shared_experts else [])
        for n in names:
            setattr(self, f"hook_{n}", HookPoint(f"blocks.{layer}.moe.hook_{n}", layer))
        self._points = [getattr(self, f"hook_{n}") for n in names]

    def hook_points(self) -> list[HookPoint]:
        return self._points

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices and mixing weights ``[batch pos topk]`` for ``x [batch pos d_model]``.

        Every step sees the previous step's (possibly hook-edited) value, so editing the logits or
        probs changes the selection, and editing the indices re-gathers the weights.
        """
        # fp32 logits whatever the model dtype (transformers disables autocast here too)
        logits = self.hook_router_logits(linear(x if x.dtype == torch.float32 else x.float(), self.gate.weight))
        probs = self.hook_router_probs(logits.softmax(dim=-1))
        # select on bias-corrected scores (aux-loss-free balancing), ...
        scores = probs + self.moe_statics.e_score_correction_bias  # [1 expert] broadcasts
        idx = self.hook_topk_idx(scores.topk(self.k, dim=-1).indices)
        if self.hook_topk_idx.active:  # a hook may have re-routed: only then check (a host sync)
            self._check_expert_ids(idx)
        # ... but weight by the unbiased probabilities of the chosen experts, renormalised
        weights = probs.gather(-1, idx)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=self.norm_min)
        return idx, self.hook_topk_weights(weights)

    def _check_expert_ids(self, idx: torch.Tensor) -> None:
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise TypeError(f"{self.hook_topk_idx.name} must hold integer expert ids, got dtype {idx.dtype}")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.n_expert:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{self.hook_topk_idx.name}: expert id {bad} is outside [0, {self.n_expert})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, weights = self.route(x)
        weights = weights if weights.dtype == x.dtype else weights.to(x.dtype)
        if self.hook_expert_post.active or self.hook_expert_out.active:
            routed = self._routed_explicit(x, idx, weights)
        else:
            routed = self._routed_fast(x, idx, weights)
        out = self.hook_routed_out(routed)
        if self.shared_experts is not None:
            out = out + self.hook_shared_out(self.shared_experts(x))
        return out

    def _routed_fast(self, x, idx, weights) -> torch.Tensor:
        """Sort slots by expert, one matmul chain per active expert, unsort and mix.

        Two decode shortcuts give the same numbers: one token on the CPU loops over its k slots
        without sorting; a few tokens on an accelerator gather the selected experts' weights, which
        needs no host sync (the sort needs per-expert counts on the host).
        """
        xs = x.view(-1, x.shape[-1]) if x.is_contiguous() else x.reshape(-1, x.shape[-1])
        ex = self.experts
        # an expert-parallel part (ernie_lab.distributed) holds some experts only: no gather there
        whole = not getattr(ex, "expert_subset", False)
        # a CUDA graph captures this path only (no host sync): the graphed decode step is refused
        # where batch*topk > GATHER_MAX_SLOTS (cuda_graph.graph_refusal), which bounds the copies
        if on_accelerator(x) and whole and idx.numel() <= GATHER_MAX_SLOTS:
            out = _gathered_experts(ex, xs, rearrange(idx, "b p k -> (b p) k"))
            return _mix(rearrange(out, "(b p) k d -> b p k d", b=x.shape[0]), weights)
        if xs.shape[0] == 1:
            return _mix_one(torch.cat([ex.down(e, ex.post(e, xs)) for e in idx.tolist()[0][0]]), weights)
        order, token, counts = _sorted_slots(idx, self.n_expert)
        rows = xs.index_select(0, token)
        out_sorted = _per_expert(lambda e, r: ex.down(e, ex.post(e, r)), rows, counts, x.shape[-1])
        return _mix(_unsort(out_sorted, order, idx), weights)

    def _routed_explicit(self, x, idx, weights) -> torch.Tensor:
        """Same maths with per-slot ``expert_post`` / ``expert_out`` materialised for hooks."""
        xs = rearrange(x, "b p d -> (b p) d")
        order, token, counts = _sorted_slots(idx, self.n_expert)
        post = _unsort(_per_expert(self.experts.post, xs.index_select(0, token), counts, self.d_expert), order, idx)
        post = self.hook_expert_post(post)
        post_sorted = rearrange(post, "b p k f -> (b p k) f").index_select(0, order)
        out = _unsort(_per_expert(self.experts.down, post_sorted, counts, x.shape[-1]), order, idx)
        return _mix(self.hook_expert_out(out), weights)
