"""The residual stream as a stack: accumulated and decomposed, normed, projected on token directions.

TransformerLens' ``ActivationCache`` methods under the same names and arguments, for ERNIE 4.5 MoE:

- ``accumulated_resid``: ``blocks.{l}.hook_resid_pre`` for each layer up to ``layer`` (``resid_mid``
  too with ``incl_mid``) and the final residual (``final_post``), the stack the logit lens reads;
- ``decompose_resid``: ``embed``, each attention output and each MLP output, a MoE layer's split
  into ``shared_out`` + ``routed_out`` (or, with ``per_expert=True``, one row per routed expert:
  ``sum over slots of w_{t,e} * expert_out_{t,e}``), so the rows sum to the residual;
- ``apply_ln_to_stack``: a layer's RMSNorm with the scale frozen from the cached run,
  ``g * c / sqrt(mean(resid^2) + eps)``, so it is linear in the stack and the normed rows of a
  decomposition still sum to the normed residual;
- ``logit_attrs``: the normed stack dotted with ``W_U[:, token]`` (minus ``W_U[:, incorrect]``).

Deliberately different from TransformerLens: ERNIE has no ``hook_scale`` point, so the frozen scale
is recomputed from the cached residual that the norm read (the same number); and no norm weight is
folded into ``W_U``: ``apply_ln_to_stack`` multiplies by the norm weight ``g``, so ``normed @ W_U``
is the model's logits (without the ``lm_head`` bias, as TransformerLens leaves out ``b_U``).

Axes: component batch pos d_model (glossary in model/ernie.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import einsum

PosSlice = None | int | slice | Sequence[int] | torch.Tensor


class MissingModelError(RuntimeError):
    """A cache method needs the model's weights and this cache has none."""


def slice_axis(t: torch.Tensor, index: PosSlice, dim: int) -> torch.Tensor:
    """``t`` indexed on ``dim`` by None (all), an int (the axis is dropped), a slice or a list of ints."""
    if index is None:
        return t
    if isinstance(index, int):
        return t.select(dim, index)
    if isinstance(index, slice):
        return t[(slice(None),) * (dim % t.ndim) + (index,)]
    if isinstance(index, torch.Tensor | list | tuple):
        return t.index_select(dim, torch.as_tensor(index, dtype=torch.long, device=t.device).reshape(-1))
    raise TypeError(f"a position/batch slice must be None, an int, a slice or a list of ints, got {index!r}")


class ResidStack:
    """Residual-stream methods mixed into :class:`~ernie_lab.model.cache.ActivationCache`."""

    model = None  # the host sets it; the host also provides __getitem__, __contains__, __iter__

    def _model(self, what: str):
        if self.model is None:
            raise MissingModelError(
                f"{what} needs the model's weights and this cache has no model: use a cache from "
                "model.run_with_cache, or ActivationCache.load(path, model=model)"
            )
        return self.model

    def _n_layers(self) -> int:
        if self.model is not None:
            return self.model.config.num_hidden_layers
        layers = [int(n.split(".")[1]) for n in self if n.startswith("blocks.")]
        if not layers:
            raise KeyError("this cache holds no blocks.* entries")
        return max(layers) + 1

    def _layer(self, layer: int | None) -> int:
        n = self._n_layers()
        if layer is None or layer == -1:
            return n
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise ValueError(f"layer must be an int in [0, {n}] (or None / -1 for the final residual), got {layer!r}")
        return layer

    def _is_moe(self, layer: int) -> bool:
        if self.model is not None:
            return self.model.config.is_moe_layer(layer)
        return f"blocks.{layer}.moe.hook_routed_out" in self

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ):
        """The residual stream at the input of each layer up to ``layer``: ``[component batch pos d_model]``.

        Rows: ``{l}_pre`` for ``l < layer`` (``{l}_mid`` after each with ``incl_mid``; and for
        ``l == layer`` with ``mlp_input``), then ``final_post`` when ``layer`` is None, -1 or
        ``num_hidden_layers``. ``apply_ln``: through the norm that reads ``layer`` — the final norm
        normalises each row by its own statistics (the logit lens, as TransformerLens'
        ``recompute_ln``), so ``accumulated_resid(apply_ln=True)[-1] @ W_U`` is the model's logits;
        an inner layer's norm uses the cached scale. ``pos_slice``: an int (drops the pos axis), a
        slice or a list of positions. ``return_labels`` returns ``(stack, labels)``.
        """
        n, layer = self._n_layers(), self._layer(layer)
        names, labels = [], []
        for i in range(layer + 1):
            if i == n:
                names.append(f"blocks.{n - 1}.hook_resid_post")
                labels.append("final_post")
                continue
            names.append(f"blocks.{i}.hook_resid_pre")
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                names.append(f"blocks.{i}.hook_resid_mid")
                labels.append(f"{i}_mid")
        stack = torch.stack([slice_axis(self[name], pos_slice, 1) for name in names])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice, recompute_ln=layer == n)
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: PosSlice = None,
        incl_embeds: bool = True,
        per_expert: bool = False,
        return_labels: bool = False,
    ):
        """The residual stream at the input of ``layer`` as the sum of what wrote it: ``[component batch pos d_model]``.

        Rows: ``embed``; per layer ``l < layer``: ``{l}_attn_out``, then ``{l}_mlp_out`` (dense)
        or ``{l}_shared_out`` + ``{l}_routed_out`` (MoE; with ``per_expert=True`` ``{l}_E{e}`` for
        every routed expert instead of ``routed_out``, zero where the expert was not selected; needs
        ``hook_expert_out`` in the cache); with ``mlp_input`` also ``{layer}_attn_out``. ``mode``:
        ``"all"``, ``"attn"`` or ``"mlp"`` keeps those rows. Summed over rows (mode ``"all"``, with
        embeds) the stack equals ``resid_pre`` of ``layer`` (``resid_mid`` with ``mlp_input``,
        the final residual for None). ``apply_ln`` uses the cached scale (:meth:`apply_ln_to_stack`).
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._layer(layer)
        parts: list[tuple[str, torch.Tensor]] = []
        if incl_embeds:
            parts.append(("embed", self["hook_embed"]))
        for L in range(layer):
            if mode != "mlp":
                parts.append((f"{L}_attn_out", self[f"blocks.{L}.hook_attn_out"]))
            if mode != "attn":
                parts += self._mlp_parts(L, per_expert)
        if mlp_input and mode != "mlp" and layer < self._n_layers():
            parts.append((f"{layer}_attn_out", self[f"blocks.{layer}.hook_attn_out"]))
        if not parts:
            raise ValueError(
                f"decompose_resid(layer={layer}, mode={mode!r}, incl_embeds={incl_embeds}) selects no rows"
            )
        labels = [label for label, _ in parts]
        stack = torch.stack([slice_axis(t, pos_slice, 1) for _, t in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _mlp_parts(self, L: int, per_expert: bool) -> list[tuple[str, torch.Tensor]]:
        if not self._is_moe(L):
            return [(f"{L}_mlp_out", self[f"blocks.{L}.hook_mlp_out"])]
        prefix = f"blocks.{L}.moe."
        parts = [(f"{L}_shared_out", self[prefix + "hook_shared_out"])] if prefix + "hook_shared_out" in self else []
        if not per_expert:
            return parts + [(f"{L}_routed_out", self[prefix + "hook_routed_out"])]
        out, idx = self[prefix + "hook_expert_out"], self[prefix + "hook_topk_idx"]
        weights = self[prefix + "hook_topk_weights"].to(out.dtype)
        n_expert = self.model.config.moe_num_experts if self.model is not None else int(idx.max()) + 1
        chosen = F.one_hot(idx.long(), n_expert).to(out.dtype)  # [batch pos topk expert]
        per = einsum(chosen, weights, out, "b p k e, b p k, b p k d -> e b p d")
        return parts + [(f"{L}_E{e}", per[e]) for e in range(n_expert)]

    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: PosSlice = None,
        batch_slice: PosSlice = None,
        recompute_ln: bool = False,
    ) -> torch.Tensor:
        """``residual_stack [component batch pos d_model]`` (any leading axes) through the RMSNorm
        that reads ``layer``: the final norm for None / -1 / ``num_hidden_layers``, else the layer's
        input norm (its post-attention norm with ``mlp_input``).

        Each row is divided by the scale the model used, ``sqrt(mean(resid^2) + eps)`` of the cached
        residual that norm read (so the result is linear in the stack), and multiplied by the norm
        weight. ``pos_slice``/``batch_slice``: the slices already applied to the stack, applied to the
        scale too. ``recompute_ln``: each row normalised by its own statistics instead (the logit lens).
        """
        model = self._model("apply_ln_to_stack")
        n, layer = self._n_layers(), self._layer(layer)
        if layer == n:
            norm, source = model.model.norm, f"blocks.{n - 1}.hook_resid_post"
        elif mlp_input:
            norm, source = model.blocks[layer].post_attention_layernorm, f"blocks.{layer}.hook_resid_mid"
        else:
            norm, source = model.blocks[layer].input_layernorm, f"blocks.{layer}.hook_resid_pre"
        x = residual_stack.float()
        stats = x if recompute_ln else slice_axis(slice_axis(self[source], pos_slice, 1), batch_slice, 0).float()
        if not recompute_ln and stats.shape != x.shape[-stats.ndim :]:
            raise ValueError(
                f"the stack's trailing shape {tuple(x.shape[1:])} does not match the cached {source} "
                f"{tuple(stats.shape)}: pass the pos_slice/batch_slice that made the stack"
            )
        # the model's RMSNorm arithmetic: fp32 sum of squares / width + eps, rsqrt, cast, times g
        var = (stats * stats).sum(-1, keepdim=True) / stats.shape[-1] + norm.eps
        normed = (x * var.rsqrt()).to(residual_stack.dtype)
        return norm.weight.detach().to(device=normed.device) * normed

    def logit_attrs(
        self,
        residual_stack: torch.Tensor,
        tokens: int | str | torch.Tensor,
        incorrect_tokens: int | str | torch.Tensor | None = None,
        pos_slice: PosSlice = None,
        batch_slice: PosSlice = None,
    ) -> torch.Tensor:
        """Each row's direct contribution to the logit of ``tokens`` (minus ``incorrect_tokens``):
        ``apply_ln_to_stack(residual_stack) · W_U[:, tokens]`` -> ``[component batch pos]``.

        ``tokens``: a token id, a string that is one token (needs ``model.tokenizer``), or a tensor
        ``[]``, ``[batch]`` (one per row, over every position) or ``[batch pos]``. The
        ``lm_head`` bias is left out. Summed over a full :meth:`decompose_resid` the result is the
        logit (difference) the model computed, minus the bias.
        """
        model = self._model("logit_attrs")
        directions = model.tokens_to_residual_directions(tokens).detach()
        if incorrect_tokens is not None:
            wrong = model.tokens_to_residual_directions(incorrect_tokens).detach()
            if wrong.shape != directions.shape:
                raise ValueError(
                    f"tokens and incorrect_tokens must have the same shape, got {tuple(directions.shape[:-1])} "
                    f"and {tuple(wrong.shape[:-1])}"
                )
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice)
        if scaled.ndim == 4 and directions.ndim == 2 and directions.shape[0] == scaled.shape[1]:
            directions = directions[:, None]  # one token per batch row: the same at every position
        return (scaled * directions.to(scaled.device, scaled.dtype)).sum(-1)
