"""Direct logit attribution of experts, attention layers (and heads) and shared experts (README, Definitions: "Expert
ablation": ``w_{t,e} * expert_out_{t,e} / rms_scale_t · (W_U[:, a] - W_U[:, b])``).

Re-exported by ``ernie_lab.ablation``. Axes: batch pos d_model topk (glossary in model/ernie.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from einops import einsum

from ernie_lab.model.checks import ArgumentRangeError, as_int, token_ids

COLUMNS = ["batch", "component", "layer", "head", "slot", "expert", "weight", "contribution", "label"]


def _component_names(cfg, heads: bool) -> list[str]:
    """Hook points whose values sum to the final residual (plus routing, ``hook_z`` for the heads and
    the residual itself)."""
    last = cfg.num_hidden_layers - 1
    names = ["hook_embed", f"blocks.{last}.hook_resid_post"]
    for L in range(cfg.num_hidden_layers):
        names.append(f"blocks.{L}.hook_attn_out")
        if heads:
            names.append(f"blocks.{L}.attn.hook_z")
        if not cfg.is_moe_layer(L):
            names.append(f"blocks.{L}.hook_mlp_out")
            continue
        names += [f"blocks.{L}.moe.hook_{p}" for p in ("expert_out", "topk_idx", "topk_weights")]
        if cfg.moe_num_shared_experts:
            names.append(f"blocks.{L}.moe.hook_shared_out")
    return names


def direct_logit_attribution(
    model,
    input_ids: torch.Tensor,
    answer: int | Sequence[int],
    distractor: int | Sequence[int],
    position: int = -1,
    attention_mask: torch.Tensor | None = None,
    heads: bool = False,
) -> pd.DataFrame:
    """Direct contribution of every component to ``logit[answer] - logit[distractor]`` at ``position``.

    The final residual is ``embed + sum_L attn_out_L + sum_L mlp_out_L`` and a MoE layer's
    ``mlp_out = shared_out + sum_slots w_{t,e} * expert_out_{t,e}``. With the final RMSNorm scale
    frozen from the run, ``rms_t = sqrt(mean(resid_final_t^2) + eps)``, a component c contributes
    ``c_t * g / rms_t · (W_U[a] - W_U[b])`` (g = final norm weight). The rows partition
    the residual, so ``contribution.sum()`` per batch row equals the logit difference minus the
    lm_head bias term, which gets its own ``bias`` row when the model has one.

    ``input_ids`` ``[pos]`` or ``[batch pos]``; ``answer``/``distractor`` one id or one per row;
    ``position`` indexes the pos axis (-1 = last column, the last real token under left padding).
    Columns: batch, component (embed | attn | head | mlp | shared | expert | bias), layer, head, slot,
    expert, weight (w_{t,e}), contribution, label.

    ``heads=True`` adds one ``head`` row per attention head, ``z_{t,h} W_O[h] · direction``
    (``hook_z`` through that head's slice of ``o_proj``): a layer's head rows sum to its ``attn``
    row (minus the ``o_proj`` bias term when the model has one). They refine the attn rows, so the
    partition above is the rows with ``component != "head"``. ``df.attrs["logit_diff"]`` holds the model's logit
    difference per batch row. Only the activations at ``position`` are kept.
    """
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    n_batch, cfg = input_ids.shape[0], model.config
    ids = {}
    for name, value in (("answer", answer), ("distractor", distractor)):
        got = token_ids(value, name, cfg.vocab_size)
        if len(got) not in (1, n_batch):
            raise ArgumentRangeError(f"{name} must be one token id or one per batch row ({n_batch}), got {len(got)}")
        ids[name] = torch.tensor(got, dtype=torch.long).expand(n_batch)
    answer_t, distractor_t = ids["answer"], ids["distractor"]
    position = as_int(position, "position", -input_ids.shape[1], input_ids.shape[1])
    store: dict[str, torch.Tensor] = {}

    def keep(x: torch.Tensor, hook) -> None:  # the value at ``position``, fp64 on the CPU
        store[hook.name] = x[:, position].detach().double().cpu()

    with torch.no_grad(), model.hooks([(n, keep) for n in _component_names(cfg, heads)]):
        final = model(input_ids, attention_mask=attention_mask)[:, position].double().cpu()

    # frozen final-norm scale and the unembedding direction per row: g * (W_U[a] - W_U[b]) / rms_t
    resid = store[f"blocks.{cfg.num_hidden_layers - 1}.hook_resid_post"]  # [batch d_model]
    rms = (resid.pow(2).mean(-1, keepdim=True) + model.model.norm.eps).sqrt()
    w_u = model.lm_head.weight.detach().double().cpu()
    direction = model.model.norm.weight.detach().double().cpu() * (w_u[answer_t] - w_u[distractor_t]) / rms

    parts: list[pd.DataFrame] = []

    def add(component: str, layer: int | None, value: torch.Tensor, label, **slots: torch.Tensor) -> None:
        """Rows for ``value`` ``[batch]``, or ``[batch topk]`` with per-slot columns."""
        per_row = value[0].numel()
        part = {"batch": torch.arange(n_batch).repeat_interleave(per_row).numpy(), "component": component}
        part |= {"layer": layer, "contribution": value.reshape(-1).numpy(), "label": label}
        parts.append(pd.DataFrame(part | {name: t.reshape(-1).numpy() for name, t in slots.items()}))

    def dot(name: str) -> torch.Tensor:  # c_t · g (W_U[a] - W_U[b]) / rms_t  -> [batch]
        return (store[name] * direction).sum(-1)

    add("embed", None, dot("hook_embed"), "embed")
    for L in range(cfg.num_hidden_layers):
        add("attn", L, dot(f"blocks.{L}.hook_attn_out"), f"L{L} attn")
        if heads:  # z_h W_O[h] · direction, W_O [head d_head d_model]
            w_o = model.blocks[L].self_attn.W_O.detach().double().cpu()
            per_head = einsum(store[f"blocks.{L}.attn.hook_z"], w_o, direction, "b h d, h d m, b m -> b h")
            head = torch.arange(per_head.shape[1]).expand_as(per_head)
            add("head", L, per_head, [f"L{L} H{h}" for h in head.flatten().tolist()], head=head)
        if not cfg.is_moe_layer(L):
            add("mlp", L, dot(f"blocks.{L}.hook_mlp_out"), f"L{L} mlp")
            continue
        if cfg.moe_num_shared_experts:
            add("shared", L, dot(f"blocks.{L}.moe.hook_shared_out"), f"L{L} shared")
        out = store[f"blocks.{L}.moe.hook_expert_out"]  # [batch topk d_model]
        idx, w = store[f"blocks.{L}.moe.hook_topk_idx"].long(), store[f"blocks.{L}.moe.hook_topk_weights"]
        per_slot = w * (out * direction[:, None]).sum(-1)  # w_{t,e} * expert_out_{t,e} · direction
        labels = [f"L{L} E{e}" for e in idx.flatten().tolist()]
        slot = torch.arange(cfg.moe_k).expand(n_batch, cfg.moe_k)
        add("expert", L, per_slot, labels, slot=slot, expert=idx, weight=w)
    if model.lm_head.bias is not None:
        bias = model.lm_head.bias.detach().double().cpu()
        add("bias", None, bias[answer_t] - bias[distractor_t], "lm_head bias")
    frame = pd.concat(parts, ignore_index=True).reindex(columns=COLUMNS)
    frame = frame.astype({"layer": "Int64", "head": "Int64", "slot": "Int64", "expert": "Int64"})
    frame = frame.sort_values("batch", kind="stable", ignore_index=True)
    diff = final.gather(-1, answer_t[:, None]) - final.gather(-1, distractor_t[:, None])
    frame.attrs["logit_diff"] = diff[:, 0].tolist()
    return frame
