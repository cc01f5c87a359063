"""The machinery under the ablation analyses: per-token NLL, ablation hooks, expert mean outputs and the
dataset loop that stores **per-sequence** sums, so every effect, its bootstrap interval over sequences
(:mod:`ernie_lab.noise`) and its held-out half come from one pass per ablation, never a re-run.

Predicted tokens are the pairs (t, t+1) with both tokens real: padding is never a context nor a target.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
from ernie_lab.model.checks import expert_map
from ernie_lab.model.hook_points import first_edited_layer

__all__ = ["MODES", "token_nll", "ablation_hooks", "mean_outputs", "PerSequence", "run_per_sequence"]

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


def mean_outputs(model, reference: Any, experts: Mapping[int, Iterable[int]], tokenizer: Any, batch_size: int) -> dict:
    """Mean output ``[d_model]`` of each expert where it is selected on the reference set.

    Runs ``interventions.expert_mean_outputs`` batch by batch and combines the batch means weighted by
    the expert's selections in each batch (counted by a ``hook_topk_idx`` hook on the same run). An
    expert never selected anywhere gets that function's fallback, its output averaged over all tokens.
    """
    experts = {int(L): list(es) for L, es in experts.items() if len(list(es))}
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
def _predicted_log_probs(model, ids, mask, valid, hooks, start: int = 0, resid=None) -> torch.Tensor:
    """Log-probs ``[n vocab]`` at the predicted positions ``valid [batch pos-1]``, on the model's device;
    with ``start`` > 0, only blocks ``start..`` run, from ``resid`` (``model.forward_from``)."""
    if start:
        with torch.no_grad(), model.hooks(list(hooks)):
            logp = model.forward_from(start, resid, ids, mask).float().log_softmax(-1)[:, :-1]
    else:
        logp = _log_probs(model, ids, mask, hooks)[:, :-1]
    return logp[valid.to(logp.device)]


@dataclass(frozen=True)
class PerSequence:
    """Sums over each sequence's predicted tokens (float64, CPU): ``count [seq]``, ``base [seq]`` (NLL of
    the un-ablated model), ``ablated [ablation seq]`` (NLL) and ``kl [ablation seq]`` (KL(p_base ||
    p_ablated)); ``selected [layer expert]`` counts routing slots on all real tokens of the base run for
    the layers asked (``load = selected / (real tokens * k)``), ``real_tokens`` their number."""

    count: torch.Tensor
    base: torch.Tensor
    ablated: torch.Tensor
    kl: torch.Tensor
    selected: torch.Tensor
    real_tokens: int


def run_per_sequence(
    model,
    sequences: Sequence[torch.Tensor],
    hook_sets: Sequence[list],
    batch_size: int,
    progress: bool,
    load_layers: Sequence[int] = (),
    rows: Sequence[int] | None = None,
) -> PerSequence:
    """One base run per batch shared by every hook set (an empty hook list reuses it, so ablating no
    expert gives exactly the base), per-sequence sums of :class:`PerSequence`. ``rows``: run only these
    sequences (the others keep zero sums). Under a process group with a whole model per process, each
    process takes a block of the sequences and the sums are added over processes
    (:func:`ernie_lab.distributed.data_split`)."""
    check_batch_size(batch_size)
    n_seq, load_layers = len(sequences), [int(L) for L in load_layers]
    todo = list(range(n_seq)) if rows is None else sorted({int(r) for r in rows})
    split = data_split(model)
    if split:
        todo = todo[split.part(len(todo))]
    todo = sorted(todo, key=lambda i: (len(sequences[i]), i))  # similar lengths share a batch: little padding
    sums = {
        "count": torch.zeros(n_seq, dtype=torch.float64),
        "base": torch.zeros(n_seq, dtype=torch.float64),
        "ablated": torch.zeros(len(hook_sets), n_seq, dtype=torch.float64),
        "kl": torch.zeros(len(hook_sets), n_seq, dtype=torch.float64),
        "selected": torch.zeros(len(load_layers), model.config.moe_num_experts, dtype=torch.float64),
        "real": torch.zeros(1, dtype=torch.float64),
    }
    real_mask: dict[str, torch.Tensor] = {}

    def count(idx: torch.Tensor, hook) -> None:  # routing slots per expert on the base run's real tokens
        flat = idx[real_mask["mask"].to(idx.device)].flatten().cpu()
        sums["selected"][load_layers.index(hook.layer)] += torch.bincount(flat, minlength=sums["selected"].shape[1])

    load_hooks = [(f"blocks.{L}.moe.hook_topk_idx", count) for L in load_layers]
    # a hook set that edits blocks >= L only runs blocks L..: the earlier ones come from the base pass
    starts, stash = [first_edited_layer(model, [hooks]) for hooks in hook_sets], {}
    for L in sorted(set(starts) - {0}):
        load_hooks.append((f"blocks.{L}.hook_resid_pre", lambda x, hook, L=L: stash.__setitem__(L, x)))
    n_batches = -(-len(todo) // batch_size)
    batches = iter_batches([sequences[i] for i in todo], batch_size, model.config.pad_token_id or 0)
    for ids, mask, batch_rows in tqdm(batches, total=n_batches, disable=not progress, desc="ablation"):
        real = mask.bool()
        real_mask["mask"] = real
        valid = real[:, :-1] & real[:, 1:]  # predicted positions: context and target both real
        seq = torch.as_tensor([todo[r] for r in batch_rows])[:, None].expand_as(valid)[valid]
        base = _predicted_log_probs(model, ids, mask, valid, load_hooks)
        targets = ids[:, 1:][valid].to(base.device)[:, None]
        sums["real"] += float(real.sum())
        sums["count"] += torch.bincount(seq, minlength=n_seq).double()
        sums["base"] += torch.bincount(seq, weights=-base.gather(-1, targets)[:, 0].double().cpu(), minlength=n_seq)
        p_base = base.exp()
        for a, hooks in enumerate(hook_sets):
            start = starts[a]
            logp = _predicted_log_probs(model, ids, mask, valid, hooks, start, stash.get(start)) if hooks else base
            nll = -logp.gather(-1, targets)[:, 0]
            kl = (p_base * (base - logp)).sum(-1)  # KL(p_base || p_ablated) per position
            sums["ablated"][a] += torch.bincount(seq, weights=nll.double().cpu(), minlength=n_seq)
            sums["kl"][a] += torch.bincount(seq, weights=kl.double().cpu(), minlength=n_seq)
    if split:
        sums = split.sum(sums)
    if sums["count"].sum() == 0:
        raise ValueError("the dataset has no predicted token (every sequence needs >= 2 real tokens)")
    return PerSequence(
        sums["count"], sums["base"], sums["ablated"], sums["kl"], sums["selected"], int(sums["real"].item())
    )
