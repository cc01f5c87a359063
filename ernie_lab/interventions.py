"""Intervention primitives: each returns ``[(hook_name, fn), ...]`` to pass as ``fwd_hooks``.

The pairs work with ``model.run_with_hooks(ids, fwd_hooks=...)``, ``with model.hooks(fwd_hooks=...)``,
``model.run_with_cache(..., fwd_hooks=...)`` and ``model.generate(..., fwd_hooks=...)``; recipes in
the top-level ``hooks/`` folder combine them (:func:`load_recipe`).

Routing edits rely on how ``MoE.route`` chains its hook points (README, "Editing semantics"): the selection is
computed from the (possibly edited) ``hook_router_probs``; an edited ``hook_topk_idx`` makes the
model re-gather the unbiased probs of the new experts and renormalise them *before*
``hook_topk_weights``; an edited ``hook_topk_weights`` is used as is. Expert primitives stash the
value seen at an earlier point of the same forward call (probs, idx) and use it at a later one.

Calling convention: every primitive takes the model first and checks its arguments against it.

Positions. ``positions`` (ints, list or 1-D tensor) index the pos axis of each forward call;
negative indices count from its end and indices a call lacks are skipped. ``generate`` runs the
prompt in one call (prefill: every position) and then one call per new token (decode: pos=1). A
call of a single position is treated as a decode step: with ``positions=None`` it is edited, with
explicit positions only if they contain ``-1`` ("the last position of every call"). So ``[0, 1]``
edits two prompt positions and never a generated token, ``[-1]`` edits the last prompt token and
every generated one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

import torch

from ernie_lab.model.checks import (
    ArgumentRangeError,
    ArgumentTypeError,
    as_ints,
    as_number,
    expert_ids,
    expert_map,
    moe_layer,
)
from ernie_lab.model.hook_points import ActivationCache, HookError, HookFn, HookPoint, NameSpec
from ernie_lab.recipes import RecipeError, is_recipe_name, list_recipes, load_recipe, recipe_dir  # noqa: F401
from ernie_lab.steering import steer_experts as steer_experts  # public as el.interventions.steer_experts

Hooks = list[tuple[NameSpec, HookFn]]

# hook points whose layout is [batch head pos kv_pos]; every other point is [batch pos ...]
_HEAD_FIRST = ("hook_attn_scores", "hook_pattern")


def _axes(name: str) -> tuple[int, int]:
    """(pos axis, index axis) of a hook point: ``index`` picks a head / topk slot / last-axis unit."""
    return (2, 1) if name.rsplit(".", 1)[-1] in _HEAD_FIRST else (1, 2)


def _positions(positions) -> list[int] | None:
    """Positions checked at the call (integers; a float or bool is never rounded)."""
    return None if positions is None else as_ints(positions, "positions", scalar=True)


def _as_index(values, name: str) -> torch.Tensor:
    return torch.tensor(as_ints(values, name, scalar=True), dtype=torch.long)


def _select(x: torch.Tensor, name: str, positions=None, index=None) -> torch.Tensor | None:
    """Bool mask broadcastable to ``x`` marking the edited entries, or None when the call has none."""
    pos_axis, idx_axis = _axes(name)
    mask = torch.ones((1,) * x.ndim, dtype=torch.bool, device=x.device)
    if positions is not None:
        n_pos = x.shape[pos_axis]
        pos = _as_index(positions, "positions")
        keep = pos == -1 if n_pos == 1 else (pos >= -n_pos) & (pos < n_pos)  # n_pos == 1: decode step
        pos = pos[keep] % n_pos
        if pos.numel() == 0:
            return None
        shape = [1] * x.ndim
        shape[pos_axis] = n_pos
        along = torch.zeros(n_pos, dtype=torch.bool, device=x.device)
        along[pos.to(x.device)] = True
        mask = mask & along.view(shape)
    if index is not None:
        if x.ndim <= idx_axis:
            raise HookError(f"index= needs an axis after pos, but {name} has shape {tuple(x.shape)}")
        n_idx = x.shape[idx_axis]
        idx = _as_index(index, "index")
        if bool(((idx < -n_idx) | (idx >= n_idx)).any()):
            raise HookError(f"index {idx.tolist()} is out of range for axis {idx_axis} of {name} (size {n_idx})")
        shape = [1] * x.ndim
        shape[idx_axis] = n_idx
        along = torch.zeros(n_idx, dtype=torch.bool, device=x.device)
        along[(idx % n_idx).to(x.device)] = True
        mask = mask & along.view(shape)
    return mask


def _check_model(model, call: str) -> None:  # a named error rather than an AttributeError later
    if not (hasattr(model, "config") and hasattr(model, "hook_dict")):
        raise TypeError(f"{call}: the first argument must be the model (every intervention takes it first)")


# ----------------------------------------------------------------------------- activations
def mean_ablate(model, name: NameSpec, mean: torch.Tensor, positions=None) -> Hooks:
    """Replace the activation at ``name`` by ``mean`` (broadcast), optionally only at ``positions``.

    ``name``: a hook name, glob or predicate. ``mean``: the activation's shape without batch and pos
    (``[d_model]`` for residual points, ``[head d_head]`` for ``hook_z``, ``[head kv_pos]`` for the
    pattern) or anything that broadcasts to the full activation (``[pos d_model]``...). Cast to the
    activation's dtype/device. Decode (pos=1): see the module docstring on ``positions``; a mean that
    carries a pos axis must broadcast to that call's shape, else a HookError names the point.
    """
    _check_model(model, "mean_ablate(model, name, mean, positions=None)")
    positions = _positions(positions)
    model.resolve_names(name)  # an unknown name fails here, with close matches
    mean = torch.as_tensor(mean)

    def mean_ablate_hook(x: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
        sel = _select(x, hook.name, positions)
        if sel is None:
            return None
        m = mean.to(device=x.device, dtype=x.dtype)
        if m.ndim == x.ndim - 2:  # insert the batch and pos axes
            m = m.unsqueeze(0).unsqueeze(_axes(hook.name)[0])
        try:
            m = m.expand_as(x)
        except RuntimeError as err:
            shapes = f"{tuple(mean.shape)} to {hook.name} {tuple(x.shape)}"
            raise HookError(f"cannot broadcast a mean of shape {shapes}") from err
        return torch.where(sel, m, x)

    return [(name, mean_ablate_hook)]


def add_steering_vector(model, name: NameSpec, vector: torch.Tensor, scale: float = 1.0, positions=None) -> Hooks:
    """Add ``scale * vector`` (``[d_model]``) to a residual-stream-like activation ``[batch pos d_model]``.

    ``name``: a hook name, glob or predicate (e.g. ``"blocks.3.hook_resid_pre"``). Applied at every
    position of every call (decode included, i.e. every generated token) unless ``positions`` limits
    it (module docstring). A vector whose length differs from the activation's last axis is a HookError.
    """
    _check_model(model, "add_steering_vector(model, name, vector, scale=1.0, positions=None)")
    positions = _positions(positions)
    scale = as_number(scale, "scale")
    model.resolve_names(name)
    vector = torch.as_tensor(vector)
    if vector.ndim != 1:
        raise ValueError(f"vector must be 1-D [d_model], got shape {tuple(vector.shape)}")

    def steering_hook(x: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
        if x.shape[-1] != vector.shape[0]:
            raise HookError(f"steering vector of length {vector.shape[0]} does not fit {hook.name} {tuple(x.shape)}")
        sel = _select(x, hook.name, positions)
        if sel is None:
            return None
        delta = scale * vector.to(device=x.device, dtype=x.dtype)
        return x + delta * sel.to(x.dtype)

    return [(name, steering_hook)]


def patch_from_cache(model, cache: ActivationCache, names, positions=None, index=None) -> Hooks:
    """Replace activations by their values in ``cache`` (activation patching, README Definitions).

    ``names``: a hook name, a glob over the cache's keys (``"blocks.*.hook_resid_pre"``) or a list of
    either. ``positions``: restrict to those positions (module docstring). ``index``: an int or ints
    along the axis after pos: the head of ``hook_q/k/v/rot_q/rot_k/z`` (and of the head-first
    ``hook_attn_scores``/``hook_pattern``), the topk slot of ``hook_topk_idx/topk_weights/expert_post/
    expert_out``, the expert of ``hook_router_probs``, the unit of a ``d_ff`` point.
    The activation must have the cached shape, else a HookError names the point; cached values are cast
    to the activation's dtype. Decode: the cache covers a full sequence, so single-position calls
    (decode steps) are left unchanged and generation continues unpatched after the prefill.
    """
    _check_model(model, "patch_from_cache(model, cache, names, positions=None, index=None)")
    positions = _positions(positions)
    index = None if index is None else as_ints(index, "index", scalar=True)
    specs = [names] if isinstance(names, str) else list(names)
    chosen: list[str] = []
    for spec in specs:
        hits = fnmatch.filter(cache.keys(), spec) if any(c in spec for c in "*?[") else [spec]
        if not hits:
            raise KeyError(f"no cached activation matches {spec!r}")
        for k in hits:
            cache[k]  # KeyError with close matches when absent
            if k not in chosen:
                chosen.append(k)

    def make(src: torch.Tensor):
        def patch_hook(x: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
            if x.shape != src.shape:
                pos_axis = _axes(hook.name)[0]
                if x.shape[pos_axis] == 1 and src.shape[pos_axis] > 1:
                    return None  # a decode step of generate: nothing cached to patch in
                raise HookError(f"cannot patch {hook.name}: activation {tuple(x.shape)}, cache {tuple(src.shape)}")
            sel = _select(x, hook.name, positions, index)
            if sel is None:
                return None
            return torch.where(sel, src.to(device=x.device, dtype=x.dtype), x)

        return patch_hook

    return [(k, make(cache[k])) for k in chosen]


# ----------------------------------------------------------------------------- experts
def _check_experts(model, layer: int, experts: Iterable[int]) -> list[int]:
    _check_model(model, "expert interventions take (model, ...)")
    layer = moe_layer(model.config, layer)
    return expert_ids(model.config, experts, layer)


def _moe_name(layer: int, point: str) -> str:
    return f"blocks.{layer}.moe.hook_{point}"


class _Stash:
    """Holds one tensor between two hook points of the same forward call."""

    def __init__(self, what: str):
        self.what, self.value = what, None

    def put(self, x: torch.Tensor, hook: HookPoint) -> None:
        self.value = x

    def take(self, hook: HookPoint) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError(f"{hook.name}: no {self.what} was seen earlier in this forward call")
        value, self.value = self.value, None
        return value


def zero_ablate_experts(model, experts: Mapping[int, Iterable[int]]) -> Hooks:
    """Zero-ablate experts: ``{layer: [expert, ...]}``; their weight is 0 wherever they are selected.

    Hooks: ``blocks.{L}.moe.hook_topk_idx`` (read) and ``hook_topk_weights`` (edited), both
    ``[batch pos topk]``. The other selected experts keep their weights (no renormalisation), so the
    token gets less routed output. The idx seen is the one reaching this hook (after earlier hooks
    at that point). Decode: applied at every step, to every new token.
    """
    _check_model(model, "zero_ablate_experts(model, experts)")
    hooks: Hooks = []
    for layer, es in expert_map(model.config, experts).items():
        ablated = torch.tensor(es, dtype=torch.long)
        if ablated.numel() == 0:
            continue
        stash = _Stash("hook_topk_idx")

        def zero_weights(w: torch.Tensor, hook: HookPoint, stash=stash, ablated=ablated) -> torch.Tensor:
            hit = torch.isin(stash.take(hook), ablated.to(w.device))
            return w.masked_fill(hit, 0.0)

        hooks += [(_moe_name(layer, "topk_idx"), stash.put), (_moe_name(layer, "topk_weights"), zero_weights)]
    return hooks


def reroute_ablate_experts(model, experts: Mapping[int, Iterable[int]]) -> Hooks:
    """Reroute-ablate experts: ``{layer: [expert, ...]}`` are masked out before top-k.

    Hooks: ``blocks.{L}.moe.hook_router_probs`` ``[batch pos expert]`` (read, left unmodified so caches
    show the real router) and ``hook_topk_idx`` ``[batch pos topk]`` (replaced by the top-k of
    ``probs + e_score_correction_bias`` with the ablated experts at -inf). The model then weights the
    new set by its unbiased probs, renormalised, so each token gets its next-best experts. Raises
    ValueError when more than ``E - k`` experts of a layer are ablated. Decode: applied at every step.
    """
    _check_model(model, "reroute_ablate_experts(model, experts)")
    cfg = model.config
    hooks: Hooks = []
    for layer, es in expert_map(cfg, experts).items():
        ablated = torch.tensor(es, dtype=torch.long)
        if ablated.numel() > cfg.moe_num_experts - cfg.moe_k:
            raise ValueError(
                f"layer {layer}: cannot reroute around {ablated.numel()} of {cfg.moe_num_experts} experts "
                f"with top-{cfg.moe_k}; at most {cfg.moe_num_experts - cfg.moe_k}"
            )
        if ablated.numel() == 0:
            continue
        stash = _Stash("hook_router_probs")
        statics = model.blocks[layer].mlp.moe_statics

        def reroute(idx: torch.Tensor, hook: HookPoint, stash=stash, ablated=ablated, statics=statics):
            scores = stash.take(hook) + statics.e_score_correction_bias.squeeze(0)
            scores = scores.index_fill(-1, ablated.to(scores.device), float("-inf"))
            return scores.topk(idx.shape[-1], dim=-1).indices

        hooks += [(_moe_name(layer, "router_probs"), stash.put), (_moe_name(layer, "topk_idx"), reroute)]
    return hooks


def mean_ablate_experts(model, means: Mapping[tuple[int, int], torch.Tensor]) -> Hooks:
    """Mean-ablate experts: ``{(layer, expert): mean [d_model]}`` (see :func:`expert_mean_outputs`).

    Hooks: ``blocks.{L}.moe.hook_topk_idx`` (read) and ``hook_expert_out`` ``[batch pos topk d_model]``
    (the slots holding that expert are replaced by its mean, then weighted as usual). Hooking
    ``hook_expert_out`` switches the layer to the explicit expert path. Decode: applied at every step.
    """
    _check_model(model, "mean_ablate_experts(model, means)")
    if not isinstance(means, Mapping):
        raise ArgumentTypeError(f"means must be a mapping {{(layer, expert): mean}}, got {type(means).__name__}")
    by_layer: dict[int, dict[int, torch.Tensor]] = {}
    for key, mean in means.items():
        layer, expert = _pairs(model, [key], "means")[0]
        mean = torch.as_tensor(mean)
        if mean.shape != (model.config.hidden_size,):
            d = model.config.hidden_size
            raise ValueError(f"mean of expert {key} must be [d_model={d}], got {tuple(mean.shape)}")
        by_layer.setdefault(layer, {})[int(expert)] = mean
    hooks: Hooks = []
    for layer, table in by_layer.items():
        stash = _Stash("hook_topk_idx")

        def replace(out: torch.Tensor, hook: HookPoint, stash=stash, table=table) -> torch.Tensor:
            idx = stash.take(hook)
            for expert, mean in table.items():
                hit = (idx == expert)[..., None]
                out = torch.where(hit, mean.to(device=out.device, dtype=out.dtype), out)
            return out

        hooks += [(_moe_name(layer, "topk_idx"), stash.put), (_moe_name(layer, "expert_out"), replace)]
    return hooks


def _pairs(model, experts, name: str = "experts") -> list[tuple[int, int]]:
    """``(layer, expert)`` pairs, checked, from ``{layer: [expert, ...]}`` or ``[(layer, expert), ...]``."""
    if isinstance(experts, Mapping):
        return [(layer, e) for layer, es in expert_map(model.config, experts, name).items() for e in es]
    if isinstance(experts, str | bytes) or not isinstance(experts, Iterable):
        raise ArgumentTypeError(f"{name} must be {{layer: [expert, ...]}} or [(layer, expert), ...], got {experts!r}")
    out = []
    for pair in experts:
        if isinstance(pair, str | bytes) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ArgumentTypeError(f"{name} must hold (layer, expert) pairs, got {pair!r}")
        layer = moe_layer(model.config, pair[0], f"{name}: layer")
        out.append((layer, expert_ids(model.config, [pair[1]], layer, name)[0]))
    return out


@torch.no_grad()
def expert_mean_outputs(model, input_ids, experts, attention_mask=None) -> dict[tuple[int, int], torch.Tensor]:
    """Mean output ``[d_model]`` (fp32) of each expert over the reference tokens where it is selected.

    ``experts``: ``{layer: [expert, ...]}`` or ``[(layer, expert), ...]``; ``input_ids [batch pos]``;
    padding (``attention_mask == 0``) is excluded. An expert never selected on the reference set gets
    the mean of its output computed on every reference token instead (its selected-token mean is
    undefined). Returns ``{(layer, expert): mean}`` for :func:`mean_ablate_experts`.
    """
    _check_model(model, "expert_mean_outputs(model, input_ids, experts, attention_mask=None)")
    pairs = _pairs(model, experts)
    layers = sorted({layer for layer, _ in pairs})
    names = [_moe_name(L, p) for L in layers for p in ("topk_idx", "expert_out")]
    names += [f"blocks.{L}.hook_resid_mid" for L in layers]
    _, cache = model.run_with_cache(input_ids, names_filter=names, attention_mask=attention_mask)
    some_idx = cache[names[0]]
    real = torch.ones(some_idx.shape[:2], dtype=torch.bool, device=some_idx.device)
    if attention_mask is not None:
        real = attention_mask.reshape(real.shape).to(device=real.device, dtype=torch.bool)
    out: dict[tuple[int, int], torch.Tensor] = {}
    for layer, expert in pairs:
        idx = cache[_moe_name(layer, "topk_idx")][real]  # [n topk]
        expert_out = cache[_moe_name(layer, "expert_out")][real]  # [n topk d_model]
        hit = idx == expert
        if bool(hit.any()):
            out[(layer, expert)] = expert_out[hit].float().mean(0)
        else:
            block = model.blocks[layer]
            x = block.post_attention_layernorm(cache[f"blocks.{layer}.hook_resid_mid"][real])
            ex = block.mlp.experts
            out[(layer, expert)] = ex.down(expert, ex.post(expert, x)).float().mean(0)
    return out


def force_routing(model, layer: int, experts: Sequence[int], weights=None) -> Hooks:
    """Route every token of MoE ``layer`` to ``experts`` (exactly ``moe_k`` of them).

    Hooks: ``blocks.{layer}.moe.hook_topk_idx`` ``[batch pos topk]`` (replaced); with ``weights``
    (``moe_k`` numbers) also ``hook_topk_weights`` (replaced, used as given). Without ``weights`` the
    model weights the forced experts by their unbiased router probs, renormalised. Decode: applied at
    every step, to every new token.
    """
    _check_model(model, "force_routing(model, layer, experts, weights=None)")
    k = model.config.moe_k
    layer = moe_layer(model.config, layer)
    forced = as_ints(experts, "experts", 0, model.config.moe_num_experts)
    if len(forced) != k or len(set(forced)) != k:
        raise ArgumentRangeError(f"force_routing needs exactly moe_k={k} distinct experts, got {forced}")
    forced_t = torch.tensor(forced, dtype=torch.long)

    def forced_idx(idx: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return forced_t.to(idx.device).expand_as(idx).contiguous()

    hooks: Hooks = [(_moe_name(layer, "topk_idx"), forced_idx)]
    if weights is not None:
        w_t = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if not bool(torch.isfinite(w_t).all()):
            raise ArgumentRangeError(f"force_routing weights must be finite, got {w_t.tolist()}")
        if w_t.numel() != k:
            raise ValueError(f"force_routing needs moe_k={k} weights, got {w_t.numel()}")

        def forced_weights(w: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            return w_t.to(device=w.device, dtype=w.dtype).expand_as(w).contiguous()

        hooks.append((_moe_name(layer, "topk_weights"), forced_weights))
    return hooks
