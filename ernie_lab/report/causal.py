"""Report runners for activation patching and expert ablation (README, Definitions). Each runner takes the
report :class:`~ernie_lab.report.context.Context`, the section's resolved options and the
:class:`~ernie_lab.report.context.Section` to fill."""

from __future__ import annotations

import pandas as pd

from ernie_lab import ablation as ab
from ernie_lab import patching as pt
from ernie_lab.plots import bar_figure, diverging_heatmap
from ernie_lab.report.context import Context, Section, describe_pairs, normalise_params
from ernie_lab.report.spec import SpecError


# --------------------------------------------------------------------------------------- patching
def _residual(ctx: Context, opts: dict, hook: str) -> pd.DataFrame:
    """The exact residual grid of ``hook`` for these pairs (computed once per report)."""
    setup, _ = ctx.patching(opts)
    key = ("residual", opts["dataset"], opts["task"], opts["n_pairs"], hook)
    return ctx.memo(key, lambda: setup.residual(hook))


def run_residual_patching(ctx: Context, opts: dict, sec: Section) -> None:
    setup, batch = ctx.patching(opts)
    sec.note(describe_pairs(setup, batch))
    frames = []
    for hook in opts["hooks"]:
        df = _residual(ctx, opts, hook)
        frames.append(df)
        sec.figure(hook, pt.plot_patching_heatmap(df), f"blocks.L.hook_{hook}, per layer and position")
    sec.table("grid", pd.concat(frames, ignore_index=True), "metric: patched mean logit difference; effect: normalised")


def run_head_patching(ctx: Context, opts: dict, sec: Section) -> None:
    setup, batch = ctx.patching(opts)
    sec.note(describe_pairs(setup, batch))
    df = setup.heads()
    sec.table("heads", df, "one head's hook_z patched at every position")
    sec.figure("heads", pt.plot_head_grid(df), "normalised effect per layer and head")


def run_routing_patching(ctx: Context, opts: dict, sec: Section) -> None:
    setup, batch = ctx.patching(opts)
    sec.note(describe_pairs(setup, batch))
    df = setup.routing()
    sec.table("routing", df, "n_rerouted: prompt positions whose expert set differs between the runs")
    sec.figure(
        "routing",
        bar_figure([f"L{L}" for L in df["layer"]], df["effect"], "routing patching", "effect", xlabel="layer"),
    )
    if opts["per_position"]:
        by_pos = setup.routing(per_position=True)
        sec.table("routing_by_position", by_pos, "routing patched at one position at a time")
        sec.figure("routing_by_position", pt.plot_patching_heatmap(by_pos, title="routing patching: effect"))


def run_expert_patching(ctx: Context, opts: dict, sec: Section) -> None:
    setup, batch = ctx.patching(opts)
    sec.note(describe_pairs(setup, batch))
    layers = ctx.moe_layers(opts["layers"], f"analyses.{sec.id}.layers")
    df = setup.experts(layers=layers)
    sec.table("experts", df, "n_positions: prompt positions where the expert runs in both runs (0 = nothing patched)")
    sec.figure("experts", diverging_heatmap(df, "layer", "expert", "effect", "expert-output patching: effect"))


def run_attribution(ctx: Context, opts: dict, sec: Section) -> None:
    setup, batch = ctx.patching(opts)
    sec.note(describe_pairs(setup, batch))
    hook = opts["hook"]
    if hook not in pt.RESIDUAL_HOOKS:
        raise SpecError(f"analyses.{sec.id}.hook: must be one of {pt.RESIDUAL_HOOKS}, got {hook!r}")
    exact = _residual(ctx, opts, hook)
    estimate = setup.attribution(hook)
    merged = pt.merge_effects(exact, estimate)
    sec.table("comparison", merged, "normalised effect: exact patching vs attribution patching")
    sec.figure("scatter", pt.plot_attribution_vs_exact(exact, estimate), f"hook_{hook}, every layer and position")
    try:
        fit = pt.attribution_agreement(exact, estimate)
        sec.note(
            f"Attribution vs exact over {fit['n']} (layer, position) cells: Pearson r = {fit['r']:.4f}; "
            f"least-squares slope through the origin = {fit['slope']:.4f} (1 = no systematic under- or "
            f"over-estimate); R² against y = x = {fit['r2_identity']:.4f}."
        )
    except ValueError as err:  # fewer than two finite points
        sec.note(str(err))


def run_dla(ctx: Context, opts: dict, sec: Section) -> None:
    setup, batch = ctx.patching(opts)
    df = ab.direct_logit_attribution(ctx.model, batch.clean, batch.answer, batch.distractor)
    sec.table("dla", df, "direct contribution of each component, per clean prompt (batch row)")
    sec.figure("dla", ab.plot_dla(df, top=opts["top"]), "first clean prompt")
    diffs = ", ".join(f"{d:.4f}" for d in df.attrs["logit_diff"])
    sec.note(f"Clean prompts of task {batch.task!r}; logit differences (answer - distractor): {diffs}.")


# --------------------------------------------------------------------------------------- ablation
def _importance(ctx: Context, dataset: str, layers: list[int], mode: str) -> pd.DataFrame:
    """Importance rows of ``layers`` (ranked on one half of the texts, measured on the other); each
    (dataset, layer, mode) is computed once per report, the missing layers together in one run (one
    base pass; a layer's rows do not depend on which layers share the run)."""
    data = ctx.texts(dataset)
    missing = [L for L in layers if not ctx.has(("importance", dataset, L, mode))]
    if missing:
        df = ab.expert_importance(
            ctx.model, data.texts, missing, mode, tokenizer=ctx.tokenizer, batch_size=ctx.batch_size, progress=False,
            seed=ctx.spec["seed"],
        )  # fmt: skip
        for L in missing:
            ctx.memo(("importance", dataset, L, mode), lambda L=L: df[df["layer"] == L].reset_index(drop=True))
    return pd.concat([ctx.memo(("importance", dataset, L, mode), None) for L in layers], ignore_index=True)


def run_expert_importance(ctx: Context, opts: dict, sec: Section) -> None:
    layers = ctx.moe_layers(opts["layers"], f"analyses.{sec.id}.layers")
    df = _importance(ctx, opts["dataset"], layers, opts["mode"])
    sec.table("importance", df, "rank from the discover half; Δloss and its interval on the other half")
    experts = df[~df["control"]]
    above = experts[experts["ci_low"] > 0]
    sec.note(
        f"{df['split'].iloc[0]}. {len(above)} of {len(experts)} experts raise the loss with a bootstrap interval "
        "above 0; control rows: random experts of the same layer (the noise floor)."
    )
    if len(layers) > 1:
        sec.figure("all_layers", ab.plot_importance(df), "Δloss per layer and expert")
    for L in layers:
        sec.figure(f"layer{L}", ab.plot_importance(df, layer=L), f"layer {L}, experts by importance")


def run_pruning_curve(ctx: Context, opts: dict, sec: Section) -> None:
    layer = ctx.moe_layers(opts["layer"], f"analyses.{sec.id}.layer")[0]
    data = ctx.texts(opts["dataset"])
    importance = None
    if opts["order_by"] == "importance":  # same dataset, same split: ranked on the discover half
        importance = _importance(ctx, opts["dataset"], [layer], opts["mode"])
    df = ab.pruning_curve(
        ctx.model, data.texts, layer, opts["order_by"], opts["steps"], opts["mode"], importance=importance,
        tokenizer=ctx.tokenizer, batch_size=ctx.batch_size, progress=False, seed=ctx.spec["seed"],
    )  # fmt: skip
    sec.table("curve", df, "ablated: the experts ablated together at each step; random: the control")
    sec.figure("loss", ab.plot_pruning_curve(df), f"layer {layer}, ordered by {opts['order_by']}")


def run_ablation_effect(ctx: Context, opts: dict, sec: Section) -> None:
    data = ctx.texts(opts["dataset"])
    experts = normalise_params(opts["experts"], ctx.tokenizer)
    if not isinstance(experts, dict):
        raise SpecError(f"analyses.{sec.id}.experts: must map layer -> [expert, ...]")
    ctx.moe_layers(list(experts), f"analyses.{sec.id}.experts")
    df = ab.ablation_effect(
        ctx.model, data.texts, experts, opts["mode"], groups=data.groups, tokenizer=ctx.tokenizer,
        batch_size=ctx.batch_size, progress=False, seed=ctx.spec["seed"],
    )  # fmt: skip
    sec.table("effect", df, "mean NLL per predicted token without and with the ablation; control: random experts")
    sec.figure("delta_loss", ab.plot_ablation_effect(df))


RUNNERS = {
    "residual_patching": run_residual_patching,
    "head_patching": run_head_patching,
    "routing_patching": run_routing_patching,
    "expert_patching": run_expert_patching,
    "attribution": run_attribution,
    "dla": run_dla,
    "expert_importance": run_expert_importance,
    "pruning_curve": run_pruning_curve,
    "ablation_effect": run_ablation_effect,
}
