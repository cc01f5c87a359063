"""Every plot function, rendered on the toy model: a non-empty title, axis labels in words (no raw column
names), nothing drawn outside the figure."""

from __future__ import annotations

import inspect
import math
import re

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

import ernie_lab as el
from ernie_lab.toy.prompts import load_prompt_set

WINGS = (el.routing, el.patching, el.ablation, el.experts)


@pytest.fixture(scope="module")
def toy():
    model, tok = el.load_model("toy"), el.load_tokenizer("toy")
    docs = pd.DataFrame(load_prompt_set("domains")).groupby("domain").head(2)
    texts = [t[:200] for t in docs["text"]]
    r = el.routing.collect_routing(model, texts, tok, groups=docs["domain"].tolist(), progress=False)
    clean = tok.encode("The capital of Veloria is")
    corrupt = list(clean)
    corrupt[-2] = clean[1]
    metric = el.patching.logit_diff(clean[1], clean[2])
    setup = el.patching.PatchingSetup(model, torch.tensor([clean]), torch.tensor([corrupt]), metric, progress=False)
    return model, tok, texts, r, setup, torch.tensor([clean])


def figures(toy) -> dict:
    model, tok, texts, r, setup, clean = toy
    L, L2 = model.config.moe_layers[0], model.config.moe_layers[-1]
    short = texts[::3]
    imp = el.ablation.expert_importance(model, short, [L], tokenizer=tok, n_boot=50, progress=False)
    curve = el.ablation.pruning_curve(
        model, short, L, importance=imp, steps=[0, 4], n_boot=50, tokenizer=tok, progress=False
    )
    effect = el.ablation.ablation_effect(model, short, {L: [0, 1]}, tokenizer=tok, n_boot=50, progress=False)
    sal = el.experts.saliency(model, short, tok, progress=False)
    rd = el.experts.risk_difference(model, texts[:6], texts[6:], tok, n_boot=50, progress=False)
    ids, mask, _ = next(el.routing.iter_batches(el.io.datasets.as_sequences(short[:2], tok), 2, 0))
    names, parts = el.routing.router_logit_sources(model, ids, L, mask)
    resid = setup.residual("resid_pre")
    super_ = el.experts.super_experts(model, short, tok, progress=False)
    lens = el.experts.truncation_lens(model, short, tok, progress=False)
    return {
        "plot_load_heatmap": el.routing.plot_load_heatmap(el.routing.expert_load(r)),
        "plot_coactivation": el.routing.plot_coactivation(el.routing.coactivation(r, L)),
        "plot_specialisation": el.routing.plot_specialisation(el.routing.domain_specialisation(r), layer=L),
        "plot_entropy_by_layer": el.routing.plot_entropy_by_layer(el.routing.router_entropy(r)),
        "plot_transitions": el.routing.plot_transitions(el.routing.transitions(r, L, L2), "lift"),
        "plot_nmi_by_distance": el.routing.plot_nmi_by_distance(el.routing.transition_nmi(r)),
        "plot_router_sources": el.routing.plot_router_sources(el.routing.source_summary(names, parts, mask)),
        "plot_patching_heatmap": el.patching.plot_patching_heatmap(resid),
        "plot_head_grid": el.patching.plot_head_grid(setup.heads()),
        "plot_attribution_vs_exact": el.patching.plot_attribution_vs_exact(resid, setup.attribution("resid_pre")),
        "plot_importance": el.ablation.plot_importance(imp),
        "plot_ablation_effect": el.ablation.plot_ablation_effect(effect),
        "plot_pruning_curve": el.ablation.plot_pruning_curve(curve),
        "plot_dla": el.ablation.plot_dla(el.ablation.direct_logit_attribution(model, clean, 5, 6)),
        "plot_saliency": el.experts.plot_saliency(sal),
        "plot_saliency_vs_importance": el.experts.plot_saliency_vs_importance(
            el.experts.saliency_vs_importance(sal, imp)
        ),
        "plot_super_experts": el.experts.plot_super_experts(super_),
        "plot_risk_difference": el.experts.plot_risk_difference(rd),
        "plot_truncation_lens": el.experts.plot_truncation_lens(lens),
        "plot_knockout": el.experts.plot_knockout(
            el.experts.topk_knockout(model, short, tokenizer=tok, progress=False)
        ),
    }


RAW = re.compile(r"[A-Za-z0-9]_[A-Za-z0-9]")  # snake_case: a column name, not words


def test_every_plot_function_is_rendered_here():
    public = {name for wing in WINGS for name in wing.__all__ if name.startswith("plot_")}
    rendered = set(re.findall(r'"(plot_\w+)":', inspect.getsource(figures)))
    assert public <= rendered, f"add {sorted(public - rendered)} to figures()"


def test_titles_and_labels_are_words(toy):
    problems = []
    for name, fig in figures(toy).items():
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        texts = [fig._suptitle.get_text()] if fig._suptitle else []
        plotted = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        texts += [ax.get_title() for ax in plotted]
        if not any(t.strip() for t in texts):
            problems.append(f"{name}: no title")
        for ax in fig.axes:
            for text in (ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), fig._suptitle and fig._suptitle.get_text()):
                if text and RAW.search(text):
                    problems.append(f"{name}: raw column name in {text!r}")
        for ax in plotted:
            x_ok = ax.get_xlabel().strip() or not ax.xaxis.get_visible()  # a twin axis shares its x axis
            if ax.has_data() and not (x_ok and ax.get_ylabel().strip()):
                problems.append(f"{name}: unlabelled axis ({ax.get_xlabel()!r}, {ax.get_ylabel()!r})")
        renderer, box = canvas.get_renderer(), fig.bbox
        for ax in fig.axes:
            for artist in (ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts):
                extent = artist.get_window_extent(renderer)
                if not (artist.get_text() and artist.get_visible() and math.isfinite(extent.x0 + extent.y1)):
                    continue
                inside = box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1 and box.y0 - 1 <= extent.y0
                if not (inside and extent.y1 <= box.y1 + 1):
                    problems.append(f"{name}: {artist.get_text()!r} clipped")
    assert not problems, "\n".join(problems)
