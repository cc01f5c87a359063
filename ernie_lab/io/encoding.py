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
