"""What each column of a report table means: one glossary, shown under every table of the page.

A column missing here is listed as "not described" in the page, and the report tests fail on it, so a
new analysis brings its column descriptions along. Formulas: README, *Definitions*.
"""

from __future__ import annotations

from collections.abc import Iterable

COLUMNS = {
    # keys
    "layer": "layer index (MoE layers for routing statistics)",
    "layer_b": "the layer of the other run it is compared with",
    "expert": "routed expert index",
    "i": "expert of the row (co-activation from i)",
    "j": "expert of the column (co-activation to j)",
    "group": "token group (the document's domain; 'all' = every token)",
    "hook": "hook point patched (blocks.L.hook_<hook>)",
    "pos": "token position in the prompt",
    "token": "the token (␣ = a space; patching: clean/corrupt where they differ, … = varies across pairs)",
    "head": "attention head",
    "batch": "prompt (row of the batch)",
    "component": "model part the contribution comes from",
    "slot": "top-k slot (0 = highest weight)",
    "label": "readable name of the component",
    "rank": "rank within its layer / expert (1 = largest)",
    "token_id": "token id",
    "mode": "ablation mode (zero, reroute or mean)",
    "direction": "denoising: clean activations patched into the corrupt run; noising: the reverse",
    "experts": "experts ablated together ({layer: [expert, ...]}); control rows: the random draws",
    "control": "True: a random-expert control (same layer and count, draws averaged), the noise floor to beat",
    "ci_low": "lower end of the bootstrap interval over sequences (95% by default)",
    "ci_high": "upper end of the bootstrap interval over sequences (95% by default)",
    "n_seq": "sequences the effect and its interval are measured on",
    "n_seq_a": "set-A sequences rd_heldout is measured on",
    "n_seq_b": "set-B sequences rd_heldout is measured on",
    "split": "which texts picked the experts and which measured them",
    "held_out": "True: the curve is measured on texts the ranking did not see",
    "delta_loss_discover": "Δloss on the discover half, which sets the rank",
    "rd_heldout": "risk difference on the evaluate half (texts that did not pick the expert)",
    "ablated": "experts ablated together at this step",
    "order_by": "what ranks the experts pruned first",
    # counts
    "n_tokens": "real tokens counted (padding excluded)",
    "count": (
        "tokens routed to the expert (co-activation: to both i and j; transitions: top-1 i at layer_a and j "
        "at layer_b; paths: tokens taking the path)"
    ),
    "n": "tokens summarised",
    "n_v": "times the token occurs in the dataset",
    "hits": "occurrences of the token routed to the expert",
    "n_positions": "prompt positions where the expert runs in both runs (0 = nothing patched)",
    "n_rerouted": "prompt positions whose expert set differs between the clean and corrupted runs",
    "n_ablated": "experts ablated",
    "n_changed": "tokens whose expert set the correction bias changes",
    # routing statistics
    "load": "share of routing slots going to the expert (uniform = 1/E)",
    "wload": "mean routing weight the expert gets per token (weighted load)",
    "mean_prob": "mean router probability of the expert",
    "cv": "coefficient of variation of the load (0 = even)",
    "max_vio": "(max load - 1/E) / (1/E): how far the busiest expert exceeds an even share",
    "load_entropy": "entropy of the load / log E (1 = even)",
    "frac_changed": "share of tokens whose expert set the correction bias changes",
    "mean_swapped": "mean number of a token's k experts that the correction bias swaps in",
    "frac": "count / tokens routed to i (paths: count / all tokens)",
    "spec": "share of the group's tokens routed to the expert (uniform = k/E)",
    "lift": "how many times more often than uniform (1 = uniform)",
    "vspec": "hits / n_v: share of the token's occurrences routed to the expert",
    "entropy": "mean router entropy / log E (1 = the router cannot decide)",
    "value": "the statistic summarised (router entropy / log E, or top-k confidence)",
    "mean": "mean over tokens",
    "std": "standard deviation over tokens",
    "q10": "10th percentile over tokens",
    "median": "median over tokens",
    "q90": "90th percentile over tokens",
    "shared_norm": "mean L2 norm of the shared experts' output",
    "routed_norm": "mean L2 norm of the routed experts' weighted output",
    "norm_ratio": "shared_norm / routed_norm",
    "cosine": (
        "mean cosine between the shared and routed outputs (truncation lens: between the MoE output with "
        "the top-k' experts and with all k)"
    ),
    "load_base": "load without the recipe",
    "load_other": "load with the recipe",
    "diff": "load_other - load_base",
    "overlap": (
        "mean share of a token's k experts that both runs select (persistence: share of consecutive token "
        "pairs whose expert sets intersect)"
    ),
    "identical": "share of tokens with the same expert set in both runs",
    # patching
    "metric": "mean patched metric (logit difference answer - distractor at the last position)",
    "effect": "normalised effect: 0 = no change, 1 = fully restored (README, Definitions)",
    "effect_exact": "normalised effect of exact activation patching",
    "effect_attr": "normalised effect estimated by attribution patching",
    # ablation
    "nll_base": "mean next-token NLL (nats) without the intervention",
    "nll_ablated": "mean next-token NLL (nats) with the experts ablated",
    "nll_recipe": "mean next-token NLL (nats) with the recipe",
    "delta_loss": "NLL with the intervention - NLL without (nats; > 0 = the model got worse)",
    "kl": "mean KL(p_base || p_ablated) of the next-token distribution (nats)",
    "frac_ablated": "share of the layer's experts ablated",
    "loss": "mean next-token NLL (nats)",
    "weight": "routing weight of the expert for that token",
    "contribution": "direct contribution to logit[answer] - logit[distractor]",
    # expert-level analyses and routing additions (README, Definitions)
    "frequency": "|X_e| / N: share of tokens that select the expert",
    "weighted_frequency": "sum of the expert's routing weights / N",
    "ean_mean": "mean L2 norm of the expert's unweighted output over the tokens that select it",
    "reap": "REAP: mean over the tokens that select the expert of weight x L2 norm of its output",
    "easy_ep": "EASY-EP: sum of weight x output norm x (1 - cos(MoE input, MoE output)) / N",
    "peak": "largest |output| of the expert over tokens and channels",
    "peak_rank": "rank of the peak among every expert of the model (1 = loudest)",
    "is_super": "peak above both the quantile of all peaks and rel x the largest peak",
    "max_norm_base": "largest residual-stream norm (resid_post) of the layer without the ablation",
    "max_norm_ablated": "largest residual-stream norm of the layer with the super experts ablated",
    "first_attn_base": "mean attention mass on the first position without the ablation",
    "first_attn_ablated": "mean attention mass on the first position with the super experts ablated",
    "p_a": "share of set A's tokens that select the expert",
    "p_b": "share of set B's tokens that select the expert",
    "rd": "risk difference p_a - p_b (> 0: the expert prefers set A)",
    "n_a": "tokens of set A counted",
    "n_b": "tokens of set B counted",
    "run": "generation without or with expert steering",
    "continuation": "greedy continuation of the prompt",
    "mean_weight": "mean routing weight the forced-on expert gets (its renormalised probability)",
    "min_weight": "smallest routing weight the forced-on expert gets",
    "n_pairs": "consecutive token pairs of one sequence counted",
    "top1_repeat": "share of consecutive token pairs with the same top-1 expert",
    "top1_repeat_chance": "the same for random routing: 1/E",
    "overlap_chance": "the same for random routing: 1 - C(E-k, k) / C(E, k)",
    "jaccard": "mean Jaccard index of the expert sets of consecutive tokens",
    "jaccard_chance": "expected Jaccard index of two random k-sets",
    "layer_a": "the earlier layer of the pair",
    "prob": "P(top-1 expert j at layer_b | top-1 expert i at layer_a)",
    "distance": "layer_b - layer_a",
    "nmi": "normalised mutual information of the two layers' top-1 experts (0 = independent, 1 = determined)",
    "layers": "the MoE layers a path runs through",
    "path": "top-1 expert at each of those layers, joined by >",
    "examples": "tokens that took the path",
    "share": "share of the router-logit variance the component explains (the shares sum to 1)",
    "mean_abs": "mean |contribution| of the component to the router logits",
    "k_prime": "experts kept per token (the k' highest-weight ones, weights renormalised)",
    "nll": "mean next-token NLL (nats)",
    "delta_nll": "nll - nll of the unmodified model (nats; > 0 = worse)",
    "r": "top-ranked experts dropped per token (replaced by the next r)",
    "mean_abs_cos": "mean |cosine| between different experts' normalised router rows",
    "max_abs_cos": "largest |cosine| between two experts' router rows",
    "mean_cos": "mean cosine between different experts' router rows",
    "coact_rho": "Spearman correlation of router-row cosines with co-activation counts",
    "score": "the saliency column compared",
    "rho": "Spearman correlation of the score with the ablation Δloss over the layer's experts",
    "n_experts": "experts compared",
}


def describe_columns(columns: Iterable[str]) -> list[tuple[str, str]]:
    """``(column, meaning)`` for each column; an unknown column is marked "not described"."""
    return [(str(c), COLUMNS.get(str(c), "not described")) for c in columns]
