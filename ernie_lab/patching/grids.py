"""Activation patching: the clean/corrupted setup and batched patching grids (README, Definitions).

Method: Heimersheim & Nanda, "How to use and interpret activation patching" (2024). Two inputs of
equal token length, clean x_c and corrupted x_r, and a metric m(logits). **Denoising** (default)
runs x_r and patches in activations from the x_c run; **noising** runs x_c and patches in x_r's.
Call the run being patched the *base* and the run the activations come from the *source*:

    effect = (m(patched) - m(base)) / (m(source) - m(base))

For denoising this is the usual ``(m(patched) - m(x_r)) / (m(x_c) - m(x_r))`` exactly
(1 = fully restored, 0 = no effect); noising uses the mirrored form, so 0 still means "no effect"
and 1 means "the metric moved all the way to the corrupted run's". ``1 - effect`` puts a noising
value back on the clean(1)/corrupt(0) scale. When m(source) == m(base) the effect is 0/0: it is
NaN and a ``RuntimeWarning`` says so.

A batch of prompt pairs ``[batch pos]`` is patched all at once: ``metric`` gives one value per
prompt, their mean is the reported metric. Many patches share one forward pass: the base batch is
repeated once per patch and each copy patches a different place (one hook per hook point, with a
per-row mask), ``batch_size`` sequences per pass.

Axes: batch pos head topk d_model (glossary in model/ernie.py). Rows of the returned DataFrames:
``layer``, ``pos``/``token``, ``head``, ``expert`` keys; ``metric`` (mean patched metric), ``effect``,
and its noise floor ``ci_low``/``ci_high``: a percentile bootstrap over prompt pairs (``level``,
``n_boot``, ``seed`` of the setup) recomputed from the stored per-pair metrics, no extra model run;
NaN for a single pair or a metric that returns one value per batch. Plots dot the cells whose interval
includes 0. The runs live in ``setup.py``, metrics in ``metrics.py``, MoE grids in ``moe.py``, attribution
patching in ``attribution.py``, plots in ``plots.py``; ``el.patching`` re-exports them all.
"""

from __future__ import annotations

import pandas as pd
import torch

from ernie_lab.model.checks import as_ints
from ernie_lab.noise import DEFAULT_LEVEL, DEFAULT_N_BOOT
from ernie_lab.patching.attribution import attribute
from ernie_lab.patching.metrics import Metric
from ernie_lab.patching.moe import expert_grid, routing_grid
from ernie_lab.patching.setup import RESIDUAL_HOOKS, Hooks, PatchingRuns


class PatchingSetup(PatchingRuns):
    """A clean/corrupted pair (or batch of pairs), a metric and a direction, with both runs' metrics.

    ``clean_ids``/``corrupt_ids``: ``[pos]`` or ``[batch pos]`` of equal shape. ``metric``:
    ``fn(logits [batch pos vocab]) -> [batch]`` (see :func:`logit_diff`). ``fwd_hooks`` stay active
    in every run (baselines, caches, patched runs), applied before the patch — e.g. to patch inside
    an ablated model. ``tokenizer`` (anything with ``convert_ids_to_tokens`` or ``decode``) adds token
    labels taken from the first prompt pair, ``"clean/corrupt"`` where they differ. ``level``, ``n_boot``
    and ``seed`` set the bootstrap interval over prompt pairs of every grid's effect (``ci_low``/``ci_high``).

    Attributes: ``m_clean``, ``m_corrupt``, ``m_base``, ``m_source`` (floats), ``clean_logits``,
    ``corrupt_logits`` ``[batch pos vocab]``, ``base_ids``/``source_ids`` ``[batch pos]``.
    """

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
        return self._frame(rows, self.run_patch_rows(patches, self.masked_hooks, f"patch {hook}"))

    def heads(self, layers=None, heads=None, positions=None, per_position: bool = False) -> pd.DataFrame:
        """Patch single heads of ``blocks.{L}.attn.hook_z`` ``[batch pos head d_head]``.

        All positions at once by default; ``per_position=True`` patches each (layer, position, head).
        Rows: hook, layer, [pos, token,] head, metric, effect.
        """
        n_head = self.model.config.num_attention_heads
        heads = list(range(n_head)) if heads is None else as_ints(heads, "heads", 0, n_head, scalar=True)
        rows, patches = [], []
        for L in self._layers(layers):
            for pos in self._positions(positions) if per_position else [None]:
                for h in heads:
                    mask = torch.zeros(self.n_prompts, self.n_pos, n_head, dtype=torch.bool)
                    mask[:, slice(None) if pos is None else pos, h] = True
                    patches.append({f"blocks.{L}.attn.hook_z": mask})
                    rows.append({"hook": "z", "layer": L} | ({} if pos is None else {"pos": pos}) | {"head": h})
        return self._frame(rows, self.run_patch_rows(patches, self.masked_hooks, "patch heads"))

    def routing(self, layers=None, positions=None, per_position: bool = False) -> pd.DataFrame:
        """Routing patching; see :func:`ernie_lab.patching.moe.routing_grid`."""
        return routing_grid(self, layers=layers, positions=positions, per_position=per_position)

    def experts(self, layers=None, experts=None) -> pd.DataFrame:
        """Expert-output patching; see :func:`ernie_lab.patching.moe.expert_grid`."""
        return expert_grid(self, layers=layers, experts=experts)

    def attribution(self, hook: str = "resid_pre", layers=None, per_position: bool = True) -> pd.DataFrame:
        """Attribution-patching estimate of the grid for ``hook``; see :func:`.attribution.attribute`."""
        return attribute(self, hook, layers=layers, per_position=per_position)


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
    level: float = DEFAULT_LEVEL,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> pd.DataFrame:
    """Layer x position grid of residual-stream patching at ``blocks.{L}.hook_{hook}``.

    The setup arguments are :class:`PatchingSetup`'s; the grid's are :meth:`PatchingSetup.residual`'s.
    """
    setup = PatchingSetup(
        model, clean_ids, corrupt_ids, metric, direction=direction, tokenizer=tokenizer, fwd_hooks=fwd_hooks,
        batch_size=batch_size, progress=progress, level=level, n_boot=n_boot, seed=seed,
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
    level: float = DEFAULT_LEVEL,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> pd.DataFrame:
    """Layer x head grid over ``hook_z``; see :meth:`PatchingSetup.heads`."""
    setup = PatchingSetup(
        model, clean_ids, corrupt_ids, metric, direction=direction, tokenizer=tokenizer, fwd_hooks=fwd_hooks,
        batch_size=batch_size, progress=progress, level=level, n_boot=n_boot, seed=seed,
    )  # fmt: skip
    return setup.heads(layers=layers, heads=heads, positions=positions, per_position=per_position)
