"""Routing records of an ERNIE 4.5 MoE model over a dataset, and the statistics of ANALYSES.md.

``collect_routing`` runs the model batch by batch and keeps, for every real token (padding
excluded), what each MoE layer's router did. The result is a :class:`Routing` of flat per-token
tensors; the statistics (``ernie_lab.routing_stats``) and plots (``ernie_lab.routing_plots``) take it
and are re-exported here, so ``el.routing.expert_load(r)`` works.

Axes: ``layer`` (MoE layers, in ``Routing.layers`` order), ``N`` (real tokens of the dataset, in
reading order: sequence by sequence, position by position), ``expert``, ``topk``.

Memory: ``probs`` is fp32 ``[layer N expert]`` on the CPU, 4 * layers * experts bytes per token
(27 * 64 * 4 = 7 KB per token for ERNIE-4.5-21B-A3B: 100k tokens need about 0.7 GB).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ernie_lab.routing_plots import plot_coactivation, plot_entropy_by_layer, plot_load_heatmap, plot_specialisation
from ernie_lab.routing_stats import (
    balance,
    bias_effect,
    coactivation,
    coactivation_matrix,
    domain_specialisation,
    expert_load,
    layer_summary,
    router_entropy,
    routing_agreement,
    shared_vs_routed,
    topk_confidence,
    vocab_specialisation,
)

__all__ = [
    "Routing",
    "collect_routing",
    "as_sequences",
    "iter_batches",
    "expert_load",
    "balance",
    "router_entropy",
    "layer_summary",
    "topk_confidence",
    "bias_effect",
    "coactivation",
    "coactivation_matrix",
    "domain_specialisation",
    "vocab_specialisation",
    "routing_agreement",
    "shared_vs_routed",
    "plot_load_heatmap",
    "plot_coactivation",
    "plot_specialisation",
    "plot_entropy_by_layer",
]


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
        """Position of MoE layer ``layer`` along the ``layer`` axis."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not recorded; recorded MoE layers: {self.layers}")
        return self.layers.index(layer)

    def __repr__(self) -> str:
        return (
            f"Routing({self.n_tokens} tokens, layers={self.layers}, experts={self.n_experts}, k={self.k}, "
            f"groups={'yes' if self.groups is not None else 'no'})"
        )


# --------------------------------------------------------------------------- inputs
def as_sequences(data: Any, tokenizer: Any = None) -> list[torch.Tensor]:
    """Normalise a dataset to a list of 1-D LongTensors of real tokens (padding removed).

    Accepts: a string or list of strings (needs ``tokenizer``; ``tokenizer(texts)`` must return
    ``input_ids`` and ``attention_mask``); a list of token-id lists / 1-D tensors; a 2-D tensor
    ``[batch pos]`` (every row real); a dict with ``input_ids`` and optional ``attention_mask``; or a
    list of such dicts (pre-tokenised batches, rows concatenated in order).
    """
    if isinstance(data, str):
        data = [data]
    if isinstance(data, Mapping):
        return _rows(data["input_ids"], data.get("attention_mask"))
    if isinstance(data, torch.Tensor):
        return _rows(data, None)
    data = list(data)
    if not data:
        raise ValueError("the dataset is empty")
    if all(isinstance(d, str) for d in data):
        if tokenizer is None:
            raise ValueError("texts need a tokenizer: pass tokenizer=el.load_tokenizer(...)")
        enc = tokenizer(data)
        return _rows(enc["input_ids"], enc.get("attention_mask"))
    if all(isinstance(d, Mapping) for d in data):
        return [row for batch in data for row in as_sequences(batch)]
    return _rows(data, None)


def _rows(ids: Any, mask: Any) -> list[torch.Tensor]:
    out = []
    for i, row in enumerate(ids):
        row = torch.as_tensor(row, dtype=torch.long).flatten()
        if mask is not None:
            row = row[torch.as_tensor(mask[i]).flatten().bool()]
        if row.numel() == 0:
            raise ValueError(f"sequence {i} of the dataset has no real tokens")
        out.append(row)
    return out


def iter_batches(
    sequences: Sequence[torch.Tensor], batch_size: int = 8, pad_id: int = 0
) -> Iterable[tuple[torch.Tensor, torch.Tensor, range]]:
    """Yield ``(input_ids [batch pos], attention_mask [batch pos], rows)`` left-padded batches.

    ``rows`` is the range of sequence indices the batch holds. Left padding keeps the last real token
    in the last column (as the tokenizer does).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, width - len(s) :] = s
            mask[i, width - len(s) :] = 1
        yield ids, mask, range(start, start + len(chunk))


def token_groups(groups: Sequence[Any] | None, lengths: Sequence[int]) -> np.ndarray | None:
    """Per-sequence labels repeated over each sequence's tokens: ``[sum(lengths)]`` (None -> None)."""
    if groups is None:
        return None
    groups = list(groups)
    if len(groups) != len(lengths):
        raise ValueError(f"groups has {len(groups)} labels but the dataset has {len(lengths)} sequences")
    return np.repeat(np.asarray(groups, dtype=object), np.asarray(lengths, dtype=np.int64))


# --------------------------------------------------------------------------- collection
class _StopForward(Exception):
    """Raised by the last router hook: nothing after the last MoE layer is needed."""


def collect_routing(
    model,
    batches_or_texts: Any,
    tokenizer: Any = None,
    batch_size: int = 8,
    groups: Sequence[Any] | None = None,
    progress: bool = True,
    fwd_hooks: Iterable[tuple[Any, Any]] = (),
) -> Routing:
    """Run ``model`` over a dataset and record every MoE layer's routing on the real tokens.

    Args:
        batches_or_texts: anything :func:`as_sequences` accepts (texts need ``tokenizer``).
        groups: one label per sequence (e.g. the domain of each prompt), copied to its tokens.
        fwd_hooks: extra hooks active during the runs (e.g. an ablation, to record its routing).

    Only the router points (``hook_router_probs``, ``hook_topk_idx``, ``hook_topk_weights``) are
    read, and per-token L2 norms of ``hook_routed_out`` / ``hook_shared_out`` and their cosine are
    computed inside the hooks, so no full activation is stored. Each forward pass stops after the
    last MoE layer. Returns a :class:`Routing` on the CPU.
    """
    layers = list(model.config.moe_layers)
    if not layers:
        raise ValueError("the model has no MoE layer")
    has_shared = model.config.moe_num_shared_experts > 0
    sequences = as_sequences(batches_or_texts, tokenizer)
    labels = token_groups(groups, [len(s) for s in sequences])
    pad_id = model.config.pad_token_id or 0
    parts: dict[str, list[list[torch.Tensor]]] = {
        k: [[] for _ in layers] for k in ("probs", "idx", "weights", "shared_norm", "routed_norm", "cosine")
    }
    state: dict[str, Any] = {}
    last = layers[-1]

    def keep(key: str, x: torch.Tensor, layer: int) -> None:
        real = state["real"].to(x.device)
        parts[key][layers.index(layer)].append(x[real].detach().cpu())

    def on_probs(x, hook):
        keep("probs", x.float(), hook.layer)

    def on_idx(x, hook):
        keep("idx", x, hook.layer)

    def on_weights(x, hook):
        keep("weights", x.float(), hook.layer)

    def on_routed(x, hook):
        state["routed"] = x
        if not has_shared:
            on_shared(torch.full_like(x, float("nan")), hook)

    def on_shared(x, hook):
        routed, shared = state.pop("routed").float(), x.float()
        keep("routed_norm", routed.norm(dim=-1), hook.layer)
        keep("shared_norm", shared.norm(dim=-1), hook.layer)
        keep("cosine", F.cosine_similarity(routed, shared, dim=-1), hook.layer)
        if hook.layer == last:
            raise _StopForward

    moe = "blocks.{}.moe.hook_"
    hooks = list(fwd_hooks)
    for L in layers:
        hooks += [(moe.format(L) + "router_probs", on_probs), (moe.format(L) + "topk_idx", on_idx)]
        hooks += [(moe.format(L) + "topk_weights", on_weights), (moe.format(L) + "routed_out", on_routed)]
        if has_shared:
            hooks.append((moe.format(L) + "shared_out", on_shared))
    n_batches = -(-len(sequences) // batch_size)
    with torch.no_grad(), model.hooks(hooks):
        for ids, mask, _ in tqdm(
            iter_batches(sequences, batch_size, pad_id), total=n_batches, disable=not progress, desc="routing"
        ):
            state["real"] = mask.bool()
            with contextlib.suppress(_StopForward):
                model(ids, attention_mask=mask)
    stacked = {k: torch.stack([torch.cat(p) for p in v]) for k, v in parts.items()}
    bias = torch.stack(
        [model.blocks[L].mlp.moe_statics.e_score_correction_bias.detach().float().cpu()[0] for L in layers]
    )
    lengths = torch.tensor([len(s) for s in sequences])
    seq = torch.repeat_interleave(torch.arange(len(sequences)), lengths)
    starts = lengths.cumsum(0) - lengths
    return Routing(
        layers=layers,
        probs=stacked["probs"],
        idx=stacked["idx"],
        weights=stacked["weights"],
        bias=bias,
        token_ids=torch.cat(sequences),
        seq=seq,
        pos=torch.arange(len(seq)) - starts[seq],
        groups=labels,
        shared_norm=stacked["shared_norm"],
        routed_norm=stacked["routed_norm"],
        cosine=stacked["cosine"],
    )
