"""The logit lens: what each layer's residual stream would predict if it were the last one.

Each row of ``cache.accumulated_resid(apply_ln=True)`` (the residual at the input of every layer,
then the final residual, each through the final RMSNorm with its own statistics) is unembedded
with ``W_U`` (plus the ``lm_head`` bias when there is one); the final row is the model's logits.

Axes: component batch pos vocab (glossary in model/ernie.py).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ernie_lab.lens.attention import tokenizer_or_none
from ernie_lab.plots import heatmap, new_figure, sequence_tokens, token_label

COLUMNS = ["batch", "pos", "token", "layer", "label", "target_id", "target", "prob", "rank", "top_id", "top"]


def _targets(model, input_ids: torch.Tensor, final: torch.Tensor, target) -> torch.Tensor:
    """Target ids ``[batch pos]``: the next input token (the model's top prediction at the last
    position) by default, one token (an id or a one-token string) everywhere, or ``[batch pos]`` ids."""
    if target is None:
        nxt = final.argmax(-1)  # [batch pos]
        nxt[:, :-1] = input_ids[:, 1:].to(nxt.device)
        return nxt
    if isinstance(target, str):
        target = model.to_single_token(target)
    ids = torch.as_tensor(target, dtype=torch.long, device=final.device)
    if ids.ndim == 1 and ids.numel() == input_ids.shape[0]:
        ids = ids[:, None]
    if ids.is_floating_point() or ids.ndim > 2:
        raise ValueError(f"target must be a token id, a one-token string or ids [batch pos], got {target!r}")
    return ids.expand(input_ids.shape)


def logit_lens(model, input_ids: torch.Tensor, target=None, cache=None, attention_mask=None) -> pd.DataFrame:
    """Rank and probability of a target token at every layer (and the final output) and position.

    ``input_ids`` ``[pos]`` or ``[batch pos]``; ``target``: None (each position's next input token;
    at the last position the model's own top prediction), a token id or one-token string for every
    position, or ids ``[batch pos]``. ``cache``: a cache of this input holding the residual points
    (``blocks.*.hook_resid_pre`` and the last ``hook_resid_post``), else the model is run.

    Columns: batch, pos, token (readable input token, when ``model.tokenizer`` is set, else None),
    layer (0..L: the input of that layer; L = the final residual), label (``"3_pre"``,
    ``"final_post"``), target_id, target, prob (softmax probability of the target), rank (1 = the
    top prediction), top_id, top (the layer's top prediction).
    """
    ids = input_ids[None] if input_ids.ndim == 1 else input_ids
    if cache is None:
        names = lambda n: n.endswith("hook_resid_pre") or n.endswith("hook_resid_post")  # noqa: E731
        _, cache = model.run_with_cache(ids, names_filter=names, attention_mask=attention_mask)
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    bias = model.lm_head.bias
    rows = []
    with torch.no_grad():
        logits = [row @ model.W_U + (bias if bias is not None else 0) for row in stack]  # [batch pos vocab] each
        targets = _targets(model, ids, logits[-1], target)
        for layer, (label, row) in enumerate(zip(labels, logits, strict=True)):
            row = row.float()
            chosen = row.gather(-1, targets[..., None])[..., 0]
            rank = (row > chosen[..., None]).sum(-1) + 1
            prob = row.softmax(-1).gather(-1, targets[..., None])[..., 0]
            top = row.argmax(-1)
            batch, pos = np.indices(targets.shape)
            rows.append(
                pd.DataFrame(
                    {
                        "batch": batch.reshape(-1),
                        "pos": pos.reshape(-1),
                        "layer": layer,
                        "label": label,
                        "target_id": targets.reshape(-1).cpu().numpy(),
                        "prob": prob.reshape(-1).cpu().numpy(),
                        "rank": rank.reshape(-1).cpu().numpy(),
                        "top_id": top.reshape(-1).cpu().numpy(),
                    }
                )
            )
    frame = pd.concat(rows, ignore_index=True)
    tokenizer = tokenizer_or_none(model)
    if tokenizer is not None:
        texts = [sequence_tokens(tokenizer, r.tolist()) for r in ids.cpu()]
        frame["token"] = [texts[b][p] for b, p in zip(frame["batch"], frame["pos"], strict=True)]
        frame["target"] = tokenizer.convert_ids_to_tokens(frame["target_id"].tolist())
        frame["top"] = tokenizer.convert_ids_to_tokens(frame["top_id"].tolist())
    return frame.reindex(columns=COLUMNS).sort_values(["batch", "layer", "pos"], ignore_index=True)


def plot_logit_lens(df: pd.DataFrame, batch: int = 0, annotate: bool | None = None):
    """Two layer x position heatmaps of one batch row: the target's probability and its rank (log
    scale). ``annotate`` writes each cell's top prediction (default: when there are at most 300 cells)."""
    sub = df[df["batch"] == batch]
    if sub.empty:
        raise ValueError(f"batch row {batch} is not in the frame (batches {sorted(df['batch'].unique())})")
    positions = sorted(sub["pos"].unique())
    first = sub[sub["layer"] == sub["layer"].min()].set_index("pos")
    has_text = first["token"].notna().all()
    columns = [f"{p} {token_label(first.loc[p, 'token'])}" if has_text else str(p) for p in positions]
    layers = sub.drop_duplicates("layer").sort_values("layer")["label"].tolist()
    annotate = len(positions) * len(layers) <= 300 if annotate is None else annotate
    fig, axes = new_figure(1, 2, figsize=(max(9.0, 1.1 * len(positions) + 4), max(3.5, 0.45 * len(layers) + 1.8)))
    for ax, value in zip(axes, ("prob", "rank"), strict=True):
        table = sub.pivot(index="layer", columns="pos", values=value).sort_index()
        if value == "rank":
            table = np.log10(table.astype(float))
        table.index, table.columns = layers, columns
        table.index.name, table.columns.name = "layer (residual stream at its input)", "position, input token"
        cmap = "viridis" if value == "prob" else "viridis_r"  # bright = likely / top-ranked
        heatmap(ax, table, cmap=cmap, label="probability of target" if value == "prob" else "log10 rank of target")
        ax.set_title("probability of the target" if value == "prob" else "rank of the target (1 = top)")
        ax.tick_params(axis="x", labelrotation=90 if len(positions) > 6 else 0)
    if annotate and sub["top"].notna().all():
        tops = sub.pivot(index="layer", columns="pos", values="top").sort_index().to_numpy()
        for (i, j), text in np.ndenumerate(tops):
            axes[0].text(j, i, token_label(str(text)), ha="center", va="center", fontsize=6, color="w")
    fig.suptitle(f"logit lens, batch row {batch}" + (": cells name each layer's top prediction" if annotate else ""))
    return fig
