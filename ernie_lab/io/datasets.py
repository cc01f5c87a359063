"""Datasets as token sequences: normalise what a user passes to an analysis, and batch it.

Every dataset-wide analysis (routing collection, ablation, saliency, reports) accepts the same
inputs; :func:`as_sequences` turns them into a list of 1-D LongTensors of real tokens and
:func:`iter_batches` left-pads them into batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ernie_lab.model.checks import as_count


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
        if isinstance(row, str | bytes):
            raise TypeError(f"sequence {i} of the dataset is a string among token ids; pass texts or ids, not both")
        row = torch.as_tensor(row)
        if row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
            raise TypeError(f"sequence {i} of the dataset must hold integer token ids, got dtype {row.dtype}")
        row = row.to(torch.long).flatten()
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
    check_batch_size(batch_size)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, width - len(s) :] = s
            mask[i, width - len(s) :] = 1
        yield ids, mask, range(start, start + len(chunk))


def check_batch_size(batch_size: Any) -> None:
    """ValueError (ArgumentTypeError / ArgumentRangeError) unless ``batch_size`` is an integer >= 1."""
    as_count(batch_size, "batch_size", low=1)


def token_groups(groups: Sequence[Any] | None, lengths: Sequence[int]) -> np.ndarray | None:
    """Per-sequence labels repeated over each sequence's tokens: ``[sum(lengths)]`` (None -> None)."""
    if groups is None:
        return None
    groups = list(groups)
    if len(groups) != len(lengths):
        raise ValueError(f"groups has {len(groups)} labels but the dataset has {len(lengths)} sequences")
    return np.repeat(np.asarray(groups, dtype=object), np.asarray(lengths, dtype=np.int64))
