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

from ernie_lab.model.checks import as_int, as_ints
from ernie_lab.model.hook_points import first_edited_layer
from ernie_lab.noise import (
    DEFAULT_LEVEL,
    DEFAULT_N_BOOT,
    check_interval,
    percentile_interval,
    resample_weights,
    resampled_means,
)
from ernie_lab.patching.metrics import Metric
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
        level: float = DEFAULT_LEVEL,
        n_boot: int = DEFAULT_N_BOOT,
        seed: int = 0,
    ):
        check_interval(level, n_boot)
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
        self.level, self.n_boot, self.seed = float(level), int(n_boot), as_int(seed, "seed", 0)
        self.clean_ids, self.corrupt_ids = clean, corrupt
        self.n_prompts, self.n_pos = clean.shape
        self.n_layers = model.config.num_hidden_layers
        with torch.no_grad():
            self.clean_logits = model.run_with_hooks(clean, fwd_hooks=self.fwd_hooks)
            self.corrupt_logits = model.run_with_hooks(corrupt, fwd_hooks=self.fwd_hooks)
            clean_rows, corrupt_rows = _per_prompt(metric(self.clean_logits)), _per_prompt(metric(self.corrupt_logits))
        self.m_clean, self.m_corrupt = float(clean_rows.mean()), float(corrupt_rows.mean())
        denoise = direction == "denoising"
        self.base_ids, self.source_ids = (corrupt, clean) if denoise else (clean, corrupt)
        self.m_base, self.m_source = (self.m_corrupt, self.m_clean) if denoise else (self.m_clean, self.m_corrupt)
        # per-prompt metric of the base and source runs [batch] (one value when the metric reduces itself)
        self.base_rows, self.source_rows = (corrupt_rows, clean_rows) if denoise else (clean_rows, corrupt_rows)
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
        """The grid's rows with metric, effect, its bootstrap interval over prompt pairs and direction.

        ``metrics``: ``[n_patch batch]`` per-prompt patched metrics (or ``[n_patch]`` means, which give
        no interval).
        """
        df = pd.DataFrame(rows)
        labels = self.token_labels()
        if labels is not None and "pos" in df:
            df.insert(list(df.columns).index("pos") + 1, "token", [labels[p] for p in df["pos"]])
        metrics = np.asarray(metrics, dtype=np.float64).reshape(len(df), -1)
        df["metric"] = metrics.mean(1)
        df["effect"] = self.effect(df["metric"].to_numpy())
        df["ci_low"], df["ci_high"] = self.effect_interval(metrics)
        df["direction"] = self.direction  # denoising: clean patched into corrupt; noising: the reverse
        df.attrs.update(level=self.level, n_prompts=self.n_prompts)
        return df

    def effect_interval(self, patched: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Percentile bootstrap interval of the normalised effect over prompt pairs, ``level``/``n_boot``/``seed``
        of the setup: each resample draws pairs with replacement and recomputes
        ``(m(patched) - m(base)) / (m(source) - m(base))`` from the stored per-prompt metrics (no model run).

        ``patched [n_patch batch]``. NaN with a single pair, a metric that returns one value for the batch,
        or a resample where m(source) == m(base).
        """
        patched = np.asarray(patched, dtype=np.float64)
        n_prompts = self.base_rows.shape[0]
        if n_prompts < 2 or patched.ndim != 2 or patched.shape[1] != n_prompts:
            nan = np.full(patched.shape[0], math.nan)
            return nan, nan.copy()
        weights = resample_weights(n_prompts, self.n_boot, self.seed)
        m_patched, m_base, m_source = (
            resampled_means(v, weights=weights) for v in (patched.T, self.base_rows, self.source_rows)
        )
        gap = m_source - m_base
        gap[gap == 0] = math.nan
        return percentile_interval((m_patched - m_base[:, None]) / gap[:, None], self.level)

    # ------------------------------------------------------------------------ batched runs
    def run_patch_rows(self, patches: list, make_hooks: Callable[[list], Hooks], desc: str = "patching") -> np.ndarray:
        """Per-prompt metric of the base run under each patch -> ``[len(patches) batch]`` (float64;
        ``[len(patches) 1]`` when the metric returns one value for the batch).

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
                out += [_per_prompt(self.metric(logits[i * b : (i + 1) * b])) for i in range(len(chunk))]
        return np.stack(out) if out else np.zeros((0, self.n_prompts))

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


def _per_prompt(value: torch.Tensor) -> np.ndarray:
    """A metric's value as float64 ``[batch]`` (``[1]`` for a metric that already reduced the batch)."""
    value = torch.as_tensor(value).detach().float()
    if value.ndim > 1:
        value = value.flatten(1).mean(1)  # reduce_metric takes the mean of everything: same overall mean
    return value.reshape(-1).cpu().numpy().astype(np.float64)


def _replace(mask: torch.Tensor, src: torch.Tensor) -> Callable:
    def patch(x: torch.Tensor, hook) -> torch.Tensor:
        return torch.where(mask.to(x.device), src.to(x.device), x)

    return patch


# ---------------------------------------------------------------------------------------- functions
