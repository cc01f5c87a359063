"""Widgets: their plain logic functions, the lazy ipywidgets import, and the widgets' callbacks
triggered programmatically (set a value, check the output changed)."""

from __future__ import annotations

import importlib
import re
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import ernie_lab as el
from ernie_lab import widgets as W
from ernie_lab.toy.prompts import load_prompt_set

TEXT = "The capital of Veloria is Mirren. 12+7=19"


@pytest.fixture(scope="module")
def model():
    return el.load_model("toy")


@pytest.fixture(scope="module")
def tok():
    return el.load_tokenizer("toy")


@pytest.fixture(scope="module")
def texts():
    return [row["text"] for row in load_prompt_set("domains")[:3]]


@pytest.fixture(scope="module")
def table(model, tok):
    return W.routing_table(model, tok, TEXT)


# --------------------------------------------------------------------------------------- lazy import
def test_ipywidgets_is_needed_only_to_build_a_widget(monkeypatch, model, tok):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import ipywidgets -> ImportError
    module = importlib.reload(W)  # the module imports without it
    assert module.routing_table(model, tok, "a b").shape[0] > 0
    with pytest.raises(ImportError, match=r"pip install 'ernie-lab\[widgets\]'"):
        module.routing_explorer(model, tok)
    with pytest.raises(ImportError, match="ernie-lab"):
        module.patching_viewer(pd.DataFrame({"layer": [0], "effect": [0.5]}))
    monkeypatch.undo()
    importlib.reload(W)


# --------------------------------------------------------------------------------------- routing logic
def test_routing_table_matches_the_model(model, tok, table):
    cfg = model.config
    ids = tok.encode(TEXT)
    assert len(table) == len(cfg.moe_layers) * len(ids) * cfg.moe_k
    assert table["token"].iloc[: cfg.moe_k].tolist() == [tok.convert_ids_to_tokens(ids[:1])[0]] * cfg.moe_k
    _, cache = model.run_with_cache(torch.tensor([ids]))
    for L in cfg.moe_layers:
        sub = table[table["layer"] == L]
        weights = sub.pivot(index="pos", columns="slot", values="weight").to_numpy()
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
        assert (np.diff(weights, axis=-1) <= 0).all()  # slots ordered by weight
        experts = sub.pivot(index="pos", columns="slot", values="expert").to_numpy()
        expected = cache[f"blocks.{L}.moe.hook_topk_idx"][0].numpy()
        assert (np.sort(experts, -1) == np.sort(expected, -1)).all()
        probs = cache[f"blocks.{L}.moe.hook_router_probs"][0]
        got = sub.pivot(index="pos", columns="slot", values="prob").to_numpy()
        np.testing.assert_allclose(got, probs.gather(-1, torch.tensor(experts)).numpy(), rtol=1e-5)


def test_routing_html_colours_tokens_by_their_top_expert(model, table):
    L, n_experts = model.config.moe_layers[0], model.config.moe_num_experts
    page = W.routing_html(table, L, n_experts)
    first = table[(table["layer"] == L) & (table["pos"] == 0) & (table["slot"] == 0)]
    n_pos = table["pos"].nunique()
    assert page.count('<span title="pos ') == n_pos
    assert f"background:{W.expert_colour(int(first['expert'].item()), n_experts)}" in page.split("</span>")[0]
    tricky = table.assign(token=table["token"].where(table["pos"] != 0, "<b>&"))
    assert "&lt;b&gt;&amp;" in W.routing_html(tricky, L, n_experts) and "<b>&" not in W.routing_html(
        tricky, L, n_experts
    )
    with pytest.raises(ValueError, match="layer 0"):
        W.routing_html(table, 0, n_experts)
    colours = {W.expert_colour(e, 16) for e in range(16)} | {W.expert_colour(e, 64) for e in range(64)}
    assert len(colours) == 16 + 64


def test_topk_table_has_one_row_per_position(model, table):
    L, k = model.config.moe_layers[-1], model.config.moe_k
    wide = W.topk_table(table, L)
    assert len(wide) == table["pos"].nunique()
    assert list(wide.columns[:2]) == ["pos", "token"] and f"expert_{k}" in wide and f"weight_{k}" in wide
    assert (wide["weight_1"] >= wide[f"weight_{k}"]).all()
    assert all(wide[f"expert_{s}"].dtype == np.int64 for s in range(1, k + 1))  # shown as 12, not 12.000


# --------------------------------------------------------------------------------------- widgets
def test_routing_explorer_callbacks(model, tok):
    w = W.routing_explorer(model, tok, text=TEXT)
    c = w.controls
    assert list(c.layer.options) == list(model.config.moe_layers)
    before_tokens, before_table = c.tokens.value, c.table.value
    assert "Mirren" in before_tokens and "<table" in before_table
    header = re.findall(r"<th>(.*?)</th>", before_table)
    first_row = re.findall(r"<td>(.*?)</td>", before_table)[: len(header)]
    experts = [cell for name, cell in zip(header, first_row) if name.startswith("expert_")]
    assert experts and all(cell.isdigit() for cell in experts), f"expert ids shown as {experts}"
    c.layer.value = model.config.moe_layers[-1]
    assert c.tokens.value != before_tokens and f"layer {model.config.moe_layers[-1]}" in c.tokens.value
    c.text.value = "The capital of Pellune"
    assert "Pellune" in c.tokens.value and "Mirren" not in c.tokens.value and c.table.value != before_table


def _grid(hooks=("resid_pre", "mlp_out")) -> pd.DataFrame:
    rows = []
    for h, hook in enumerate(hooks):
        for layer in range(3):
            for pos in range(4):
                rows.append(
                    {
                        "hook": hook,
                        "layer": layer,
                        "pos": pos,
                        "token": f"t{pos}",
                        "metric": pos - h,
                        "effect": (layer * pos + h) / 6,
                    }
                )
    return pd.DataFrame(rows)  # fmt: skip


def test_patching_figure_picks_the_grid_shape():
    grid = _grid()
    fig = W.patching_figure(grid, "effect", hook="mlp_out")
    assert isinstance(fig, Figure) and "MLP / MoE output" in fig.axes[0].get_title()  # the hook in words
    heads = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "effect": [0.1, 0.2, 0.3, 0.4]})
    assert "head" in W.patching_figure(heads).axes[0].get_xlabel()
    experts = pd.DataFrame({"layer": [1, 1, 2, 2], "expert": [0, 1, 0, 1], "effect": [0.1, -0.2, 0.3, 0.0]})
    assert W.patching_figure(experts).axes[0].get_xlabel() == "expert"
    per_layer = pd.DataFrame({"layer": [1, 2, 3], "n_rerouted": [1, 0, 2], "effect": [0.1, 0.5, 0.2]})
    assert len(W.patching_figure(per_layer).axes[0].patches) == 3  # bars
    assert W.value_columns(grid) == ["effect", "metric"]
    with pytest.raises(KeyError, match="nope"):
        W.patching_figure(grid, "nope")


def test_patching_viewer_callbacks():
    w = W.patching_viewer(_grid())
    c = w.controls
    assert list(c.value.options) == ["effect", "metric"] and not c.hook.disabled
    first = bytes(c.image.value)
    assert first.startswith(b"\x89PNG")
    c.hook.value = next(h for h in c.hook.options if h != c.hook.value)
    second = bytes(c.image.value)
    assert second != first
    c.value.value = "metric"
    assert bytes(c.image.value) not in (first, second)
    single = W.patching_viewer(_grid(hooks=("resid_pre",)))
    assert single.controls.hook.disabled


# --------------------------------------------------------------------------------------- ablation
def test_ablation_summary_properties(model, tok, texts):
    cfg = model.config
    L = cfg.moe_layers[1]
    out = W.ablation_summary(model, tok, texts, L, [0, 1], mode="reroute")
    effect = out["effect"]
    assert effect[~effect["control"]]["group"].tolist() == ["all", "text 0", "text 1", "text 2"]
    assert effect[effect["control"]]["group"].tolist() == ["all", "text 0", "text 1", "text 2"]  # random experts
    agreement = out["agreement"].set_index("layer")
    assert (agreement.loc[[x for x in cfg.moe_layers if x < L], "identical"] == 1.0).all()  # upstream untouched
    load = out["load"].set_index("expert")
    assert (out["load"]["layer"] == L).all() and len(load) == cfg.moe_num_experts
    assert load.loc[[0, 1], "load_ablated"].sum() == 0.0  # rerouted experts get nothing
    assert load["load_ablated"].sum() == pytest.approx(1.0)
    nothing = W.ablation_summary(model, tok, texts, L, [], mode="zero")
    assert (nothing["effect"]["delta_loss"] == 0).all() and (nothing["agreement"]["identical"] == 1.0).all()


def test_ablation_explorer_callbacks(model, tok, texts):
    w = W.ablation_explorer(model, tok, texts)
    c = w.controls
    assert "press run" in c.effect.value and c.routing.value == ""
    c.layer.value = model.config.moe_layers[0]
    c.experts.value = (0, 1, 2)
    c.run.click()
    first = c.effect.value
    assert "Δloss" in first and "<table" in first and "agreement" in c.routing.value
    c.mode.value = "reroute"
    c.run.click()
    assert c.effect.value != first and "reroute" in c.effect.value
    c.experts.value = tuple(range(model.config.moe_num_experts))  # too many to reroute around
    c.run.click()
    assert "error" in c.effect.value


# --------------------------------------------------------------------------------------- attention
def test_attention_explorer_callbacks(model, tok):
    w = W.attention_explorer(model, tok, text=TEXT)
    c = w.controls
    n = len(tok.encode(TEXT))
    assert c.position.max == c.position.value == n - 1
    assert c.layer.max == model.config.num_hidden_layers - 1 and c.head.max == model.config.num_attention_heads - 1
    before_tokens, before_image = c.tokens.value, c.image.value
    assert "Mirren" in before_tokens and before_image[:4] == b"\x89PNG"
    c.head.value = 1
    assert c.image.value != before_image
    c.position.value = 0  # the first query attends only to itself
    assert 'title="pos 0: 1.000"' in c.tokens.value
    c.text.value = "The capital of Pellune"
    assert "Pellune" in c.tokens.value and c.position.max == len(tok.encode("The capital of Pellune")) - 1
