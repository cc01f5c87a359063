"""Do a domain's specialised experts matter causally? The double dissociation behind the toy's acceptance.

For every MoE layer L and domain D of the held-out prompt set (the README's Definitions, "Noise floors"):

1. **discover** — on one half of each domain's texts, the ``n_experts`` experts of L with the highest
   domain lift ``spec(e, D) / (k/E)`` (:func:`ernie_lab.routing.domain_specialisation`);
2. **evaluate** — on the other half, zero-ablate them and measure the NLL rise on D (``delta``, with its
   bootstrap interval over texts), the largest rise on any other domain (``other``) and the mean rise on D
   of random sets of the layer's other experts (``control``, ``controls`` draws, the noise floor);
3. **passes** when ``delta >= min_delta``, ``delta >= other_ratio * other`` and
   ``delta >= control_ratio * control`` (issue defaults: 0.10 nats, 3x, 5x).

``zero_all`` is the overall rise when every routed expert of L is zeroed: how much the layer's routed
experts matter at all. Everything goes through the public API (routing collection and
:func:`ernie_lab.ablation.ablation_effect`), so the numbers can be checked from outside.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ernie_lab.ablation import ablation_effect
from ernie_lab.noise import split_sequences
from ernie_lab.plots import new_figure
from ernie_lab.routing import collect_routing, domain_specialisation
from ernie_lab.toy.chat import encode_document
from ernie_lab.toy.prompts import load_prompt_set

CRITERIA = {"min_delta": 0.10, "other_ratio": 3.0, "control_ratio": 5.0}


def dissociation(
    model,
    tokenizer,
    rows: Sequence[dict] | None = None,
    *,
    domains: Sequence[str] | None = None,
    n_experts: int = 2,
    controls: int = 4,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """The dissociation table, one row per (layer, domain).

    ``rows``: ``{"domain", "text"}`` dicts (default ``data/prompts/domains.jsonl``), split into halves
    within each domain (every other text discovers, the rest evaluates). ``domains``: the domains to
    test (default all; every domain still counts for ``other``).
    Columns: layer, domain, experts (the ablated ones), lift (their mean lift on the discover half),
    delta, ci_low, ci_high (``level`` bootstrap interval over evaluate texts), other, other_domain,
    control, control_ci_low, control_ci_high, zero_all, n_seq, passes.
    """
    rows = list(load_prompt_set("domains") if rows is None else rows)
    ids, all_domains = [encode_document(tokenizer, r) for r in rows], [r["domain"] for r in rows]
    split = split_sequences(len(rows), "halves", groups=all_domains)
    discover = [ids[i] for i in split.discover], [all_domains[i] for i in split.discover]
    evaluate = [ids[i] for i in split.evaluate], [all_domains[i] for i in split.evaluate]
    spec = domain_specialisation(collect_routing(model, discover[0], groups=discover[1], progress=False))
    cfg = model.config
    tested = sorted(set(all_domains)) if domains is None else list(domains)
    unknown = sorted(set(tested) - set(all_domains))
    if unknown:
        raise ValueError(f"domains {unknown} are not in the rows; they hold {sorted(set(all_domains))}")
    common = dict(groups=evaluate[1], level=level, n_boot=n_boot, seed=seed, progress=progress)
    out = []
    for layer in cfg.moe_layers:
        everything = ablation_effect(model, evaluate[0], {layer: range(cfg.moe_num_experts)}, controls=0, **common)
        zero_all = float(everything.set_index("group").loc["all", "delta_loss"])
        for domain in tested:
            top = spec[(spec.layer == layer) & (spec.group == domain)].nlargest(n_experts, "lift")
            experts = sorted(int(e) for e in top.expert)
            effect = ablation_effect(model, evaluate[0], {layer: experts}, controls=controls, **common)
            real = effect[~effect.control & ~effect.group.isin(["all"])].set_index("group")
            control = effect[effect.control].set_index("group").loc[domain]
            others = real.drop(index=domain)["delta_loss"]
            out.append(
                {
                    "layer": layer,
                    "domain": domain,
                    "experts": experts,
                    "lift": float(top.lift.mean()),
                    "delta": float(real.loc[domain, "delta_loss"]),
                    "ci_low": float(real.loc[domain, "ci_low"]),
                    "ci_high": float(real.loc[domain, "ci_high"]),
                    "other": float(others.max()),
                    "other_domain": str(others.idxmax()),
                    "control": float(control["delta_loss"]),
                    "control_ci_low": float(control["ci_low"]),
                    "control_ci_high": float(control["ci_high"]),
                    "zero_all": zero_all,
                    "n_seq": int(real.loc[domain, "n_seq"]),
                }
            )
    table = pd.DataFrame(out)
    c = CRITERIA
    table["passes"] = (
        (table.delta >= c["min_delta"])
        & (table.delta >= c["other_ratio"] * table.other)
        & (table.delta >= c["control_ratio"] * table.control)
    )
    return table


def plot_dissociation(table: pd.DataFrame) -> Figure:
    """Per layer and tested domain: the NLL rise on the domain (bar, 95% interval), the largest rise on
    another domain and the random-pair control; the dashed line is the 0.10-nat bar."""
    fig, ax = new_figure(figsize=(7.5, 3.4))
    labels = [f"L{L} {d}" for L, d in zip(table.layer, table.domain)]
    x = np.arange(len(table))
    err = np.vstack([table.delta - table.ci_low, table.ci_high - table.delta])
    ax.bar(x - 0.27, table.delta, 0.27, yerr=err, capsize=2, label="domain's own experts zeroed: rise on it")
    ax.bar(x, table.other, 0.27, label="same experts: largest rise on another domain")
    ax.bar(x + 0.27, table.control, 0.27, label="random pairs of other experts (control)")
    ax.axhline(CRITERIA["min_delta"], color="black", lw=0.8, ls="--")
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set(
        ylabel="held-out NLL rise (nats per token)",
        title="Zero-ablating a domain's top-lift experts, measured on held-out texts",
    )
    ax.legend(fontsize=7)
    return fig
