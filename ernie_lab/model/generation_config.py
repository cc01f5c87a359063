"""Generation defaults of a checkpoint: ``generation_config.json`` (transformers' file and key names).

``model.generation_config`` starts from the model config's token ids and is updated from the
checkpoint's ``generation_config.json`` by ``load_model``; ``generate`` reads its ``eos_token_id``
when called with ``eos_token_id=None``, as transformers' ``GenerationMixin`` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from ernie_lab.model.config import ErnieConfig


@dataclass(frozen=True)
class GenerationConfig:
    """Token ids that generation uses by default (other keys of the file are ignored)."""

    eos_token_id: int | list[int] | None = None  # generation ends after any of these
    pad_token_id: int | None = None  # written into rows that have ended
    bos_token_id: int | None = None

    @classmethod
    def from_model_config(cls, config: ErnieConfig) -> GenerationConfig:
        return cls(config.eos_token_id, config.pad_token_id, config.bos_token_id)

    def updated_from(self, path: str | Path) -> GenerationConfig:
        """These defaults overridden by the keys present in ``path`` (a missing file changes nothing)."""
        path = Path(path)
        if not path.is_file():
            return self
        data = json.loads(path.read_text(encoding="utf-8"))
        keys = ("eos_token_id", "pad_token_id", "bos_token_id")
        return replace(self, **{k: data[k] for k in keys if k in data})

    @property
    def eos_token_ids(self) -> list[int]:
        """``eos_token_id`` as a list (empty: never stop on a token)."""
        ids = self.eos_token_id
        return [] if ids is None else [ids] if isinstance(ids, int) else [int(i) for i in ids]
