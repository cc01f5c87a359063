"""Collect routing records of an ERNIE 4.5 MoE model over a dataset.

``collect_routing`` runs the model batch by batch and keeps, for every real token (padding
excluded), what each MoE layer's router did. The result is a :class:`~ernie_lab.routing.record.Routing`
of flat per-token tensors, which the statistics (``routing/stats.py``) and plots (``routing/plots.py``)
take.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ernie_lab.distributed.data import data_split
from ernie_lab.io.datasets import as_sequences, check_batch_size, iter_batches, token_groups
from ernie_lab.model.checks import check_finite as _check_finite
from ernie_lab.routing.record import Routing


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
    data_parallel: bool | None = None,
    check_finite: bool = True,
) -> Routing:
    """Run ``model`` over a dataset and record every MoE layer's routing on the real tokens.

    Args:
        batches_or_texts: anything :func:`as_sequences` accepts (texts need ``tokenizer``).
        groups: one label per sequence (e.g. the domain of each prompt), copied to its tokens.
        fwd_hooks: extra hooks active during the runs (e.g. an ablation, to record its routing).
        data_parallel: split the sequences over the processes of a process group and combine the
            records on every process (see :func:`ernie_lab.distributed.data_split`; None = when a
            group is up and the model is not tensor-parallel).
        check_finite: NaN or inf at a router point or in the routed/shared output of a real token
            raises ``NonFiniteError`` naming the layer and hook point, at the batch where it
            appears (False records them as they are).

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

    def finite(x: torch.Tensor, hook) -> torch.Tensor:
        if check_finite:
            _check_finite(x[state["real"].to(x.device)], f"{hook.name} (layer {hook.layer}), collect_routing")
        return x

    def on_probs(x, hook):
        keep("probs", finite(x, hook).float(), hook.layer)

    def on_idx(x, hook):
        keep("idx", x, hook.layer)

    def on_weights(x, hook):
        keep("weights", finite(x, hook).float(), hook.layer)

    def on_routed(x, hook):
        state["routed"] = finite(x, hook)
        if not has_shared:
            on_shared(torch.full_like(x, float("nan")), hook)

    def on_shared(x, hook):
        if has_shared:
            finite(x, hook)
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
    check_batch_size(batch_size)
    split = data_split(model, data_parallel)
    mine = sequences[split.part(len(sequences))] if split else sequences
    n_batches = -(-len(mine) // batch_size)
    with torch.no_grad(), model.hooks(hooks):
        for ids, mask, _ in tqdm(
            iter_batches(mine, batch_size, pad_id), total=n_batches, disable=not progress, desc="routing"
        ):
            state["real"] = mask.bool()
            with contextlib.suppress(_StopForward):
                model(ids, attention_mask=mask)
    if split:
        parts = split.concat_lists(parts)
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
        check_finite=check_finite,
    )
