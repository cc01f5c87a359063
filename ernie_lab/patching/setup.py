"""The clean/corrupted runs every patching grid starts from (see ``patching/grids.py``).

:class:`PatchingRuns` holds the two inputs, the metric and both runs' values, caches source
activations and runs batches of patches; the grids (``grids.py``, ``moe.py``) and attribution
patching (``attribution.py``) build on it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ernie_lab.model.checks import as_ints
from ernie_lab.model.hook_points import first_edited_layer
from ernie_lab.patching.metrics import Metric, reduce_metric
from ernie_lab.plots import sequence_tokens, token_label

Hooks = list[tuple[str, Callable]]
RESIDUAL_HOOKS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
DIRECTIONS = ("denoising", "noising")


# ---------------------------------------------------------------------------------------- setup
def _check_layout(clean: torch.Tensor, corrupt: torch.Tensor) -> None:
    """Every pair must change the same positions, or averaging over pairs would mix positions that
    play different roles (the changed entity at position 7 in one pair, 9 in another)."""
    changed = clean != corrupt  # [batch pos]
    odd = (changed != changed[:1]).any(dim=1).nonzero().flatten().tolist()
    if odd:
        first, other = (changed[row].nonzero().flatten().tolist() for row in (0, odd[0]))
        raise ValueError(
            f"the pairs change different positions (pair 0: {first}, pair {odd[0]}: {other}); "
            "patching averages over pairs per position, so every pair needs the same token layout. "
            "Group pairs by layout (el.report.pair_batch does) or patch them separately."
        )


def _as_ids(ids, name: str) -> torch.Tensor:
    if isinstance(ids, str | bytes):
        raise TypeError(f"{name} must be token ids ([pos] or [batch pos]); encode the text with the tokenizer first")
    t = torch.as_tensor(ids)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {t.dtype}")
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] == 0:
        raise ValueError(f"{name} must be [pos] or [batch pos] token ids, got shape {tuple(t.shape)}")
    return t.long()


class PatchingRuns:
    """The runs and bookkeeping shared by every patching grid; see :class:`~ernie_lab.patching.grids.PatchingSetup`."""

    def __init__(
        self,
        model,
        clean_ids,
        corrupt_ids,
        metric: Metric,
        *,
        direction: str = "denoising",
        tokenizer=None,
        fwd_hooks: Hooks = (),
        batch_size: int = 32,
        progress: bool = True,
    ):
        clean, corrupt = _as_ids(clean_ids, "clean_ids"), _as_ids(corrupt_ids, "corrupt_ids")
        if clean.shape[1] != corrupt.shape[1]:
            raise ValueError(
                f"clean_ids has {clean.shape[1]} tokens but corrupt_ids has {corrupt.shape[1]}; "
                "activation patching needs inputs of equal token length"
            )
        if clean.shape[0] != corrupt.shape[0]:
            raise ValueError(f"clean_ids has {clean.shape[0]} prompts but corrupt_ids has {corrupt.shape[0]}")
        _check_layout(clean, corrupt)
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.metric, self.direction = model, metric, direction
        self.tokenizer, self.fwd_hooks = tokenizer, list(fwd_hooks)
        self.batch_size, self.progress = batch_size, progress
        self.clean_ids, self.corrupt_ids = clean, corrupt
        self.n_prompts, self.n_pos = clean.shape
        self.n_layers = model.config.num_hidden_layers
        with torch.no_grad():
            self.clean_logits = model.run_with_hooks(clean, fwd_hooks=self.fwd_hooks)
            self.corrupt_logits = model.run_with_hooks(corrupt, fwd_hooks=self.fwd_hooks)
            self.m_clean = reduce_metric(metric(self.clean_logits)).item()
            self.m_corrupt = reduce_metric(metric(self.corrupt_logits)).item()
        denoise = direction == "denoising"
        self.base_ids, self.source_ids = (corrupt, clean) if denoise else (clean, corrupt)
        self.m_base, self.m_source = (self.m_corrupt, self.m_clean) if denoise else (self.m_clean, self.m_corrupt)
        if self.m_source == self.m_base:
            warnings.warn(
                f"m(clean) == m(corrupt) == {self.m_clean}: normalised effects are 0/0 and reported as NaN",
                RuntimeWarning,
                stacklevel=2,
            )
        self._caches: dict[str, dict[str, torch.Tensor]] = {"base": {}, "source": {}}

    # ------------------------------------------------------------------------ helpers
    def effect(self, m):
        """Normalised effect of patched metric value(s) ``m`` (NaN when m(source) == m(base))."""
        gap = self.m_source - self.m_base
        m = np.asarray(m, dtype=np.float64)
        return (m - self.m_base) / gap if gap != 0 else np.full_like(m, math.nan)

    def acts(self, run: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Activations of the ``"base"`` or ``"source"`` run at ``names`` (cached, one forward per miss)."""
        store = self._caches[run]
        missing = [n for n in names if n not in store]
        if missing:
            ids = self.base_ids if run == "base" else self.source_ids
            _, cache = self.model.run_with_cache(ids, names_filter=missing, fwd_hooks=self.fwd_hooks)
            store.update(cache.items())
        return {n: store[n] for n in names}

    def token_labels(self) -> list[str] | None:
        """One label per position, or None without a tokenizer.

        The first pair's token (spaces shown as ``␣``, :func:`~ernie_lab.plots.token_label`),
        ``"clean/corrupt"`` where the pair differs, and a trailing ``…`` where the token at that
        position varies across the pairs (e.g. different names in one template); the changed
        positions are the same in every pair (checked on construction).
        """
        if self.tokenizer is None:
            return None
        clean, corrupt = self._tokens(self.clean_ids[0]), self._tokens(self.corrupt_ids[0])
        labels = [c if c == r else f"{c}/{r}" for c, r in zip(clean, corrupt, strict=True)]
        varies = ((self.clean_ids != self.clean_ids[:1]) | (self.corrupt_ids != self.corrupt_ids[:1])).any(0).tolist()
        return [f"{label}…" if v else label for label, v in zip(labels, varies, strict=True)]

    def _tokens(self, ids: torch.Tensor) -> list[str]:
        return [token_label(t) for t in sequence_tokens(self.tokenizer, ids.tolist())]

    def _layers(self, layers, moe_only: bool = False) -> list[int]:
        cfg = self.model.config
        allowed = cfg.moe_layers if moe_only else list(range(self.n_layers))
        if layers is None:
            return allowed
        layers = as_ints(layers, "layers", scalar=True)
        for L in layers:
            if L not in allowed:
                kind = "MoE layers" if moe_only else "layers"
                raise ValueError(f"layer {L} is not one of the model's {kind} {allowed}")
        return layers

    def _positions(self, positions) -> list[int]:
        if positions is None:
            return list(range(self.n_pos))
        out = []
        for p in as_ints(positions, "positions", scalar=True):
            if not -self.n_pos <= p < self.n_pos:
                raise ValueError(f"position {p} is outside the {self.n_pos} input positions")
            out.append(p % self.n_pos)
        return out

    def _frame(self, rows: list[dict], metrics: np.ndarray) -> pd.DataFrame:
        df = pd.DataFrame(rows)
        labels = self.token_labels()
        if labels is not None and "pos" in df:
            df.insert(list(df.columns).index("pos") + 1, "token", [labels[p] for p in df["pos"]])
        df["metric"] = metrics
        df["effect"] = self.effect(metrics)
        df["direction"] = self.direction  # denoising: clean patched into corrupt; noising: the reverse
        return df

    # ------------------------------------------------------------------------ batched runs
    def run_patches(self, patches: list, make_hooks: Callable[[list], Hooks], desc: str = "patching") -> np.ndarray:
        """Mean metric of the base run under each patch -> ``[len(patches)]`` (float64).

        ``make_hooks(chunk)`` returns the forward hooks for a chunk of patches run together: the base
        batch repeated ``len(chunk)`` times, copy ``i`` (rows ``i*batch .. (i+1)*batch``) patched by
        ``chunk[i]``. At most ``batch_size`` sequences (and at least one patch) per forward pass.
        """
        per_pass = max(1, self.batch_size // self.n_prompts)
        chunks = [patches[i : i + per_pass] for i in range(0, len(patches), per_pass)]
        b, out = self.n_prompts, []
        for chunk in tqdm(chunks, desc=desc, disable=not self.progress, leave=False):
            ids = self.base_ids.repeat(len(chunk), 1)
            hooks = self.fwd_hooks + make_hooks(chunk)
            start = first_edited_layer(self.model, [hooks])  # blocks before it are the base run's: reuse them
            with torch.no_grad():
                if start:
                    name = f"blocks.{start}.hook_resid_pre"
                    every = [f"blocks.{L}.hook_resid_pre" for L in range(len(self.model.blocks))]
                    resid = self.acts("base", every)[name].repeat(len(chunk), 1, 1)
                    with self.model.hooks(hooks):
                        logits = self.model.forward_from(start, resid, ids)
                else:
                    logits = self.model.run_with_hooks(ids, fwd_hooks=hooks)
                out += [reduce_metric(self.metric(logits[i * b : (i + 1) * b])).item() for i in range(len(chunk))]
        return np.asarray(out, dtype=np.float64)

    def masked_hooks(self, chunk: list[dict[str, torch.Tensor]]) -> Hooks:
        """Hooks for patches given as ``{hook name: bool mask [batch ...leading dims]}``: where the mask
        is True the activation takes the source run's value (trailing dims broadcast)."""
        names = list(dict.fromkeys(n for patch in chunk for n in patch))
        sources = self.acts("source", names)
        hooks = []
        for name in names:
            src = sources[name]
            shape = next(p[name].shape for p in chunk if name in p)
            mask = torch.stack([p.get(name, torch.zeros(shape, dtype=torch.bool)) for p in chunk]).flatten(0, 1)
            mask = mask.reshape(mask.shape + (1,) * (src.ndim - mask.ndim)).to(src.device)
            hooks.append((name, _replace(mask, src.repeat(len(chunk), *[1] * (src.ndim - 1)))))
        return hooks


def _replace(mask: torch.Tensor, src: torch.Tensor) -> Callable:
    def patch(x: torch.Tensor, hook) -> torch.Tensor:
        return torch.where(mask.to(x.device), src.to(x.device), x)

    return patch


# ---------------------------------------------------------------------------------------- functions
