"""Expert ablation and direct logit attribution (README, Definitions: "Expert ablation").

The ablations themselves are hooks from ``ernie_lab.interventions`` (zero / reroute / mean); this
module measures what they do to the loss on a dataset: ``Δloss = mean NLL(ablated) - mean NLL(base)``
over predicted tokens and ``KL(p_base || p_ablated)`` per position, overall and per token group; the
importance of each expert alone; pruning curves; and the direct logit attribution of every expert
slot, attention layer and shared expert.

Datasets are anything ``ernie_lab.io.datasets.as_sequences`` accepts (token-id lists or tensors, a 2-D
tensor, tokenizer batches; texts with ``tokenizer=``). Predicted tokens are the pairs (t, t+1) with
both tokens real: padding is never a context nor a target.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ernie_lab.distributed.data import data_split
from ernie_lab.interventions import (
    expert_mean_outputs,
    mean_ablate_experts,
    reroute_ablate_experts,
    zero_ablate_experts,
)
from ernie_lab.io.datasets import as_sequences, check_batch_size, iter_batches
from ernie_lab.model.checks import as_ints, expert_map, moe_layer, moe_layers
from ernie_lab.routing import collect_routing, expert_load

__all__ = [
    "token_nll",
    "ablation_hooks",
    "ablation_effect",
    "expert_importance",
    "pruning_curve",
]

MODES = ("zero", "reroute", "mean")


# --------------------------------------------------------------------------- per-token loss
def _log_probs(model, input_ids, attention_mask, fwd_hooks) -> torch.Tensor:
    """fp32 log-softmax of the logits ``[batch pos vocab]`` (no autograd)."""
    with torch.no_grad(), model.hooks(list(fwd_hooks)):
        return model(input_ids, attention_mask=attention_mask).float().log_softmax(-1)


def token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, fwd_hooks=()) -> torch.Tensor:
    """Next-token NLL ``[batch pos-1]``: entry t is ``-log p(x_{t+1} | x_{<=t})``.

    NaN where token t or t+1 is padding (``attention_mask`` 0). ``fwd_hooks`` are active for the run.
    """
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    logp = _log_probs(model, input_ids, attention_mask, fwd_hooks)[:, :-1]
    targets = input_ids[:, 1:].to(logp.device)
    nll = -logp.gather(-1, targets[..., None])[..., 0]
    if attention_mask is not None:
        real = attention_mask.to(nll.device).bool()
        nll = nll.masked_fill(~(real[:, :-1] & real[:, 1:]), float("nan"))
    return nll


# --------------------------------------------------------------------------- ablation hooks
def ablation_hooks(model, experts: Mapping[int, Iterable[int]], mode: str = "zero", means=None) -> list:
    """Hooks ablating ``experts`` ({layer: [expert, ...]}) with ``mode`` zero | reroute | mean.

    ``means`` ({(layer, expert): Tensor [d_model]}, from ``interventions.expert_mean_outputs``) is
    required for mean ablation.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    experts = {L: es for L, es in expert_map(model.config, experts).items() if es}
    if not experts:
        return []
    if mode == "zero":
        return zero_ablate_experts(model, experts)
    if mode == "reroute":
        return reroute_ablate_experts(model, experts)
    if means is None:
        raise ValueError("mode='mean' needs the experts' mean outputs (means=...)")
    missing = [(L, e) for L, es in experts.items() for e in es if (L, e) not in means]
    if missing:
        raise KeyError(f"means has no entry for (layer, expert) {missing}")
    return mean_ablate_experts(model, {(L, e): means[(L, e)] for L, es in experts.items() for e in es})
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _mean_outputs(model, reference: Any, experts: Mapping[int, Iterable[int]], tokenizer: Any, batch_size: int) -> dict:
    """Mean output ``[d_model]`` of each expert where it is selected on the reference set.

    Runs ``interventions.expert_mean_outputs`` batch by batch and combines the batch means weighted by
    the expert's selections in each batch (counted by a ``hook_topk_idx`` hook on the same run). An
    expert never selected anywhere gets that function's fallback, its output averaged over all tokens.
    """
    experts = {L: es for L, es in expert_map(model.config, experts).items() if es}
    if not experts:
        return {}
    sequences = as_sequences(reference, tokenizer)
    layers = sorted(experts)
    counts = torch.zeros(len(layers), model.config.moe_num_experts, dtype=torch.float64)
    real: dict[str, torch.Tensor] = {}

    def count(idx: torch.Tensor, hook) -> None:  # selections per expert on real tokens of this batch
        flat = idx[real["mask"].to(idx.device)].flatten().cpu()
        counts[layers.index(hook.layer)] += torch.bincount(flat, minlength=counts.shape[1])

    hooks = [(f"blocks.{L}.moe.hook_topk_idx", count) for L in layers]
    selected: dict[tuple[int, int], list] = {}  # (sum of n * mean, n) over batches where selected
    fallback: dict[tuple[int, int], list] = {}  # the same with n = real tokens, where not selected
    for ids, mask, _ in iter_batches(sequences, batch_size, model.config.pad_token_id or 0):
        counts.zero_()
        real["mask"] = mask.bool()
        with model.hooks(hooks):
            means = expert_mean_outputs(model, ids, experts, attention_mask=mask)
        for (L, e), mean in means.items():
            n = float(counts[layers.index(L), e])
            target, weight = (selected, n) if n > 0 else (fallback, float(mask.sum()))
            total = target.setdefault((L, e), [0.0, 0.0])
            total[0], total[1] = total[0] + weight * mean.double(), total[1] + weight
    out = {}
    for key in sorted(selected.keys() | fallback.keys()):
        total, n = selected.get(key) or fallback[key]
        out[key] = (total / n).float()
    return out


# --------------------------------------------------------------------------- dataset loop
def _predicted_log_probs(model, ids, mask, valid, hooks) -> torch.Tensor:
    """Log-probs ``[n vocab]`` at the predicted positions ``valid [batch pos-1]``, on the model's device."""
    logp = _log_probs(model, ids, mask, hooks)[:, :-1]
    return logp[valid.to(logp.device)]


def _run_ablations(
    model,
    sequences: Sequence[torch.Tensor],
    seq_group: torch.Tensor,
    n_group: int,
    hook_sets: Sequence[list],
    batch_size: int,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Sums over predicted tokens, per group: ``count [group]``, ``base [group]`` (NLL),
    ``ablated [ablation group]`` (NLL) and ``kl [ablation group]``. One base run per batch is shared by
    every ablation; an empty hook list reuses it (so n = 0 ablated experts gives exactly the base).
    Under a process group with a whole model per process, each process takes a block of the
    sequences and the sums are added over processes (:func:`ernie_lab.distributed.data_split`)."""
    split = data_split(model)
    if split:
        part = split.part(len(sequences))
        sequences, seq_group = sequences[part], seq_group[part]
    sums = {
        "count": torch.zeros(n_group, dtype=torch.float64),
        "base": torch.zeros(n_group, dtype=torch.float64),
        "ablated": torch.zeros(len(hook_sets), n_group, dtype=torch.float64),
        "kl": torch.zeros(len(hook_sets), n_group, dtype=torch.float64),
    }

    def add(key: str, values: torch.Tensor, group: torch.Tensor, a: int | None = None) -> None:
        totals = torch.bincount(group, weights=values.double().cpu(), minlength=n_group)
        if a is None:
            sums[key] += totals
        else:
            sums[key][a] += totals

    check_batch_size(batch_size)
    n_batches = -(-len(sequences) // batch_size)
    batches = iter_batches(sequences, batch_size, model.config.pad_token_id or 0)
    for ids, mask, rows in tqdm(batches, total=n_batches, disable=not progress, desc="ablation"):
        real = mask.bool()
        valid = real[:, :-1] & real[:, 1:]  # predicted positions: context and target both real
        group = seq_group[list(rows)][:, None].expand_as(valid)[valid]
        base = _predicted_log_probs(model, ids, mask, valid, ())
        targets = ids[:, 1:][valid].to(base.device)[:, None]
        sums["count"] += torch.bincount(group, minlength=n_group)
        add("base", -base.gather(-1, targets)[:, 0], group)
        p_base = base.exp()
        for a, hooks in enumerate(hook_sets):
            logp = _predicted_log_probs(model, ids, mask, valid, hooks) if hooks else base
            add("ablated", -logp.gather(-1, targets)[:, 0], group, a)
            add("kl", (p_base * (base - logp)).sum(-1), group, a)  # KL(p_base || p_ablated) per position
    if split:
        sums = split.sum(sums)
    if sums["count"].sum() == 0:
        raise ValueError("the dataset has no predicted token (every sequence needs >= 2 real tokens)")
    return sums


def _groups(sequences, groups) -> tuple[torch.Tensor, list[Any]]:
    """Group code per sequence and the group names (one group "all" when ``groups`` is None)."""
    if groups is None:
        return torch.zeros(len(sequences), dtype=torch.long), []
    groups = list(groups)
    if len(groups) != len(sequences):
        raise ValueError(f"groups has {len(groups)} labels but the dataset has {len(sequences)} sequences")
    codes, names = pd.factorize(pd.Series(groups, dtype=object), sort=True)
    return torch.as_tensor(codes, dtype=torch.long), list(names)


def ablation_effect(
    model,
    dataset_ids: Any,
    experts: Mapping[int, Iterable[int]],
    mode: str = "zero",
    groups: Sequence[Any] | None = None,
    reference_ids: Any = None,
    batch_size: int = 8,
    *,
    tokenizer: Any = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Effect of ablating ``experts`` ({layer: [expert, ...]}) together on a dataset.

    ``mode``: zero | reroute | mean (mean outputs over ``reference_ids``, default the dataset itself).
    ``groups``: one label per sequence; the result has a row ``group="all"`` and one per label.
    Columns: group, n_tokens, nll_base, nll_ablated, delta_loss (= nll_ablated - nll_base, mean NLL
    per predicted token), kl (mean KL(p_base || p_ablated) over the same positions), mode, experts.
    """
    experts = expert_map(model.config, experts)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_batch_size(batch_size)
    sequences = as_sequences(dataset_ids, tokenizer)
    means = None
    if mode == "mean":
        means = _mean_outputs(
            model, dataset_ids if reference_ids is None else reference_ids, experts, tokenizer, batch_size
        )
    hooks = ablation_hooks(model, experts, mode, means)
    codes, names = _groups(sequences, groups)
    sums = _run_ablations(model, sequences, codes, max(len(names), 1), [hooks], batch_size, progress)
    # row 0: every predicted token; then one row per group (none without groups)
    per_group = slice(0, 1 + len(names))
    count = torch.cat([sums["count"].sum(0, keepdim=True), sums["count"]])[per_group]
    base = torch.cat([sums["base"].sum(0, keepdim=True), sums["base"]])[per_group] / count
    ablated = torch.cat([sums["ablated"][0].sum(0, keepdim=True), sums["ablated"][0]])[per_group] / count
    kl = torch.cat([sums["kl"][0].sum(0, keepdim=True), sums["kl"][0]])[per_group] / count
    label = "; ".join(f"L{L}: {sorted(int(e) for e in es)}" for L, es in sorted(experts.items()))
    frame = pd.DataFrame(
        {
            "group": ["all", *names],
            "n_tokens": count.numpy().astype("int64"),
            "nll_base": base.numpy(),
            "nll_ablated": ablated.numpy(),
            "delta_loss": (ablated - base).numpy(),
            "kl": kl.numpy(),
        }
    )
    return frame.assign(mode=mode, experts=label)


def expert_importance(
    model,
    dataset: Any,
    layers: Iterable[int] | None = None,
    mode: str = "zero",
    *,
    reference_ids: Any = None,
    tokenizer: Any = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Ablate each expert of each MoE layer alone; a ranked importance table per layer.

    Columns: layer, expert, rank (1 = largest Δloss in its layer), delta_loss, kl, load (fraction of
    routing slots on the dataset's real tokens, un-ablated), nll_base, nll_ablated, n_tokens, mode.
    Costs one base pass plus one pass per (layer, expert) for every batch.
    """
    cfg = model.config
    layers = list(cfg.moe_layers) if layers is None else moe_layers(cfg, layers)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_batch_size(batch_size)
    sequences = as_sequences(dataset, tokenizer)
    pairs = [(L, e) for L in layers for e in range(cfg.moe_num_experts)]
    means = None
    if mode == "mean":
        all_experts = {L: range(cfg.moe_num_experts) for L in layers}
        means = _mean_outputs(
            model, dataset if reference_ids is None else reference_ids, all_experts, tokenizer, batch_size
        )
    hook_sets = [ablation_hooks(model, {L: [e]}, mode, means) for L, e in pairs]
    codes, _ = _groups(sequences, None)
    sums = _run_ablations(model, sequences, codes, 1, hook_sets, batch_size, progress)
    n = sums["count"][0]
    load = expert_load(collect_routing(model, sequences, batch_size=batch_size, progress=False))
    frame = pd.DataFrame(
        {
            "layer": [L for L, _ in pairs],
            "expert": [e for _, e in pairs],
            "delta_loss": ((sums["ablated"][:, 0] - sums["base"][0]) / n).numpy(),
            "kl": (sums["kl"][:, 0] / n).numpy(),
            "nll_base": float(sums["base"][0] / n),
            "nll_ablated": (sums["ablated"][:, 0] / n).numpy(),
            "n_tokens": int(n),
            "mode": mode,
        }
    )
    frame = frame.merge(load[["layer", "expert", "load"]], on=["layer", "expert"], how="left")
    frame["rank"] = frame.groupby("layer")["delta_loss"].rank(ascending=False, method="first").astype("int64")
    columns = ["layer", "expert", "rank", "delta_loss", "kl", "load", "nll_base", "nll_ablated", "n_tokens", "mode"]
    return frame.sort_values(["layer", "rank"], ignore_index=True)[columns]


def pruning_curve(
    model,
    dataset: Any,
    layer: int,
    order_by: str = "importance",
    steps: Iterable[int] | None = None,
    mode: str = "zero",
    *,
    importance: pd.DataFrame | None = None,
    reference_ids: Any = None,
    tokenizer: Any = None,
    batch_size: int = 8,
    progress: bool = True,
) -> pd.DataFrame:
    """Loss as the n least important experts of ``layer`` are ablated together, n in ``steps``.

    ``order_by``: "importance" (ascending Δloss from ``importance``, an ``expert_importance`` frame,
    computed when not given) or "load" (ascending load). ``steps`` default to n = 0..E for zero and
    mean ablation, and n = 0..E-k for reroute ablation: rerouting needs k experts left to choose
    from. n = 0 is the un-ablated model (its loss is the base loss).
    Columns: layer, order_by, mode, n_ablated, frac_ablated (n/E), loss, delta_loss, kl, ablated.
    """
    cfg = model.config
    n_expert = cfg.moe_num_experts
    layer = moe_layer(cfg, layer)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    max_n = n_expert - cfg.moe_k if mode == "reroute" else n_expert
    what = f"steps (for mode={mode!r}, E={n_expert}, k={cfg.moe_k})"
    steps = list(range(max_n + 1)) if steps is None else as_ints(steps, what, 0, max_n + 1)
    check_batch_size(batch_size)
    sequences = as_sequences(dataset, tokenizer)
    if order_by == "importance":
        if importance is None:
            importance = expert_importance(
                model, sequences, [layer], mode, reference_ids=reference_ids, batch_size=batch_size, progress=progress
            )
        table = importance[importance["layer"] == layer].sort_values(["delta_loss", "expert"])
    elif order_by == "load":
        table = expert_load(collect_routing(model, sequences, batch_size=batch_size, progress=False))
        table = table[table["layer"] == layer].sort_values(["load", "expert"])
    else:
        raise ValueError(f"order_by must be 'importance' or 'load', got {order_by!r}")
    order = [int(e) for e in table["expert"]]
    if sorted(order) != list(range(n_expert)):
        raise ValueError(f"the ordering table does not list each of the {n_expert} experts of layer {layer} once")
    means = None
    if mode == "mean":
        means = _mean_outputs(
            model, dataset if reference_ids is None else reference_ids, {layer: order}, tokenizer, batch_size
        )
    hook_sets = [ablation_hooks(model, {layer: order[:n]}, mode, means) for n in steps]
    codes, _ = _groups(sequences, None)
    sums = _run_ablations(model, sequences, codes, 1, hook_sets, batch_size, progress)
    count = sums["count"][0]
    loss = sums["ablated"][:, 0] / count
    return pd.DataFrame(
        {
            "layer": layer,
            "order_by": order_by,
            "mode": mode,
            "n_ablated": steps,
            "frac_ablated": [n / n_expert for n in steps],
            "loss": loss.numpy(),
            "delta_loss": (loss - sums["base"][0] / count).numpy(),
            "kl": (sums["kl"][:, 0] / count).numpy(),
            "ablated": [str(order[:n]) for n in steps],
        }
    )
