"""What a tokenizer call returns: token ids and attention mask, as transformers' ``BatchEncoding``."""

from __future__ import annotations

from typing import Any

import torch


class BatchEncoding(dict):
    """``{"input_ids", "attention_mask"}`` with attribute access and ``.to(device)``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        """The tensors moved to ``device`` (lists are left as they are)."""
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


PADDING = (True, False, "longest", "max_length", "do_not_pad")
TRUNCATION = (True, False, "longest_first", "only_first", "do_not_truncate")


def batch_encoding(
    rows: list[list[int]],
    pad_id: int,
    *,
    padding: bool | str = "longest",
    truncation: bool | str = False,
    max_length: int | None = None,
    model_max_length: int | None = None,
    padding_side: str = "left",
    truncation_side: str = "right",
    return_tensors: str | None = "pt",
) -> BatchEncoding:
    """Truncate and pad encoded ``rows`` as a transformers tokenizer call does.

    ``padding``: ``True``/``"longest"`` pads to the longest row, ``"max_length"`` to ``max_length``
    (default ``model_max_length``), ``False``/``"do_not_pad"`` leaves the rows as they are.
    ``truncation``: ``True``/``"longest_first"``/``"only_first"`` cuts each row to ``max_length``
    (default ``model_max_length``) on ``truncation_side``; ``False``/``"do_not_truncate"`` does not.
    Rows of different lengths cannot become one tensor: ``return_tensors="pt"`` then raises.
    """
    if padding not in PADDING:
        raise ValueError(f"padding must be one of {PADDING}, got {padding!r}")
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
        if side not in ("left", "right"):
            raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
    if return_tensors not in ("pt", None):
        raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
    limit = max_length if max_length is not None else model_max_length
    if truncation not in (False, "do_not_truncate") and limit is not None:
        rows = [r[:limit] if truncation_side == "right" else r[max(len(r) - limit, 0) :] for r in rows]
    if padding in (True, "longest"):
        width = max((len(r) for r in rows), default=0)
    elif padding == "max_length":
        if limit is None:
            raise ValueError("padding='max_length' needs max_length (the tokenizer has no model_max_length)")
        width = limit
    else:
        width = 0
    ids, mask = [], []
    for row in rows:
        pad = max(width - len(row), 0)
        left, right = (pad, 0) if padding_side == "left" else (0, pad)
        ids.append([pad_id] * left + row + [pad_id] * right)
        mask.append([0] * left + [1] * len(row) + [0] * right)
    if return_tensors == "pt":
        lengths = {len(r) for r in ids}
        if len(lengths) > 1:
            raise ValueError(
                f"rows of lengths {sorted(lengths)} cannot form one tensor: pass padding=True (or "
                "padding='max_length' with truncation=True), or return_tensors=None for lists"
            )
        shape = (len(ids), lengths.pop() if lengths else 0)
        ids = torch.tensor(ids, dtype=torch.long).reshape(shape)
        mask = torch.tensor(mask, dtype=torch.long).reshape(shape)
    return BatchEncoding(input_ids=ids, attention_mask=mask)
