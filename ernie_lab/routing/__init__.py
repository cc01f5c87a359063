"""Routing: what the routers did over a dataset, its statistics and their plots.

``el.routing.collect_routing(model, data)`` gives a :class:`Routing` record; every statistic
(``el.routing.expert_load(r)``, ``persistence(r)``, ``transitions(r, a, b)``, ...) takes one and returns
a tidy DataFrame; plots take those. ``router_logit_sources`` splits a router's logits into residual
components from a forward pass.
"""

from ernie_lab.io.datasets import as_sequences, iter_batches
from ernie_lab.routing.collect import collect_routing
from ernie_lab.routing.persistence import jaccard_chance, overlap_chance, persistence
from ernie_lab.routing.plots import (
    plot_coactivation,
    plot_entropy_by_layer,
    plot_load_heatmap,
    plot_nmi_by_distance,
    plot_router_sources,
    plot_specialisation,
    plot_transitions,
)
from ernie_lab.routing.record import Routing
from ernie_lab.routing.sources import router_logit_sources, source_summary
from ernie_lab.routing.stats import (
    balance,
    bias_effect,
    coactivation,
    coactivation_matrix,
    domain_specialisation,
    expert_load,
    layer_summary,
    router_entropy,
    routing_agreement,
    shared_vs_routed,
    topk_confidence,
    vocab_specialisation,
)
from ernie_lab.routing.transitions import nmi, paths, transition_counts, transition_nmi, transitions

__all__ = [
    "Routing",
    "collect_routing",
    "as_sequences",
    "iter_batches",
    "expert_load",
    "balance",
    "router_entropy",
    "layer_summary",
    "topk_confidence",
    "bias_effect",
    "coactivation",
    "coactivation_matrix",
    "domain_specialisation",
    "vocab_specialisation",
    "routing_agreement",
    "shared_vs_routed",
    "plot_load_heatmap",
    "plot_coactivation",
    "plot_specialisation",
    "plot_entropy_by_layer",
    "persistence",
    "overlap_chance",
    "jaccard_chance",
    "transitions",
    "transition_counts",
    "transition_nmi",
    "nmi",
    "paths",
    "router_logit_sources",
    "source_summary",
    "plot_transitions",
    "plot_nmi_by_distance",
    "plot_router_sources",
]
