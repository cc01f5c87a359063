"""Notebook widgets: a routing explorer, a patching viewer, an ablation explorer, a steering explorer
and an attention explorer.

Each widget is a thin ipywidgets shell around plain functions that return HTML strings, DataFrames
or Figures (``routing_table``, ``routing_html``, ``topk_table``, ``patching_figure``,
``ablation_summary``, ``steered_continuations``, ``lens.attention_html``), so the logic is tested without a browser.
ipywidgets is imported only when a widget is built: ``pip install 'ernie-lab[widgets]'``.

Every widget returns an ``ipywidgets.VBox`` with a ``controls`` attribute naming its parts, e.g.
``w = routing_explorer(model, tok); w.controls.layer.value = 3`` updates it as a click would.
"""

from __future__ import annotations

import html
import io
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from ernie_lab import ablation as ab
from ernie_lab import experts as ex
from ernie_lab import lens
from ernie_lab.interventions import expert_mean_outputs, steer_experts
from ernie_lab.patching.plots import plot_head_grid, plot_patching_heatmap
from ernie_lab.plots import bar_figure, diverging_heatmap, sequence_tokens
from ernie_lab.routing import collect_routing, routing_agreement
from ernie_lab.routing.stats import load_difference

DEFAULT_TEXT = "The capital of Veloria is Mirren. 12+7=19"


def _ipywidgets():
    try:
        import ipywidgets
    except ImportError as err:
        raise ImportError("ernie_lab widgets need ipywidgets: pip install 'ernie-lab[widgets]'") from err
    return ipywidgets


# --------------------------------------------------------------------------------------- routing
def routing_table(model, tokenizer, text: str) -> pd.DataFrame:
    """Routing of one text: one row per (MoE layer, position, top-k slot).

    Columns: layer, pos, token, slot, expert, weight (renormalised), prob (router probability);
    within a (layer, pos) the slots are ordered by weight, highest first.
    """

    r = collect_routing(model, [text], tokenizer, progress=False)
    tokens = sequence_tokens(tokenizer, r.token_ids.tolist())  # characters split over tokens shown whole
    rows = []
    for li, L in enumerate(r.layers):
        weights, order = r.weights[li].sort(dim=-1, descending=True, stable=True)
        experts = r.idx[li].gather(-1, order)
        probs = r.probs[li].gather(-1, experts)
        for pos in range(r.n_tokens):
            for slot in range(r.k):
                rows.append(
                    {
                        "layer": L,
                        "pos": pos,
                        "token": tokens[pos],
                        "slot": slot,
                        "expert": int(experts[pos, slot]),
                        "weight": float(weights[pos, slot]),
                        "prob": float(probs[pos, slot]),
                    }
                )
    return pd.DataFrame(rows)


def expert_colour(expert: int, n_experts: int) -> str:
    """A light background colour per expert (tab20 up to 20 experts, evenly spaced hues beyond)."""
    from matplotlib import colormaps

    rgb = colormaps["tab20"](expert % 20)[:3] if n_experts <= 20 else colormaps["hsv"](expert / n_experts)[:3]
    return to_hex(tuple(0.55 * c + 0.45 for c in rgb))  # mixed with white so black text stays readable


def routing_html(table: pd.DataFrame, layer: int, n_experts: int) -> str:
    """The text as ``<span>`` tokens coloured by their top expert at ``layer`` (hover: the top-k)."""
    sub = table[table["layer"] == layer]
    if sub.empty:
        raise ValueError(f"layer {layer} is not in the routing table (layers {sorted(table['layer'].unique())})")
    spans = []
    for pos, rows in sub.groupby("pos", sort=True):
        top = rows.iloc[0]
        tip = ", ".join(f"E{int(r.expert)} {r.weight:.2f}" for r in rows.itertuples())
        shown = html.escape(str(top.token)).replace("\n", "↵<br>") or "&nbsp;"
        colour = expert_colour(int(top.expert), n_experts)
        spans.append(
            f'<span title="pos {pos}: {html.escape(tip)}" style="background:{colour};'
            f'padding:1px 2px;margin:1px;border-radius:3px;white-space:pre-wrap">{shown}</span>'
        )
    used = sorted(sub[sub["slot"] == 0]["expert"].unique())
    legend = " ".join(
        f'<span style="background:{expert_colour(int(e), n_experts)};padding:1px 4px;border-radius:3px">'
        f"E{int(e)}</span>"
        for e in used
    )
    return (
        f"<div style='font-family:monospace;line-height:1.9'>{''.join(spans)}</div>"
        f"<div style='font-size:0.85em;margin-top:4px'>layer {layer}, top expert per token: {legend}</div>"
    )


def topk_table(table: pd.DataFrame, layer: int) -> pd.DataFrame:
    """One row per position at ``layer``: pos, token, then expert_i / weight_i / prob_i per slot."""
    sub = table[table["layer"] == layer]
    wide = sub.pivot(index=["pos", "token"], columns="slot", values=["expert", "weight", "prob"])
    wide.columns = [f"{name}_{slot + 1}" for name, slot in wide.columns]
    order = [f"{n}_{s + 1}" for s in sorted(sub["slot"].unique()) for n in ("expert", "weight", "prob")]
    wide = wide[order]
    experts = [c for c in order if c.startswith("expert_")]
    wide[experts] = wide[experts].astype("int64")  # the pivot over mixed columns made them floats
    return wide.reset_index()


def routing_explorer(model, tokenizer, text: str = DEFAULT_TEXT):
    """A text box, a MoE-layer slider, the tokens coloured by their top expert and a top-k table.

    ``controls``: text (Textarea), layer (SelectionSlider), tokens (HTML), table (HTML).
    """
    w = _ipywidgets()
    layers = list(model.config.moe_layers)
    n_experts = model.config.moe_num_experts
    text_box = w.Textarea(value=text, description="text", continuous_update=False, layout=w.Layout(width="95%"))
    layer = w.SelectionSlider(options=layers, value=layers[0], description="MoE layer")
    tokens, table = w.HTML(), w.HTML()
    state: dict[str, Any] = {}

    def show(_=None) -> None:
        tokens.value = routing_html(state["table"], layer.value, n_experts)
        table.value = topk_table(state["table"], layer.value).to_html(index=False, float_format=lambda x: f"{x:.3f}")

    def recompute(_=None) -> None:
        state["table"] = routing_table(model, tokenizer, text_box.value or " ")
        show()

    text_box.observe(recompute, names="value")
    layer.observe(show, names="value")
    recompute()
    box = w.VBox([text_box, layer, tokens, table])
    box.controls = SimpleNamespace(text=text_box, layer=layer, tokens=tokens, table=table)
    return box


# --------------------------------------------------------------------------------------- patching
_KEYS = ("layer", "pos", "head", "expert", "slot", "n_positions", "n_rerouted")


def value_columns(df: pd.DataFrame) -> list[str]:
    """Numeric columns of a patching frame that can be plotted (effect first)."""
    numeric = [
        c for c in df.columns
        if c not in _KEYS and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])
    ]  # fmt: skip
    return sorted(numeric, key=lambda c: (c != "effect", c != "metric", c))


def patching_figure(df: pd.DataFrame, value: str = "effect", hook: str | None = None, tokens=None) -> Figure:
    """The natural heatmap of a patching frame: layer x position (residual / routing grids), layer x
    head (head grids), layer x expert (expert grids), else bars per layer. ``hook`` selects one hook
    of a frame holding several."""

    if value not in df.columns:
        raise KeyError(f"the frame has no column {value!r}; it has {list(df.columns)}")
    if hook is not None and "hook" in df:
        df = df[df["hook"] == hook]
        if df.empty:
            raise ValueError(f"no rows for hook {hook!r}")
    if "head" in df:
        return plot_head_grid(df, value)
    if "pos" in df:
        return plot_patching_heatmap(df, value, tokens=tokens)
    if "expert" in df:
        return diverging_heatmap(df, "layer", "expert", value, f"{value} per layer and expert")
    grouped = df.groupby("layer", sort=True)[value].mean()
    return bar_figure([f"L{L}" for L in grouped.index], grouped.to_numpy(), value, value, xlabel="layer")


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """A Figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def patching_viewer(df: pd.DataFrame, tokens=None):
    """A dropdown of the value column (and of the hook, when the frame holds several) -> heatmap.

    ``controls``: value (Dropdown), hook (Dropdown; disabled with a single hook), image (Image).
    """
    w = _ipywidgets()
    values = value_columns(df)
    if not values:
        raise ValueError(f"the frame has no numeric value column to plot; columns: {list(df.columns)}")
    hooks = sorted(df["hook"].unique()) if "hook" in df else [None]
    value = w.Dropdown(options=values, value=values[0], description="value")
    hook = w.Dropdown(options=hooks, value=hooks[0], description="hook", disabled=len(hooks) < 2)
    image = w.Image(format="png")

    def show(_=None) -> None:
        image.value = figure_png(patching_figure(df, value.value, hook.value, tokens))

    value.observe(show, names="value")
    hook.observe(show, names="value")
    show()
    box = w.VBox([w.HBox([value, hook]), image])
    box.controls = SimpleNamespace(value=value, hook=hook, image=image)
    return box


# --------------------------------------------------------------------------------------- ablation
def ablation_summary(
    model, tokenizer, texts: list[str], layer: int, experts, mode: str = "zero", groups=None, base=None
) -> dict[str, pd.DataFrame]:
    """Ablate ``experts`` of MoE ``layer`` together on ``texts``: the loss effect and the routing diff.

    Returns ``{"effect": ablation_effect frame (overall and per group; default one group per text;
    with rows ``control=True`` for random experts of the layer),
    "agreement": routing agreement with the un-ablated model per layer, "load": the load of ``layer``'s
    experts without and with the ablation}``. ``base``: the un-ablated Routing, to reuse it.
    """

    experts = sorted(int(e) for e in experts)
    groups = [f"text {i}" for i in range(len(texts))] if groups is None else groups
    effect = ab.ablation_effect(
        model, texts, {layer: experts}, mode, groups=groups, tokenizer=tokenizer, progress=False
    )
    means = None
    if mode == "mean" and experts:
        enc = tokenizer(texts)
        means = expert_mean_outputs(model, enc["input_ids"], {layer: experts}, attention_mask=enc["attention_mask"])
    hooks = ab.ablation_hooks(model, {layer: experts}, mode, means)
    base = base if base is not None else collect_routing(model, texts, tokenizer, progress=False)
    ablated = collect_routing(model, texts, tokenizer, progress=False, fwd_hooks=hooks)
    load = load_difference(base, ablated).rename(columns={"load_other": "load_ablated"})
    return {
        "effect": effect,
        "agreement": routing_agreement(base, ablated),
        "load": load[load["layer"] == layer].reset_index(drop=True),
    }


def ablation_explorer(model, tokenizer, texts: list[str], groups=None):
    """Choose a MoE layer, experts and a mode, press run: a Δloss table and the routing diff.

    ``controls``: layer (Dropdown), experts (SelectMultiple), mode (ToggleButtons), run (Button),
    effect (HTML), routing (HTML).
    """
    w = _ipywidgets()

    cfg = model.config
    layer = w.Dropdown(options=list(cfg.moe_layers), description="MoE layer")
    experts = w.SelectMultiple(options=list(range(cfg.moe_num_experts)), value=(0,), description="experts", rows=6)
    mode = w.ToggleButtons(options=["zero", "reroute", "mean"], value="zero", description="mode")
    run = w.Button(description="run", button_style="primary")
    effect = w.HTML("<i>choose experts and press run</i>")
    routing = w.HTML()
    state: dict[str, Any] = {}

    def on_run(_=None) -> None:
        if "base" not in state:
            state["base"] = collect_routing(model, texts, tokenizer, progress=False)
        try:
            out = ablation_summary(
                model, tokenizer, texts, layer.value, experts.value, mode.value, groups, state["base"]
            )
        except ValueError as err:  # e.g. rerouting around too many experts: show it, keep the widget alive
            effect.value, routing.value = f"<b>error:</b> {html.escape(str(err))}", ""
            return
        fmt = lambda x: f"{x:.4f}"
        effect.value = "<b>Δloss</b>" + out["effect"].to_html(index=False, float_format=fmt)
        routing.value = (
            "<b>routing agreement with the un-ablated model</b>"
            + out["agreement"].to_html(index=False, float_format=fmt)
            + f"<b>load at layer {layer.value}</b>"
            + out["load"].to_html(index=False, float_format=fmt)
        )

    run.on_click(on_run)
    box = w.VBox([w.HBox([layer, experts]), mode, run, effect, routing])
    box.controls = SimpleNamespace(layer=layer, experts=experts, mode=mode, run=run, effect=effect, routing=routing)
    return box


# --------------------------------------------------------------------------------------- steering
def steered_continuations(model, tokenizer, prompt: str, on: dict, off: dict, max_new_tokens: int = 12) -> pd.DataFrame:
    """Greedy continuations of ``prompt`` without and with ``steer_experts(model, on, off)``.

    Columns: run ("plain" / "steered"), continuation.
    """
    ids = torch.tensor([tokenizer.encode(prompt)])
    rows = []
    for run, hooks in (("plain", []), ("steered", steer_experts(model, on=on, off=off))):
        out = model.generate(ids, max_new_tokens=max_new_tokens, temperature=0.0, fwd_hooks=hooks, progress=False)
        rows.append({"run": run, "continuation": tokenizer.decode(out[0, ids.shape[1] :].tolist())})
    return pd.DataFrame(rows)


def steering_explorer(model, tokenizer, prompt_sets: dict[str, list[str]], prompt: str = DEFAULT_TEXT):
    """Pick two prompt sets -> risk-difference bars; then steer towards set A and regenerate.

    ``prompt_sets``: name -> texts (e.g. the toy domains). ``controls``: set_a, set_b (Dropdown),
    compare (Button), image (Image), n (IntSlider: experts per layer forced on / off), steer
    (ToggleButton), prompt (Text), generate (Button), output (HTML).
    """
    w = _ipywidgets()
    names = list(prompt_sets)
    if len(names) < 2:
        raise ValueError(f"steering_explorer needs at least two prompt sets, got {names}")
    set_a = w.Dropdown(options=names, value=names[0], description="set A")
    set_b = w.Dropdown(options=names, value=names[1], description="set B")
    compare = w.Button(description="compare", button_style="primary")
    image = w.Image(format="png")
    n = w.IntSlider(value=1, min=1, max=model.config.moe_k, description="experts")
    steer = w.ToggleButton(value=True, description="steer towards A")
    text = w.Text(value=prompt, description="prompt")
    generate = w.Button(description="generate")
    output = w.HTML("<i>compare two sets, then generate</i>")
    state: dict[str, Any] = {}

    def on_compare(_=None) -> None:
        rd = ex.risk_difference(model, prompt_sets[set_a.value], prompt_sets[set_b.value], tokenizer, progress=False)
        state["rd"] = rd
        image.value = figure_png(ex.plot_risk_difference(rd))

    def on_generate(_=None) -> None:
        if "rd" not in state:
            on_compare()
        on, off = ex.steering_sets(state["rd"], n=n.value) if steer.value else ({}, {})
        table = steered_continuations(model, tokenizer, text.value, on, off)
        output.value = f"<b>on</b> {html.escape(str(on))} <b>off</b> {html.escape(str(off))}" + table.to_html(
            index=False
        )

    compare.on_click(on_compare)
    generate.on_click(on_generate)
    box = w.VBox([w.HBox([set_a, set_b, compare]), image, w.HBox([n, steer]), w.HBox([text, generate]), output])
    box.controls = SimpleNamespace(
        set_a=set_a, set_b=set_b, compare=compare, image=image, n=n, steer=steer, prompt=text, generate=generate,
        output=output,
    )  # fmt: skip
    return box


# --------------------------------------------------------------------------------------- attention
def attention_explorer(model, tokenizer=None, text: str = DEFAULT_TEXT):
    """A text box, layer / head / query-position sliders, the text shaded by the attention the query
    pays each token, and the head's whole pattern (:func:`ernie_lab.lens.plot_attention`).

    ``tokenizer`` defaults to ``model.tokenizer``. ``controls``: text (Textarea), layer, head and
    position (IntSlider), tokens (HTML), image (Image).
    """
    w = _ipywidgets()
    tokenizer = tokenizer or model.tokenizer
    cfg = model.config
    text_box = w.Textarea(value=text, description="text", continuous_update=False, layout=w.Layout(width="95%"))
    layer = w.IntSlider(value=0, min=0, max=cfg.num_hidden_layers - 1, description="layer")
    head = w.IntSlider(value=0, min=0, max=cfg.num_attention_heads - 1, description="head")
    position = w.IntSlider(value=0, min=0, max=0, description="query pos")
    tokens, image = w.HTML(), w.Image(format="png")
    state: dict[str, Any] = {}

    def show(_=None) -> None:
        pattern = lens.attention_pattern(state["cache"], layer.value)[head.value]
        tokens.value = lens.attention_html(pattern, state["labels"], position.value)
        fig = lens.plot_attention(state["cache"], layer.value, heads=head.value, tokens=state["labels"])
        image.value = figure_png(fig)

    def recompute(_=None) -> None:
        ids = torch.tensor([tokenizer.encode(text_box.value or " ")])
        _, state["cache"] = model.run_with_cache(ids, names_filter="blocks.*.attn.hook_pattern")
        state["labels"] = sequence_tokens(tokenizer, ids[0].tolist())
        position.max = ids.shape[1] - 1
        position.value = ids.shape[1] - 1
        show()

    text_box.observe(recompute, names="value")
    for slider in (layer, head, position):
        slider.observe(show, names="value")
    recompute()
    box = w.VBox([text_box, w.HBox([layer, head, position]), tokens, image])
    box.controls = SimpleNamespace(text=text_box, layer=layer, head=head, position=position, tokens=tokens, image=image)
    return box
