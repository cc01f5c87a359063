"""Activation patching: clean/corrupted setups, residual/head/routing/expert grids, attribution."""

from ernie_lab.patching.attribution import (
    attribution_agreement,
    attribution_patching,
    compare_attribution,
    merge_effects,
)
from ernie_lab.patching.grids import PatchingSetup, patch_heads, patch_residual
from ernie_lab.patching.metrics import Metric, kl_metric, logit_diff, loss_metric, reduce_metric
from ernie_lab.patching.moe import patch_experts, patch_routing
from ernie_lab.patching.plots import plot_attribution_vs_exact, plot_head_grid, plot_patching_heatmap
from ernie_lab.patching.setup import RESIDUAL_HOOKS

__all__ = [
    "PatchingSetup",
    "RESIDUAL_HOOKS",
    "Metric",
    "kl_metric",
    "logit_diff",
    "loss_metric",
    "reduce_metric",
    "patch_heads",
    "patch_residual",
    "patch_experts",
    "patch_routing",
    "attribution_patching",
    "compare_attribution",
    "attribution_agreement",
    "merge_effects",
    "plot_patching_heatmap",
    "plot_head_grid",
    "plot_attribution_vs_exact",
]
