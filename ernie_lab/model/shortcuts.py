"""TransformerLens' model conveniences under their names: tokens <-> text, weight views.

``model.tokenizer`` is what ``to_tokens``/``to_str_tokens``/``to_string`` use. ``el.load_model(src)``
gives the model a tokenizer loaded on first use from the same ``src`` (so a folder without tokenizer
files costs nothing until a text is encoded); a model built by hand gets one by assignment:
``model.tokenizer = el.load_tokenizer(src)``.

Weight views share the parameters' storage (no copies), so an in-place edit of a view edits the
model: ``W_E [vocab d_model]``, ``W_U [d_model vocab]`` and, per layer, ``W_Q``/``W_K``/``W_V``
``[head|kv_head d_model d_head]`` and ``W_O [head d_head d_model]``. TransformerLens stacks the
per-layer matrices into one ``[layer ...]`` tensor (a copy); here ``model.W_Q`` is a tuple of the
per-layer views, so ``model.W_Q[L][h]`` reads the same as there (``model.blocks[L].self_attn.W_Q``
too).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# frames inside these packages are not "the caller" a warning should point at
_INTERNAL = (str(Path(__file__).resolve().parents[1]), str(Path(torch.__file__).resolve().parent))


class MissingTokenizerError(RuntimeError):
    """The model has no tokenizer (``model.tokenizer = el.load_tokenizer(src)`` gives it one)."""


class ShortcutsMixin:
    """Mixed into :class:`~ernie_lab.model.ernie.ErnieMoE`."""

    _tokenizer: Any = None
    _tokenizer_factory: Callable[[], Any] | None = None
    _warned_padding: bool = False

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self):
        """The tokenizer of this model (loaded on first use when ``el.load_model`` set a source)."""
        if self._tokenizer is None and self._tokenizer_factory is not None:
            self._tokenizer = self._tokenizer_factory()
        if self._tokenizer is None:
            raise MissingTokenizerError(
                "this model has no tokenizer: set model.tokenizer = el.load_tokenizer(src) "
                "(el.load_model(src) sets one from the same src)"
            )
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer, self._tokenizer_factory = tokenizer, None

    def set_tokenizer_source(self, factory: Callable[[], Any]) -> None:
        """Load the tokenizer with ``factory()`` on first use (``el.load_model`` calls this)."""
        self._tokenizer, self._tokenizer_factory = None, factory

    def to_tokens(self, input: str | list[str], prepend_bos: bool = False, move_to_device: bool = True) -> torch.Tensor:
        """Token ids ``[batch pos]`` of a text or a list of texts (left-padded with the pad id).

        ERNIE adds no BOS, so ``prepend_bos`` defaults to False (TransformerLens: True). A padded
        batch needs its mask: use ``model.tokenizer(texts)``, which returns ``input_ids`` and
        ``attention_mask``, and pass both to the model.
        """
        enc = self.tokenizer([input] if isinstance(input, str) else list(input))
        ids = enc["input_ids"]
        if prepend_bos:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise ValueError("prepend_bos=True but the tokenizer has no bos_token")
            ids = torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids], dim=1)
        return ids.to(self.device) if move_to_device else ids

    def to_str_tokens(self, input: str | torch.Tensor | list[int], prepend_bos: bool = False) -> list:
        """Readable token strings: of a text, of ids ``[pos]`` / ``[1 pos]`` (a list), or of ids
        ``[batch pos]`` (a list per row). Leading spaces are kept (``" the"``), as plot labels need."""
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos, move_to_device=False)[0]
        ids = torch.as_tensor(input).cpu()
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim == 2:
            return [self.tokenizer.convert_ids_to_tokens(row) for row in ids]
        if ids.ndim != 1:
            raise ValueError(f"to_str_tokens takes a text, ids [pos] or ids [batch pos], got shape {tuple(ids.shape)}")
        return self.tokenizer.convert_ids_to_tokens(ids)

    def to_string(self, tokens: torch.Tensor | list[int]) -> str | list[str]:
        """The text of ids ``[pos]`` (a str) or ``[batch pos]`` (a list of str)."""
        ids = torch.as_tensor(tokens).cpu()
        if ids.ndim == 2:
            return self.tokenizer.batch_decode(ids)
        if ids.ndim != 1:
            raise ValueError(f"to_string takes ids [pos] or [batch pos], got shape {tuple(ids.shape)}")
        return self.tokenizer.decode(ids)

    def to_single_token(self, string: str) -> int:
        """The id of ``string``, which must encode to exactly one token."""
        ids = self.tokenizer.encode(string)
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens {ids}, not one")
        return ids[0]

    def tokens_to_residual_directions(self, tokens: int | str | torch.Tensor) -> torch.Tensor:
        """``W_U[:, tokens]`` moved last: ``[*tokens.shape d_model]`` (a string must be one token)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = torch.as_tensor(tokens, dtype=torch.long)
        if ids.is_floating_point():
            raise TypeError(f"tokens must be token ids, got dtype {ids.dtype}")
        return self.lm_head.weight[ids.to(self.lm_head.weight.device)]

    def warn_if_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Warn once per model (in eval mode) when a batch of rows starts or ends with the pad id but
        no ``attention_mask`` came with it: the pad tokens would be read as text."""
        pad = self.config.pad_token_id
        quiet = self._warned_padding or self.training  # training windows are packed text, not padded prompts
        if quiet or attention_mask is not None or pad is None or input_ids.shape[0] < 2:
            return
        edges = input_ids[:, [0, -1]]  # padding sits at a row's start (left) or end (right)
        if bool((edges == pad).any()):
            self._warned_padding = True
            warnings.warn(
                f"input_ids hold the pad id {pad} but no attention_mask was given, so padding is read "
                "as tokens; pass attention_mask (enc = model.tokenizer(texts); model(**enc) or "
                "model(enc.input_ids, attention_mask=enc.attention_mask)). Warned once per model.",
                UserWarning,
                stacklevel=_caller_level(),
            )

    # ------------------------------------------------------------------ weight views
    @property
    def W_E(self) -> torch.Tensor:
        """Token embedding ``[vocab d_model]`` (the parameter itself)."""
        return self.model.embed_tokens.weight

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding ``[d_model vocab]``: a transposed view of ``lm_head.weight``."""
        return self.lm_head.weight.t()

    @property
    def W_Q(self) -> tuple[torch.Tensor, ...]:
        """Per layer ``[head d_model d_head]`` views of ``q_proj.weight``."""
        return tuple(b.self_attn.W_Q for b in self.blocks)

    @property
    def W_K(self) -> tuple[torch.Tensor, ...]:
        """Per layer ``[kv_head d_model d_head]`` views of ``k_proj.weight``."""
        return tuple(b.self_attn.W_K for b in self.blocks)

    @property
    def W_V(self) -> tuple[torch.Tensor, ...]:
        """Per layer ``[kv_head d_model d_head]`` views of ``v_proj.weight``."""
        return tuple(b.self_attn.W_V for b in self.blocks)

    @property
    def W_O(self) -> tuple[torch.Tensor, ...]:
        """Per layer ``[head d_head d_model]`` views of ``o_proj.weight``."""
        return tuple(b.self_attn.W_O for b in self.blocks)


def _caller_level() -> int:
    """``stacklevel`` of the first frame outside ernie_lab and torch (the user's ``model(...)`` line)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level
