"""One pass over a dataset that accumulates per-expert statistics inside hooks (no activation cache).

Axes: layer (MoE layers, ``model.config.moe_layers`` order) expert; per batch ``batch pos topk
d_model``. Notation of README "Definitions": ``S_t`` the selected set (the model's own,
bias-corrected top-k read from ``hook_topk_idx``), ``g_e(t)`` its weight (``hook_topk_weights``),
``f_e(t)`` the expert's output (``hook_expert_out``), ``h_t`` the MoE input (post-attention norm of
``hook_resid_mid``) and ``y_t`` the MoE output (``hook_mlp_out``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ernie_lab.io.datasets import as_sequences, check_batch_size, iter_batches
from ernie_lab.model.checks import nonfinite_error

_KEYS = ("count", "gate", "norm", "gate_norm", "easy")


class _StopForward(Exception):
    """Raised after the last MoE layer: the rest of the forward pass is not needed."""


@dataclass
class ExpertSums:
    """Sums over the real tokens of a dataset, each ``[layer expert]`` float64 on the CPU.

    ``count = |X_e|``, ``gate = sum g_e``, ``norm = sum ||f_e||``, ``gate_norm = sum g_e ||f_e||``,
    ``easy = sum g_e ||f_e|| (1 - cos(h, y))``, ``peak = max |f_e|`` over tokens and channels (0 when
    never selected); ``n_tokens`` real tokens seen; ``layers`` the MoE layers.
    """

    layers: list[int]
    n_tokens: int
    count: torch.Tensor
    gate: torch.Tensor
    norm: torch.Tensor
    gate_norm: torch.Tensor
    easy: torch.Tensor
    peak: torch.Tensor


def expert_sums(
    model,
    data: Any,
    tokenizer: Any = None,
    batch_size: int = 8,
    progress: bool = True,
    fwd_hooks=(),
    check_finite: bool = True,
) -> ExpertSums:
    """Run ``model`` over ``data`` (anything ``as_sequences`` accepts) and accumulate :class:`ExpertSums`.

    Per MoE layer the hooks read ``hook_resid_mid``, ``hook_topk_idx``, ``hook_topk_weights``,
    ``hook_expert_out`` and ``hook_mlp_out``, reduce them to per-slot numbers ``[batch pos topk]``
    (padding weighted 0) and add those into per-expert sums on the model's device: no activation is
    stored and nothing syncs with the host until the end. ``fwd_hooks`` (e.g. an ablation) are active
    during the runs and see edits first. ``check_finite``: NaN or inf on a real token at
    ``hook_topk_weights``, ``hook_expert_out`` or ``hook_mlp_out`` raises ``NonFiniteError`` naming
    the first such layer and point (counted on the device, checked once at the end).
    """
    layers = list(model.config.moe_layers)
    if not layers:
        raise ValueError("the model has no MoE layer")
    check_batch_size(batch_size)
    sequences = as_sequences(data, tokenizer)
    n_expert = model.config.moe_num_experts
    # accumulated on the model's device (no host sync per hook): [layer key expert], keys as _KEYS
    acc: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}

    def on_resid_mid(x, hook):
        state["h"] = model.blocks[hook.layer].post_attention_layernorm(x)

    def on_idx(x, hook):
        state["idx"] = x

    points = ("topk_weights", "expert_out", "mlp_out")

    def count_bad(x, hook, point: str) -> None:  # non-finite entries on real tokens, no host sync
        if check_finite:
            real = state["real"].to(x.device).reshape(*x.shape[:2], *([1] * (x.ndim - 2))) > 0
            bad = (~torch.isfinite(x) & real).sum()
            if "bad" not in acc:
                acc["bad"] = torch.zeros(len(layers), len(points), dtype=torch.long, device=x.device)
            acc["bad"][layers.index(hook.layer), points.index(point)] += bad.to(acc["bad"].device)

    def on_weights(x, hook):
        count_bad(x, hook, "topk_weights")
        state["g"] = x

    def on_expert_out(x, hook):
        count_bad(x, hook, "expert_out")
        state["f_norm"] = x.float().norm(dim=-1)  # [batch pos topk]
        state["f_peak"] = x.float().abs().amax(dim=-1)

    def on_mlp_out(y, hook):
        count_bad(y, hook, "mlp_out")
        if "sums" not in acc:
            dtype = torch.float32 if y.device.type == "mps" else torch.float64  # MPS has no float64
            acc["sums"] = torch.zeros(len(layers), len(_KEYS), n_expert, dtype=dtype, device=y.device)
            acc["peak"] = torch.zeros(len(layers), n_expert, dtype=dtype, device=y.device)
        sums, li = acc["sums"], layers.index(hook.layer)
        on = {"device": sums.device, "dtype": sums.dtype}  # layers may sit on several devices
        real = state["real"].to(**on)[..., None]  # [batch pos 1]: 1 = real token, 0 = padding
        g, f_norm = state.pop("g").to(**on) * real, state.pop("f_norm").to(**on)
        away = 1.0 - F.cosine_similarity(state.pop("h").float(), y.float(), dim=-1).to(**on)[..., None]
        values = torch.stack([real.expand_as(g), g, f_norm * real, g * f_norm, g * f_norm * away])  # [key b p k]
        flat = state.pop("idx").flatten().to(sums.device)
        sums[li].index_add_(1, flat, values.flatten(1))
        acc["peak"][li].scatter_reduce_(0, flat, (state.pop("f_peak").to(**on) * real).flatten(), reduce="amax")
        if hook.layer == layers[-1]:
            raise _StopForward

    hooks = list(fwd_hooks)
    for L in layers:
        moe = f"blocks.{L}.moe.hook_"
        hooks += [(f"blocks.{L}.hook_resid_mid", on_resid_mid), (moe + "topk_idx", on_idx)]
        hooks += [(moe + "topk_weights", on_weights), (moe + "expert_out", on_expert_out)]
        hooks.append((f"blocks.{L}.hook_mlp_out", on_mlp_out))
    n_tokens = 0
    n_batches = -(-len(sequences) // batch_size)
    batches = iter_batches(sequences, batch_size, model.config.pad_token_id or 0)
    with torch.no_grad(), model.hooks(hooks):
        for ids, mask, _ in tqdm(batches, total=n_batches, disable=not progress, desc="experts"):
            state["real"] = mask.float()
            n_tokens += int(mask.sum())
            with contextlib.suppress(_StopForward):
                model(ids, attention_mask=mask)
    if check_finite and "bad" in acc and bool(acc["bad"].any()):
        bad = acc["bad"].cpu()
        li, pi = (int(i) for i in torch.nonzero(bad)[0])
        point = (
            f"blocks.{layers[li]}.hook_mlp_out"
            if points[pi] == "mlp_out"
            else f"blocks.{layers[li]}.moe.hook_{points[pi]}"
        )
        raise nonfinite_error(f"{point} (layer {layers[li]}), expert_sums", int(bad.sum()))
    sums = acc["sums"].double().cpu()
    return ExpertSums(
        layers=layers,
        n_tokens=n_tokens,
        **{key: sums[:, i] for i, key in enumerate(_KEYS)},
        peak=acc["peak"].double().cpu(),
    )
