"""Report runners for the expert-level analyses and the routing additions (README "Definitions", "Expert-level
analyses"). Each runner takes the report :class:`~ernie_lab.report.context.Context`, the section's
resolved options and the :class:`~ernie_lab.report.context.Section` to fill."""

from __future__ import annotations

import warnings

import pandas as pd
import torch

from ernie_lab import experts as ex
from ernie_lab import routing as rt
from ernie_lab.interventions import steer_experts
from ernie_lab.io.datasets import as_sequences, iter_batches
from ernie_lab.plots import line_figure
from ernie_lab.report.causal import _importance
from ernie_lab.report.context import Context, Section
from ernie_lab.report.spec import SpecError


def _sums(ctx: Context, dataset: str) -> ex.ExpertSums:
    """The per-expert sums of a text dataset (one hooked pass, shared by saliency and super experts)."""
    data = ctx.texts(dataset)
    compute = lambda: ex.expert_sums(ctx.model, data.texts, ctx.tokenizer, ctx.batch_size, progress=False)
    return ctx.memo(("expert_sums", dataset), compute)


def run_expert_saliency(ctx: Context, opts: dict, sec: Section) -> None:
    sal = ex.saliency_frame(_sums(ctx, opts["dataset"]))
    sec.table("saliency", sal, "frequency, weighted frequency, EAN, REAP and EASY-EP per (layer, expert)")
    sec.figure("saliency", ex.plot_saliency(sal, opts["value"]), f"{opts['value']} per MoE layer and expert")
    prune = ex.pruning_sets(sal, opts["value"], n=opts["prune"])
    sec.note(f"The {opts['prune']} least salient experts per layer by {opts['value']}: {prune}.")
    layers = ctx.moe_layers(opts["importance_layers"], f"analyses.{sec.id}.importance_layers")
    if layers:
        importance = _importance(ctx, opts["dataset"], layers, "zero")
        rho = ex.saliency_vs_importance(sal, importance)
        sec.table("rank_agreement", rho, "Spearman rho per layer between each score and the zero-ablation Δloss")
        sec.figure("rank_agreement", ex.plot_saliency_vs_importance(rho), "does the score predict the Δloss?")


def run_super_experts(ctx: Context, opts: dict, sec: Section) -> None:
    sup = ex.super_frame(_sums(ctx, opts["dataset"]), opts["quantile"], opts["rel"])
    sec.table("peaks", sup.sort_values("peak_rank"), "peak |output| per expert, loudest first")
    sec.figure("peaks", ex.plot_super_experts(sup), "peak |output| per expert; red: super experts")
    hot = sup[sup["is_super"]]
    if hot.empty:
        sec.note("No expert passes both thresholds: no super expert on this data.")
        return
    sink = ex.sink_test(ctx.model, ctx.texts(opts["dataset"]).texts, hot, ctx.tokenizer, ctx.batch_size, False)
    sec.table("sink_test", sink, "per layer, without and with the super experts zero-ablated")
    panels = [["max_norm_base", "max_norm_ablated"], ["first_attn_base", "first_attn_ablated"]]
    sec.figure("sink_test", line_figure(sink, "layer", panels, ["max residual norm", "attention on the first token"]))


def run_routing_persistence(ctx: Context, opts: dict, sec: Section) -> None:
    df = rt.persistence(ctx.routing(opts["dataset"]))
    sec.table("persistence", df, "consecutive tokens of one sequence; *_chance: uniform independent routing")
    panels = [["top1_repeat", "top1_repeat_chance"], ["overlap", "overlap_chance"], ["jaccard", "jaccard_chance"]]
    sec.figure("persistence", line_figure(df, "layer", panels, ["same top-1", "any expert shared", "Jaccard"]))


def run_expert_transitions(ctx: Context, opts: dict, sec: Section) -> None:
    r = ctx.routing(opts["dataset"])
    pair = ctx.moe_layers(opts["layers"], f"analyses.{sec.id}.layers")
    if len(pair) != 2:
        raise SpecError(f"analyses.{sec.id}.layers: name two MoE layers, got {pair}")
    trans = rt.transitions(r, *pair)
    sec.table("transitions", trans, f"P(top-1 at layer {pair[1]} = j | top-1 at layer {pair[0]} = i) and its lift")
    sec.figure("transitions", rt.plot_transitions(trans, "lift"), "lift over independence")
    nmi = rt.transition_nmi(r)
    sec.table("nmi", nmi, "normalised mutual information of the top-1 choices, every layer pair")
    sec.figure("nmi", rt.plot_nmi_by_distance(nmi))
    paths = rt.paths(r, top=opts["top"], tokenizer=ctx.tokenizer)
    sec.table("paths", paths.assign(examples=paths["examples"].map(" | ".join)), "most frequent top-1 paths")


def run_router_sources(ctx: Context, opts: dict, sec: Section) -> None:
    layer = ctx.moe_layers(opts["layer"], f"analyses.{sec.id}.layer")[-1]
    sequences = as_sequences(ctx.texts(opts["dataset"]).texts, ctx.tokenizer)[: opts["n_texts"]]
    ids, mask, _ = next(iter_batches(sequences, len(sequences), ctx.model.config.pad_token_id or 0))
    names, parts = rt.router_logit_sources(ctx.model, ids, layer, mask, split_experts=opts["split_experts"])
    summary = rt.source_summary(names, parts, mask)
    sec.table("sources", summary, f"share of layer {layer}'s router-logit variance per residual component")
    sec.figure("sources", rt.plot_router_sources(summary), f"layer {layer}, {int(mask.sum())} tokens")


def run_risk_difference(ctx: Context, opts: dict, sec: Section) -> None:
    r = ctx.routing(opts["dataset"])
    if r.groups is None:
        raise SpecError(f"analyses.{sec.id}: dataset {opts['dataset']!r} has no groups to compare")
    groups = sorted(set(r.groups))
    a, b = opts["group_a"] or groups[0], opts["group_b"] or groups[-1]
    if a not in groups or b not in groups:
        raise SpecError(f"analyses.{sec.id}: groups {a!r}, {b!r} must be among {groups}")
    rd = ex.risk_frame(r, torch.as_tensor(r.groups == a), r, torch.as_tensor(r.groups == b), seed=ctx.spec["seed"])
    sec.table(
        "risk_difference",
        rd,
        f"p_a: selection rate on {a!r}, p_b: on {b!r}; rd = p_a - p_b on the discover half, rd_heldout on the other",
    )
    sec.figure("risk_difference", ex.plot_risk_difference(rd, opts["top"]), f"set A = {a!r}, set B = {b!r}")
    on, off = ex.steering_sets(rd, n=opts["steer"])
    data = ctx.texts(opts["dataset"])
    prompt = next(t for t, g in zip(data.texts, data.groups, strict=True) if g == b)
    ids = torch.tensor([ctx.tokenizer.encode(prompt)[: opts["prompt_tokens"]]])
    rows = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        steered = steer_experts(ctx.model, on=on, off=off)
    for w in caught:
        sec.note(f"Warning: {w.message}")
    for label, hooks in (("plain", []), (f"steered towards {a}", steered)):
        out = ctx.model.generate(ids, max_new_tokens=opts["max_new_tokens"], fwd_hooks=hooks, progress=False)
        rows.append({"run": label, "continuation": ctx.tokenizer.decode(out[0, ids.shape[1] :].tolist())})
    sec.table("steering", pd.DataFrame(rows), f"greedy continuation of a {b!r} prompt; on={on}, off={off}")
    forced = ex.forced_weights(ctx.model, ids, on, off)
    sec.table("forced_weights", forced, "mixing weight of each forced-on expert on the prompt (its renormalised prob)")


def run_truncation_lens(ctx: Context, opts: dict, sec: Section) -> None:
    texts = ctx.texts(opts["dataset"]).texts
    lens = ex.truncation_lens(ctx.model, texts, ctx.tokenizer, ctx.batch_size, progress=False)
    sec.table("lens", lens, "cosine: MoE output with the top-k' experts vs all k; nll: every layer truncated to k'")
    sec.figure("lens", ex.plot_truncation_lens(lens))
    knock = ex.topk_knockout(ctx.model, texts, tokenizer=ctx.tokenizer, batch_size=ctx.batch_size, progress=False)
    sec.table("knockout", knock, "mean NLL with each token's r top-ranked experts dropped in every MoE layer")
    sec.figure("knockout", ex.plot_knockout(knock))


def run_router_geometry(ctx: Context, opts: dict, sec: Section) -> None:
    geo = ex.router_geometry(ctx.model, ctx.routing(opts["dataset"]))
    sec.table("geometry", geo, "off-diagonal cosines of the normalised router rows; coact_rho: vs co-activation")
    sec.figure(
        "geometry", line_figure(geo, "layer", [["mean_abs_cos", "max_abs_cos"], ["coact_rho"]], ["cosines", "rho"])
    )


RUNNERS = {
    "expert_saliency": run_expert_saliency,
    "super_experts": run_super_experts,
    "routing_persistence": run_routing_persistence,
    "expert_transitions": run_expert_transitions,
    "router_sources": run_router_sources,
    "risk_difference": run_risk_difference,
    "truncation_lens": run_truncation_lens,
    "router_geometry": run_router_geometry,
}
