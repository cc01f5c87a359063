"""Report runners for the routing statistics (README, Definitions: "Routing statistics") and for routing
under a hook recipe. Each runner takes the report :class:`~ernie_lab.report.context.Context`, the
section's resolved options and the :class:`~ernie_lab.report.context.Section` to fill."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ernie_lab import routing as rt
from ernie_lab.ablation.core import run_per_sequence
from ernie_lab.ablation.effects import summarise
from ernie_lab.io.datasets import as_sequences
from ernie_lab.plots import diverging_heatmap, line_figure
from ernie_lab.recipes import load_recipe
from ernie_lab.report.context import Context, Section, normalise_params
from ernie_lab.routing.stats import load_difference


# --------------------------------------------------------------------------------------- helpers
def recipe_loss(model, texts, tokenizer, groups, fwd_hooks, batch_size: int, seed: int) -> pd.DataFrame:
    """Mean next-token NLL over the predicted tokens of ``texts`` without and with ``fwd_hooks``, overall
    and per group, from one shared base pass (the hooked runs start at their first edited block), with
    the bootstrap interval of the change over sequences.

    Columns: group ("all" first), n_tokens, n_seq, nll_base, nll_recipe, delta_loss, ci_low, ci_high.
    """
    sequences = as_sequences(texts, tokenizer)
    per = run_per_sequence(model, sequences, [list(fwd_hooks)], batch_size, progress=False)
    labels = np.asarray(["all"] * len(sequences) if groups is None else list(groups), dtype=object)
    names = ["all", *sorted({str(g) for g in labels} - {"all"})]
    rows = []
    for i, g in enumerate(names):
        where = np.arange(len(sequences)) if g == "all" else np.flatnonzero(labels.astype(str) == g)
        s = summarise(per, where, per.ablated.numpy(), per.kl.numpy(), level=0.95, n_boot=1000, seed=seed + i)
        rows.append({"group": g, "n_tokens": s["n_tokens"], "n_seq": s["n_seq"], "nll_base": s["nll_base"],
                     "nll_recipe": s["nll_ablated"][0], "delta_loss": s["delta_loss"][0],
                     "ci_low": s["ci_low"][0], "ci_high": s["ci_high"][0]})  # fmt: skip
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------- runners
def run_expert_load(ctx: Context, opts: dict, sec: Section) -> None:
    r = ctx.routing(opts["dataset"])
    df = rt.expert_load(r)
    sec.table("expert_load", df, "per (layer, expert): count, load, weighted load, mean router probability")
    for value in opts["values"]:
        sec.figure(f"{value}_heatmap", rt.plot_load_heatmap(df, value), f"{value} per MoE layer and expert")
    sec.note(f"{r.n_tokens} tokens of dataset {opts['dataset']!r}; E = {r.n_experts}, k = {r.k}.")


def run_balance(ctx: Context, opts: dict, sec: Section) -> None:
    r = ctx.routing(opts["dataset"])
    df = rt.balance(r).merge(rt.bias_effect(r)[["layer", "frac_changed", "mean_swapped"]], on="layer")
    sec.table("balance", df, "cv, max_vio and load_entropy of the load; frac_changed: tokens the bias re-routes")
    panels = [["cv", "max_vio"], ["load_entropy", "frac_changed"]]
    sec.figure("balance", line_figure(df, "layer", panels, ["imbalance (0 = even)", "load entropy, bias effect"]))


def run_router_entropy(ctx: Context, opts: dict, sec: Section) -> None:
    r = ctx.routing(opts["dataset"])
    entropy, confidence = rt.router_entropy(r), rt.topk_confidence(r)
    summary = rt.layer_summary(entropy, "entropy").assign(value="entropy")
    summary = pd.concat([summary, rt.layer_summary(confidence, "confidence").assign(value="confidence")])
    sec.table("summary", summary, "per-layer mean, std and quantiles of the per-token values")
    if "group" in entropy:
        by_group = entropy.groupby(["layer", "group"], sort=True)["entropy"].mean().reset_index()
        sec.table("entropy_by_group", by_group, "mean normalised router entropy per layer and token group")
    sec.figure("entropy", rt.plot_entropy_by_layer(entropy), "normalised router entropy per token")
    sec.figure("confidence", rt.plot_entropy_by_layer(confidence, "confidence"), "top-k probability mass per token")


def run_coactivation(ctx: Context, opts: dict, sec: Section) -> None:
    r = ctx.routing(opts["dataset"])
    layers = ctx.moe_layers(opts["layers"], f"analyses.{sec.id}.layers")
    df = pd.concat([rt.coactivation(r, L) for L in layers], ignore_index=True)
    sec.table("coactivation", df, "count: tokens routed to both i and j; frac: count / tokens routed to i")
    for L in layers:
        sec.figure(f"layer{L}", rt.plot_coactivation(df, L), f"layer {L}")


def run_domain_specialisation(ctx: Context, opts: dict, sec: Section) -> None:
    r = ctx.routing(opts["dataset"])
    if r.groups is None:
        sec.note(f"dataset {opts['dataset']!r} has no groups; nothing to compare.")
        return
    layers = ctx.moe_layers(opts["layers"], f"analyses.{sec.id}.layers")
    df = rt.domain_specialisation(r)
    df = df[df["layer"].isin(layers)]
    sec.table("specialisation", df, "spec = share of the group's tokens routed to the expert; lift = spec / (k/E)")
    for L in layers:
        sec.figure(f"layer{L}", rt.plot_specialisation(df, L, top=opts["top"]), f"layer {L}")


def run_vocab_specialisation(ctx: Context, opts: dict, sec: Section) -> None:
    r = ctx.routing(opts["dataset"])
    layers = ctx.moe_layers(opts["layers"], f"analyses.{sec.id}.layers")
    try:
        df = rt.vocab_specialisation(r, ctx.tokenizer, min_count=opts["min_count"], top=opts["top"], key=opts["key"])
    except ValueError as err:  # too few tokens (e.g. a quick run): say so instead of failing the report
        sec.note(str(err))
        return
    sec.table("top_tokens", df[df["layer"].isin(layers)], f"the {opts['top']} tokens with the highest lift per expert")


def run_shared_vs_routed(ctx: Context, opts: dict, sec: Section) -> None:
    df = rt.shared_vs_routed(ctx.routing(opts["dataset"]))
    sec.table("shared_vs_routed", df, "mean L2 norms, their ratio (shared / routed) and mean cosine")
    panels = [["shared_norm", "routed_norm"], ["norm_ratio"], ["cosine"]]
    titles = ["mean L2 norm of the outputs", "shared / routed norm", "mean cosine"]
    sec.figure("shared_vs_routed", line_figure(df, "layer", panels, titles))


def run_recipe_comparison(ctx: Context, opts: dict, sec: Section) -> None:

    data = ctx.texts(opts["dataset"])
    params = normalise_params(opts["params"] or {}, ctx.tokenizer)
    hooks = load_recipe(opts["recipe"]).make_hooks(ctx.model, **params)
    base = ctx.routing(opts["dataset"])
    other = rt.collect_routing(
        ctx.model, data.texts, ctx.tokenizer, ctx.batch_size, groups=data.groups, progress=False, fwd_hooks=hooks
    )
    diff = load_difference(base, other)
    sec.table("load_difference", diff, "load without (base) and with the recipe (other) per expert")
    agreement = rt.routing_agreement(base, other)
    sec.table("agreement", agreement, "overlap: mean share of a token's k experts kept; identical: same set")
    loss = recipe_loss(ctx.model, data.texts, ctx.tokenizer, data.groups, hooks, ctx.batch_size, ctx.spec["seed"])
    sec.table("loss", loss, "mean next-token NLL per group without and with the recipe; interval over sequences")
    sec.figure(
        "load_difference", diverging_heatmap(diff, "layer", "expert", "diff", f"load change under {opts['recipe']}")
    )
    changed = np.round(agreement["identical"].to_numpy(), 4).tolist()
    sec.note(f"recipe {opts['recipe']!r} with params {opts['params']}; share of tokens routed identically: {changed}.")


RUNNERS = {
    "expert_load": run_expert_load,
    "balance": run_balance,
    "router_entropy": run_router_entropy,
    "coactivation": run_coactivation,
    "domain_specialisation": run_domain_specialisation,
    "vocab_specialisation": run_vocab_specialisation,
    "shared_vs_routed": run_shared_vs_routed,
    "recipe_comparison": run_recipe_comparison,
}
