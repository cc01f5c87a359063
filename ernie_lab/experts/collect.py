"""One pass over a dataset that accumulates per-expert statistics inside hooks (no activation cache).

Axes: layer (MoE layers, ``model.config.moe_layers`` order) expert; per batch ``batch pos topk
d_model``. Notation of ANALYSES.md "Expert-level analyses": ``S_t`` the selected set (the model's own,
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

from ernie_lab.io.datasets import as_sequences, iter_batches


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
    model, data: Any, tokenizer: Any = None, batch_size: int = 8, progress: bool = True, fwd_hooks=()
) -> ExpertSums:
    """Run ``model`` over ``data`` (anything ``as_sequences`` accepts) and accumulate :class:`ExpertSums`.

    Per MoE layer the hooks read ``hook_resid_mid``, ``hook_topk_idx``, ``hook_topk_weights``,
    ``hook_expert_out`` and ``hook_mlp_out``; each reduces its tensor to per-slot numbers ``[n topk]``
    at once. ``fwd_hooks`` (e.g. an ablation) are active during the runs and see edits first.
    """
    layers = list(model.config.moe_layers)
    if not layers:
        raise ValueError("the model has no MoE layer")
    sequences = as_sequences(data, tokenizer)
    n_layer, n_expert = len(layers), model.config.moe_num_experts
    sums = {k: torch.zeros(n_layer, n_expert, dtype=torch.float64) for k in ("count", "gate", "norm", "gate_norm")}
    sums["easy"] = torch.zeros(n_layer, n_expert, dtype=torch.float64)
    sums["peak"] = torch.zeros(n_layer, n_expert, dtype=torch.float64)
    state: dict[str, Any] = {}

    def real(x: torch.Tensor) -> torch.Tensor:
        return x[state["real"].to(x.device)]

    def on_resid_mid(x, hook):
        state["h"] = real(model.blocks[hook.layer].post_attention_layernorm(x)).float()

    def on_idx(x, hook):
        state["idx"] = real(x).cpu()

    def on_weights(x, hook):
        state["g"] = real(x).double().cpu()

    def on_expert_out(x, hook):
        f = real(x).float()  # [n topk d_model]
        state["f_norm"] = f.norm(dim=-1).double().cpu()
        state["f_peak"] = f.abs().amax(dim=-1).double().cpu()

    def on_mlp_out(y, hook):
        li, idx, g, f_norm = layers.index(hook.layer), state["idx"], state["g"], state["f_norm"]
        away = (1.0 - F.cosine_similarity(state.pop("h"), real(y).float(), dim=-1)).double().cpu()  # [n]
        flat = idx.flatten()
        for key, values in (
            ("count", torch.ones_like(g)),
            ("gate", g),
            ("norm", f_norm),
            ("gate_norm", g * f_norm),
            ("easy", g * f_norm * away[:, None]),
        ):
            sums[key][li].index_add_(0, flat, values.flatten())
        sums["peak"][li].scatter_reduce_(0, flat, state["f_peak"].flatten(), reduce="amax")
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
            state["real"] = mask.bool()
            n_tokens += int(mask.sum())
            with contextlib.suppress(_StopForward):
                model(ids, attention_mask=mask)
    return ExpertSums(layers=layers, n_tokens=n_tokens, **sums)
