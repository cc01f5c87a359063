"""The routing record: what the routers of an ERNIE 4.5 MoE model did on N real tokens.

Axes: ``layer`` (MoE layers, in ``Routing.layers`` order), ``N`` (real tokens of the dataset, in
reading order: sequence by sequence, position by position), ``expert``, ``topk``.

Memory: ``probs`` is fp32 ``[layer N expert]`` on the CPU, 4 * layers * experts bytes per token
(27 * 64 * 4 = 7 KB per token for ERNIE-4.5-21B-A3B: 100k tokens need about 0.7 GB).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ernie_lab.model.checks import as_int
from ernie_lab.model.checks import check_finite as _check_finite


@dataclass
class Routing:
    """What the routers did on N real tokens, per MoE layer (all tensors on the CPU).

    Required: ``layers`` (MoE layer indices), ``probs [layer N expert]`` (unbiased softmax, fp32) and
    ``idx [layer N topk]`` (selected experts). Omitted fields are filled in: ``weights`` as the
    renormalised probabilities of the selected experts, ``bias`` as zeros, ``token_ids`` as zeros,
    ``seq`` as zeros and ``pos`` as ``0..N-1`` (one sequence). So a hand-built Routing needs only
    layers, probs and idx.

    Fields:
        weights ``[layer N topk]`` mixing weights; bias ``[layer expert]`` the correction bias
        ``e_score_correction_bias``; token_ids ``[N]``; seq ``[N]`` index of the sequence in the
        dataset; pos ``[N]`` position among the sequence's real tokens; groups ``[N]`` label per
        token (domain, dataset, ...) or None; shared_norm / routed_norm / cosine ``[layer N]``:
        L2 norms of the shared and routed outputs and the cosine between them (None when not
        recorded; shared_norm and cosine are NaN for models without shared experts).

    ``check_finite`` (default True): NaN or inf in ``probs``, ``weights`` or ``routed_norm`` raises
    ``NonFiniteError`` naming the layer and hook point, so no statistic is computed on them.
    """

    layers: list[int]
    probs: torch.Tensor
    idx: torch.Tensor
    weights: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    seq: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    groups: np.ndarray | None = None
    shared_norm: torch.Tensor | None = None
    routed_norm: torch.Tensor | None = None
    cosine: torch.Tensor | None = None
    check_finite: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        self.layers = [int(L) for L in self.layers]
        self.probs = torch.as_tensor(self.probs, dtype=torch.float32)
        self.idx = torch.as_tensor(self.idx, dtype=torch.long)
        n_layer, n, n_expert = self.probs.shape if self.probs.ndim == 3 else (None, None, None)
        if n_layer is None or self.idx.ndim != 3 or self.idx.shape[:2] != (n_layer, n):
            raise ValueError(
                f"probs must be [layer N expert] and idx [layer N topk] with matching layer and N; got "
                f"{tuple(self.probs.shape)} and {tuple(self.idx.shape)}"
            )
        if len(self.layers) != n_layer:
            raise ValueError(f"{len(self.layers)} layers named but probs has {n_layer}")
        if n and (self.idx.min() < 0 or self.idx.max() >= n_expert):
            raise ValueError(f"idx holds experts outside [0, {n_expert})")
        if self.weights is None:
            w = self.probs.gather(-1, self.idx)
            self.weights = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
        if self.bias is None:
            self.bias = torch.zeros(n_layer, n_expert)
        if self.token_ids is None:
            self.token_ids = torch.zeros(n, dtype=torch.long)
        if self.seq is None:
            self.seq = torch.zeros(n, dtype=torch.long)
        if self.pos is None:
            self.pos = torch.arange(n)
        if self.groups is not None:
            self.groups = np.asarray(self.groups, dtype=object)
        for name, want in (("weights", self.idx.shape), ("bias", (n_layer, n_expert))):
            if tuple(getattr(self, name).shape) != tuple(want):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {tuple(want)}")
        for name in ("token_ids", "seq", "pos", "groups"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has length {len(value)}, expected N={n}")
        if self.check_finite:
            for name, point in (("probs", "router_probs"), ("weights", "topk_weights"), ("routed_norm", "routed_out")):
                if getattr(self, name) is not None:
                    where = f"Routing.{name}: blocks.{{layer}}.moe.hook_{point}"
                    _check_finite(getattr(self, name), where, self.layers, "check_finite=False")

    @property
    def n_tokens(self) -> int:
        return self.idx.shape[1]

    @property
    def n_experts(self) -> int:
        return self.probs.shape[2]

    @property
    def k(self) -> int:
        return self.idx.shape[2]

    def __len__(self) -> int:
        return self.n_tokens

    def layer_index(self, layer: int) -> int:
        """Position of MoE layer ``layer`` (an integer, never a float or string) along the ``layer`` axis."""
        layer = as_int(layer, "layer")
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not recorded; recorded MoE layers: {self.layers}")
        return self.layers.index(layer)

    def to_frame(self, tokenizer=None) -> pd.DataFrame:
        """One row per token x MoE layer x top-k slot, in reading order then layer then slot.

        Columns: seq (sequence in the dataset), pos (position among its real tokens), token_id,
        token (readable text via ``tokenizer.convert_ids_to_tokens`` when a tokenizer is given, e.g.
        ``model.tokenizer``; else None), group (when recorded), layer, slot (0 = highest weight),
        expert, weight (mixing weight) and prob (the router's unbiased probability of that expert).
        """
        n_layer, n, k = self.idx.shape
        order = (n, n_layer, k)  # token-major: reading order, then layer, then slot

        def per_token(values) -> np.ndarray:
            return np.repeat(np.asarray(values), n_layer * k)

        frame = {
            "seq": per_token(self.seq.numpy()),
            "pos": per_token(self.pos.numpy()),
            "token_id": per_token(self.token_ids.numpy()),
            "token": per_token(tokenizer.convert_ids_to_tokens(self.token_ids) if tokenizer else [None] * n),
        }
        if self.groups is not None:
            frame["group"] = per_token(self.groups)
        frame["layer"] = np.broadcast_to(np.asarray(self.layers)[None, :, None], order).reshape(-1)
        frame["slot"] = np.broadcast_to(np.arange(k)[None, None, :], order).reshape(-1)
        frame["expert"] = self.idx.permute(1, 0, 2).reshape(-1).numpy()
        frame["weight"] = self.weights.permute(1, 0, 2).reshape(-1).float().numpy()
        frame["prob"] = self.probs.gather(-1, self.idx).permute(1, 0, 2).reshape(-1).numpy()
        return pd.DataFrame(frame)

    def __repr__(self) -> str:
        return (
            f"Routing({self.n_tokens} tokens, layers={self.layers}, experts={self.n_experts}, k={self.k}, "
            f"groups={'yes' if self.groups is not None else 'no'})"
        )
