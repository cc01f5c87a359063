"""Expert-level analyses: saliency (frequency, EAN, REAP, EASY-EP) and pruning sets, super experts
and the sink test, risk difference between prompt sets (for steering), the top-k truncation lens and
top-rank knockout, router geometry. Formulas: README "Definitions"."""

from ernie_lab.experts.collect import ExpertSums, expert_sums
from ernie_lab.experts.cost import saliency_overhead
from ernie_lab.experts.geometry import router_cosines, router_geometry
from ernie_lab.experts.plots import (
    plot_knockout,
    plot_risk_difference,
    plot_saliency,
    plot_saliency_vs_importance,
    plot_super_experts,
    plot_truncation_lens,
)
from ernie_lab.experts.risk import (
    forced_weights,
    risk_difference,
    risk_frame,
    selection_rate,
    steering_sets,
    token_marks,
)
from ernie_lab.experts.saliency import pruning_sets, saliency, saliency_frame, saliency_vs_importance, spearman
from ernie_lab.experts.steer import DEFAULT_STRENGTHS, steering_dose
from ernie_lab.experts.super import sink_test, super_experts, super_frame
from ernie_lab.experts.truncation import (
    knockout_topk,
    topk_knockout,
    truncate_topk,
    truncated_weights,
    truncation_lens,
)

__all__ = [
    "ExpertSums",
    "expert_sums",
    "saliency_overhead",
    "saliency",
    "saliency_frame",
    "pruning_sets",
    "saliency_vs_importance",
    "spearman",
    "super_experts",
    "super_frame",
    "sink_test",
    "risk_difference",
    "risk_frame",
    "selection_rate",
    "token_marks",
    "steering_sets",
    "steering_dose",
    "DEFAULT_STRENGTHS",
    "forced_weights",
    "truncation_lens",
    "truncated_weights",
    "truncate_topk",
    "topk_knockout",
    "knockout_topk",
    "router_cosines",
    "router_geometry",
    "plot_saliency",
    "plot_saliency_vs_importance",
    "plot_super_experts",
    "plot_risk_difference",
    "plot_truncation_lens",
    "plot_knockout",
]
