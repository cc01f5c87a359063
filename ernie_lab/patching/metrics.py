"""Patching metrics: ``fn(logits [batch pos vocab]) -> [batch]``, one value per prompt.

The activation-patching literature's standard choices (Heimersheim & Nanda 2024, §"metrics"): the
logit difference between a correct and a distractor token, the loss of a target, and the KL
divergence from reference logits. :func:`reduce_metric` averages a batch into the one number that
patching normalises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Metric = Callable[[torch.Tensor], torch.Tensor]


def _per_row(values, batch: int, what: str, device) -> torch.Tensor:
    """An int, a list or a ``[batch]`` tensor as a ``[batch]`` LongTensor."""
    t = torch.as_tensor(values, device=device).long().reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"{what} has {t.numel()} entries but the logits have batch {batch}")
    return t


def _at_position(logits: torch.Tensor, position) -> torch.Tensor:
    """``logits [batch pos vocab]`` at ``position`` (int or ``[batch]`` tensor) -> ``[batch vocab]``."""
    pos = _per_row(position, logits.shape[0], "position", logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), pos]


def logit_diff(answer, distractor, position=-1) -> Metric:
    """Metric ``logits[b, position, answer_b] - logits[b, position, distractor_b]`` -> ``[batch]``.

    ``answer``/``distractor``: token ids (int, or one per prompt as a list / ``[batch]`` tensor);
    ``position``: int or ``[batch]`` tensor (default: the last position).
    """

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = _at_position(logits, position).float()
        a = _per_row(answer, logits.shape[0], "answer", logits.device)
        d = _per_row(distractor, logits.shape[0], "distractor", logits.device)
        return last.gather(-1, a[:, None])[:, 0] - last.gather(-1, d[:, None])[:, 0]

    return metric


def loss_metric(target_ids, position=-1) -> Metric:
    """Metric: negative log-likelihood of ``target_ids`` -> ``[batch]`` (lower is better).

    int / list / ``[batch]`` tensor: the target token at ``position`` of each prompt.
    ``[batch pos]`` tensor: a target for every position (``logits[:, t]`` predicts ``target[:, t]``;
    -100 skips a position), averaged over positions. For next-token loss on the input itself pass
    ``ids.roll(-1, -1)`` with its last column set to -100.
    """
    targets = torch.as_tensor(target_ids)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        logp = logits.float().log_softmax(-1)
        if targets.ndim < 2:
            t = _per_row(targets, logits.shape[0], "target_ids", logits.device)
            return -_at_position(logp, position).gather(-1, t[:, None])[:, 0]
        t = targets.to(logits.device).expand(logits.shape[:2])
        keep = t != -100
        nll = -logp.gather(-1, t.clamp(min=0)[..., None])[..., 0]
        return (nll * keep).sum(-1) / keep.sum(-1).clamp(min=1)

    return metric


def kl_metric(ref_logits: torch.Tensor, position: int | None = -1) -> Metric:
    """Metric ``KL(p_ref || p)`` at ``position`` (None: mean over positions) -> ``[batch]``.

    ``ref_logits`` ``[batch pos vocab]`` (or ``[pos vocab]``), e.g. the clean run's logits; it must
    have the same positions as the logits it is compared with. Computed in fp32.
    """
    ref = ref_logits if ref_logits.ndim == 3 else ref_logits[None]
    ref_logp = ref.detach().float().log_softmax(-1)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        logp = logits.float().log_softmax(-1)
        r = ref_logp.to(logits.device).expand(logp.shape)
        kl = (r.exp() * (r - logp)).sum(-1)  # [batch pos]
        return kl.mean(-1) if position is None else _at_position(kl[..., None], position)[:, 0]

    return metric


def reduce_metric(value: torch.Tensor) -> torch.Tensor:
    """A metric's output (``[batch]`` or a scalar) as one scalar: the mean over prompts."""
    return value.float().mean() if value.ndim else value.float()
