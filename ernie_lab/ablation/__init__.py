"""Expert ablation: effects on loss, per-expert importance, pruning curves, direct logit attribution."""

from ernie_lab.ablation.core import ablation_hooks, token_nll
from ernie_lab.ablation.dla import direct_logit_attribution
from ernie_lab.ablation.effects import ablation_effect, expert_importance
from ernie_lab.ablation.plots import plot_ablation_effect, plot_dla, plot_importance, plot_pruning_curve
from ernie_lab.ablation.pruning import pruning_curve

__all__ = [
    "token_nll",
    "ablation_hooks",
    "ablation_effect",
    "expert_importance",
    "pruning_curve",
    "direct_logit_attribution",
    "plot_importance",
    "plot_ablation_effect",
    "plot_pruning_curve",
    "plot_dla",
]
