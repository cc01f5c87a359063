"""Expert ablation: effects on loss, per-expert importance, pruning curves, direct logit attribution."""

from ernie_lab.ablation.dla import direct_logit_attribution
from ernie_lab.ablation.effects import ablation_effect, ablation_hooks, expert_importance, pruning_curve, token_nll
from ernie_lab.ablation.plots import plot_dla, plot_importance, plot_pruning_curve

__all__ = [
    "token_nll",
    "ablation_hooks",
    "ablation_effect",
    "expert_importance",
    "pruning_curve",
    "direct_logit_attribution",
    "plot_importance",
    "plot_pruning_curve",
    "plot_dla",
]
