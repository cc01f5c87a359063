"""ERNIE 4.5 mixture-of-experts block: fp32 router with a correction bias, routed and shared experts.

Axes: batch pos d_model expert topk d_expert; ``n`` = batch*pos flattened tokens, ``slot`` = one
(token, topk) assignment. Routed expert weights are stacked ``[expert, ...]`` in the layout the
kernels take, so no second copy is ever made: gate and up fused and pre-transposed as
``gate_up_proj [expert d_model 2*d_expert]`` (``x @ gate_up_proj[e]`` gives gate then up columns),
``down_proj [expert d_expert d_model]``. The loader maps the hub's per-expert ``[d_out d_in]`` keys
onto transposed views of them (``save_model`` the other way).

Several tokens run through one grouped matmul per projection (``torch._grouped_mm``, as transformers'
``grouped_mm`` experts) over slots sorted by expert; one token, or a torch without the kernel, runs
one ``mm`` per selected expert and projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.hook_points import HookPoint
from ernie_lab.model.layers import SwiGLU, linear
from ernie_lab.model.weight_views import expert_slices


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

    The MoE block uses ``post``, ``down`` and ``gather`` (one expert, or a few gathered ones) and, for
    several tokens, ``grouped_post`` / ``grouped_down``: quantized and offloaded experts
    (``model/quant.py``, ``model/offload.py``) provide the first three and run the per-expert loop.
    """

    def __init__(self, cfg: ErnieConfig):
        super().__init__()
        e, d, f = cfg.moe_num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, d, 2 * f))
        self.down_proj = nn.Parameter(torch.empty(e, f, d))

    def post(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate(x)) * up(x)`` of expert ``e`` on ``x [n d_model]`` -> ``[n d_expert]`` (one ``mm``)."""
        return _swiglu(torch.mm(x, expert_slices(self.gate_up_proj)[e]))

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """``down(h)`` of expert ``e`` on ``h [n d_expert]`` -> ``[n d_model]``."""
        return torch.mm(h, expert_slices(self.down_proj)[e])

    def gather(self, idx: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights of the experts ``idx``: ``gate_up [*idx d_model 2*d_expert]``, ``down [*idx d_expert d_model]``."""
        return self.gate_up_proj[idx], self.down_proj[idx]

    def grouped_fits(self, rows: torch.Tensor) -> bool:
        """Whether :meth:`grouped_post` / :meth:`grouped_down` run on rows like ``rows`` (see
        :func:`grouped_mm_fits`)."""
        width = self.down_proj.shape[1] * rows.element_size()  # the rows of the middle activation
        return width % 16 == 0 and grouped_mm_fits(rows, self.gate_up_proj, self.down_proj)

    def grouped_post(self, rows: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """:meth:`post` of every expert on its block of ``rows [slot d_model]``, sorted by expert
        (``offs [expert]``: int32 block ends) -> ``[slot d_expert]``: one grouped matmul."""
        return _swiglu(_GROUPED_MM(rows, self.gate_up_proj, offs=offs))

    def grouped_down(self, h: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """:meth:`down` of every expert on its block of ``h [slot d_expert]`` -> ``[slot d_model]``."""
        return _GROUPED_MM(h, self.down_proj, offs=offs)


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of fused ``[... 2*d_expert]`` projections (gate columns first)."""
    f = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :f]) * gate_up[..., f:]


# torch >= 2.8 has the grouped matmul on the CPU too; F.grouped_mm is its public name from 2.10
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 loops


def grouped_mm_fits(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes rows like ``x`` against ``weights``: the kernel exists,
    nothing is being compiled (inductor lowers it for bf16 only), no gradient is recorded (its CPU
    backward fails), plain tensors of one dtype (fp32, bf16 or fp16), weights with 16-byte aligned
    starts and rows (the kernel's rule; the rows it gets are fresh ``index_select`` copies, aligned
    by the allocator), and on CUDA bf16 on compute capability 8.0 or newer."""
    if _GROUPED_MM is None or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights)):
        return False
    plain = (torch.Tensor, nn.Parameter)
    if x.dtype not in _GROUPED_DTYPES or any(type(t) not in plain or t.dtype != x.dtype for t in (x, *weights)):
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu":
        return False
    size = x.element_size()
    return x.shape[-1] * size % 16 == 0 and all(
        w.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st in w.stride()[:-1]) and w.stride(-1) == 1
        for w in weights
    )


def _sorted_slots(idx: torch.Tensor, n_expert: int, on_host: bool):
    """Group token-slot assignments by expert: (order, token of each sorted slot, per-expert counts as
    a host list when ``on_host`` (one host sync per layer), else their int32 running ends on the device)."""
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    if on_host or flat.device.type == "cpu":
        counts = torch.bincount(flat, minlength=n_expert)
    else:  # bincount reads its size on the host; histc does not (float counts: exact below 2**24 slots)
        counts = torch.histc(flat.float(), bins=n_expert, min=0, max=n_expert - 1)
    ends = counts.tolist() if on_host else counts.cumsum(0, dtype=torch.int32)
    return order, order // idx.shape[-1], ends


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
    post = _swiglu(einsum(gate_up, xs, "n k d f, n d -> n k f"))
    return einsum(down, post, "n k f d, n k f -> n k d")


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
        grouped = self._grouped(xs)
        order, token, ends = _sorted_slots(idx, self.n_expert, on_host=grouped is None)
        rows = xs.index_select(0, token)
        if grouped is not None:
            out_sorted = grouped.grouped_down(grouped.grouped_post(rows, ends), ends)
        else:
            out_sorted = _per_expert(lambda e, r: ex.down(e, ex.post(e, r)), rows, ends, x.shape[-1])
        return _mix(_unsort(out_sorted, order, idx), weights)

    def _grouped(self, xs: torch.Tensor) -> Experts | None:
        """The experts when their grouped matmuls serve these tokens: several tokens, all experts
        here (not an expert-parallel part), dense (quantized and offloaded ones loop) and a kernel
        that takes the operands. Both paths use it, so hooked and plain runs agree bit for bit."""
        ex = self.experts
        if xs.shape[0] < 2 or getattr(ex, "expert_subset", False) or not isinstance(ex, Experts):
            return None
        return ex if ex.grouped_fits(xs) else None

    def _routed_explicit(self, x, idx, weights) -> torch.Tensor:
        """Same maths with per-slot ``expert_post`` / ``expert_out`` materialised for hooks."""
        xs = rearrange(x, "b p d -> (b p) d")
        grouped = self._grouped(xs)
        order, token, ends = _sorted_slots(idx, self.n_expert, on_host=grouped is None)
        rows = xs.index_select(0, token)
        if grouped is not None:
            post_sorted = grouped.grouped_post(rows, ends)
        else:
            post_sorted = _per_expert(self.experts.post, rows, ends, self.d_expert)
        post = self.hook_expert_post(_unsort(post_sorted, order, idx))
        post_sorted = rearrange(post, "b p k f -> (b p k) f").index_select(0, order)
        if grouped is not None:
            out_sorted = grouped.grouped_down(post_sorted, ends)
        else:
            out_sorted = _per_expert(self.experts.down, post_sorted, ends, x.shape[-1])
        out = _unsort(out_sorted, order, idx)
        return _mix(self.hook_expert_out(out), weights)
