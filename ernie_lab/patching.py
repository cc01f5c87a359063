"""Activation patching: the clean/corrupted setup and batched patching grids (ANALYSES.md).

Method: Heimersheim & Nanda, "How to use and interpret activation patching" (2024). Two inputs of
equal token length, clean x_c and corrupted x_r, and a metric m(logits). **Denoising** (default)
runs x_r and patches in activations from the x_c run; **noising** runs x_c and patches in x_r's.
Call the run being patched the *base* and the run the activations come from the *source*:

    effect = (m(patched) - m(base)) / (m(source) - m(base))

For denoising this is ANALYSES.md's ``(m(patched) - m(x_r)) / (m(x_c) - m(x_r))`` exactly
(1 = fully restored, 0 = no effect); noising uses the mirrored form, so 0 still means "no effect"
and 1 means "the metric moved all the way to the corrupted run's". ``1 - effect`` puts a noising
value back on the clean(1)/corrupt(0) scale. When m(source) == m(base) the effect is 0/0: it is
NaN and a ``RuntimeWarning`` says so.

A batch of prompt pairs ``[batch pos]`` is patched all at once: ``metric`` gives one value per
prompt, their mean is the reported metric. Many patches share one forward pass: the base batch is
repeated once per patch and each copy patches a different place (one hook per hook point, with a
per-row mask), ``batch_size`` sequences per pass.

Axes: batch pos head topk d_model (glossary in model.py). Rows of the returned DataFrames:
``layer``, ``pos``/``token``, ``head``, ``expert`` keys; ``metric`` (mean patched metric) and
``effect``. Metrics live in ``patching_metrics.py``, MoE grids in ``patching_moe.py``, attribution
patching in ``attribution.py``, plots in ``patching_plots.py``; all are importable from here.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ernie_lab.patching_metrics import Metric, kl_metric, logit_diff, loss_metric, reduce_metric

Hooks = list[tuple[str, Callable]]
RESIDUAL_HOOKS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
DIRECTIONS = ("denoising", "noising")


# ---------------------------------------------------------------------------------------- setup
def _as_ids(ids, name: str) -> torch.Tensor:
    t = torch.as_tensor(ids)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[1] == 0:
        raise ValueError(f"{name} must be [pos] or [batch pos] token ids, got shape {tuple(t.shape)}")
    return t.long()


class PatchingSetup:
    """A clean/corrupted pair (or batch of pairs), a metric and a direction, with both runs' metrics.

    ``clean_ids``/``corrupt_ids``: ``[pos]`` or ``[batch pos]`` of equal shape. ``metric``:
    ``fn(logits [batch pos vocab]) -> [batch]`` (see :func:`logit_diff`). ``fwd_hooks`` stay active
    in every run (baselines, caches, patched runs), applied before the patch — e.g. to patch inside
    an ablated model. ``tokenizer`` (anything with ``convert_ids_to_tokens`` or ``decode``) adds token
    labels taken from the first prompt pair, ``"clean/corrupt"`` where they differ.

    Attributes: ``m_clean``, ``m_corrupt``, ``m_base``, ``m_source`` (floats), ``clean_logits``,
    ``corrupt_logits`` ``[batch pos vocab]``, ``base_ids``/``source_ids`` ``[batch pos]``.
    """

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
        """One label per position from the first prompt pair, or None without a tokenizer."""
        if self.tokenizer is None:
            return None
        labels = []
        for ids in (self.clean_ids[0], self.corrupt_ids[0]):
            if hasattr(self.tokenizer, "convert_ids_to_tokens"):
                labels.append(list(self.tokenizer.convert_ids_to_tokens(ids.tolist())))
            else:
                labels.append([self.tokenizer.decode([i]) for i in ids.tolist()])
        return [c if c == r else f"{c}/{r}" for c, r in zip(*labels, strict=True)]

    def _layers(self, layers, moe_only: bool = False) -> list[int]:
        cfg = self.model.config
        allowed = cfg.moe_layers if moe_only else list(range(self.n_layers))
        if layers is None:
            return allowed
        layers = [int(L) for L in ([layers] if isinstance(layers, int) else layers)]
        for L in layers:
            if L not in allowed:
                kind = "MoE layers" if moe_only else "layers"
                raise ValueError(f"layer {L} is not one of the model's {kind} {allowed}")
        return layers

    def _positions(self, positions) -> list[int]:
        if positions is None:
            return list(range(self.n_pos))
        out = []
        for p in [positions] if isinstance(positions, int) else positions:
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
            with torch.no_grad():
                logits = self.model.run_with_hooks(ids, fwd_hooks=self.fwd_hooks + make_hooks(chunk))
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

    # ------------------------------------------------------------------------ grids
    def residual(self, hook: str = "resid_pre", layers=None, positions=None, per_position: bool = True) -> pd.DataFrame:
        """Patch ``blocks.{L}.hook_{hook}`` ``[batch pos d_model]`` per (layer, position).

        ``per_position=False`` patches all positions of a layer at once (no ``pos`` column).
        Rows: hook, layer, pos, token, metric, effect.
        """
        if hook not in RESIDUAL_HOOKS:
            raise ValueError(f"hook must be one of {RESIDUAL_HOOKS}, got {hook!r}")
        rows, patches = [], []
        for L in self._layers(layers):
            for pos in self._positions(positions) if per_position else [None]:
                mask = torch.zeros(self.n_prompts, self.n_pos, dtype=torch.bool)
                mask[:, slice(None) if pos is None else pos] = True
                patches.append({f"blocks.{L}.hook_{hook}": mask})
                rows.append({"hook": hook, "layer": L} | ({} if pos is None else {"pos": pos}))
        return self._frame(rows, self.run_patches(patches, self.masked_hooks, f"patch {hook}"))

    def heads(self, layers=None, heads=None, positions=None, per_position: bool = False) -> pd.DataFrame:
        """Patch single heads of ``blocks.{L}.attn.hook_z`` ``[batch pos head d_head]``.

        All positions at once by default; ``per_position=True`` patches each (layer, position, head).
        Rows: hook, layer, [pos, token,] head, metric, effect.
        """
        n_head = self.model.config.num_attention_heads
        heads = list(range(n_head)) if heads is None else [int(h) for h in heads]
        if any(not 0 <= h < n_head for h in heads):
            raise ValueError(f"heads {heads} must lie in [0, {n_head})")
        rows, patches = [], []
        for L in self._layers(layers):
            for pos in self._positions(positions) if per_position else [None]:
                for h in heads:
                    mask = torch.zeros(self.n_prompts, self.n_pos, n_head, dtype=torch.bool)
                    mask[:, slice(None) if pos is None else pos, h] = True
                    patches.append({f"blocks.{L}.attn.hook_z": mask})
                    rows.append({"hook": "z", "layer": L} | ({} if pos is None else {"pos": pos}) | {"head": h})
        return self._frame(rows, self.run_patches(patches, self.masked_hooks, "patch heads"))

    def routing(self, layers=None, positions=None, per_position: bool = False) -> pd.DataFrame:
        """Routing patching; see :func:`ernie_lab.patching_moe.routing_grid`."""
        from ernie_lab.patching_moe import routing_grid

        return routing_grid(self, layers=layers, positions=positions, per_position=per_position)

    def experts(self, layers=None, experts=None) -> pd.DataFrame:
        """Expert-output patching; see :func:`ernie_lab.patching_moe.expert_grid`."""
        from ernie_lab.patching_moe import expert_grid

        return expert_grid(self, layers=layers, experts=experts)

    def attribution(self, hook: str = "resid_pre", layers=None, per_position: bool = True) -> pd.DataFrame:
        """Attribution-patching estimate of the grid for ``hook``; see :func:`ernie_lab.attribution.attribute`."""
        from ernie_lab.attribution import attribute

        return attribute(self, hook, layers=layers, per_position=per_position)


def _replace(mask: torch.Tensor, src: torch.Tensor) -> Callable:
    def patch(x: torch.Tensor, hook) -> torch.Tensor:
        return torch.where(mask.to(x.device), src.to(x.device), x)

    return patch


# ---------------------------------------------------------------------------------------- functions
def patch_residual(
    model,
    clean_ids,
    corrupt_ids,
    metric: Metric,
    hook: str = "resid_pre",
    *,
    layers=None,
    positions=None,
    per_position: bool = True,
    direction: str = "denoising",
    tokenizer=None,
    fwd_hooks: Hooks = (),
    batch_size: int = 32,
    progress: bool = True,
) -> pd.DataFrame:
    """Layer x position grid of residual-stream patching at ``blocks.{L}.hook_{hook}``.

    The setup arguments are :class:`PatchingSetup`'s; the grid's are :meth:`PatchingSetup.residual`'s.
    """
    setup = PatchingSetup(
        model, clean_ids, corrupt_ids, metric, direction=direction, tokenizer=tokenizer, fwd_hooks=fwd_hooks,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    return setup.residual(hook, layers=layers, positions=positions, per_position=per_position)


def patch_heads(
    model,
    clean_ids,
    corrupt_ids,
    metric: Metric,
    *,
    layers=None,
    heads=None,
    positions=None,
    per_position: bool = False,
    direction: str = "denoising",
    tokenizer=None,
    fwd_hooks: Hooks = (),
    batch_size: int = 32,
    progress: bool = True,
) -> pd.DataFrame:
    """Layer x head grid over ``hook_z``; see :meth:`PatchingSetup.heads`."""
    setup = PatchingSetup(
        model, clean_ids, corrupt_ids, metric, direction=direction, tokenizer=tokenizer, fwd_hooks=fwd_hooks,
        batch_size=batch_size, progress=progress,
    )  # fmt: skip
    return setup.heads(layers=layers, heads=heads, positions=positions, per_position=per_position)


_LAZY = {
    "patch_experts": "ernie_lab.patching_moe",
    "patch_routing": "ernie_lab.patching_moe",
    "attribution_patching": "ernie_lab.attribution",
    "compare_attribution": "ernie_lab.attribution",
    "merge_effects": "ernie_lab.attribution",
    "plot_patching_heatmap": "ernie_lab.patching_plots",
    "plot_head_grid": "ernie_lab.patching_plots",
    "plot_attribution_vs_exact": "ernie_lab.patching_plots",
}


def __getattr__(name: str):
    # split-off parts load on first use (no import cycle; matplotlib is slow to import)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ernie_lab.patching' has no attribute {name!r}")


__all__ = [
    "PatchingSetup",
    "kl_metric",
    "logit_diff",
    "loss_metric",
    "patch_heads",
    "patch_residual",
    "reduce_metric",
    *_LAZY,
]
