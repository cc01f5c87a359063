"""Attention patterns as pictures: one layer's heads as a grid of query x key heatmaps.

Axes: batch head pos kv_pos (glossary in model/ernie.py).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
import torch

from ernie_lab.model.shortcuts import MissingTokenizerError
from ernie_lab.plots import new_figure, sequence_tokens, token_label


def attention_pattern(cache, layer: int, batch: int = 0) -> torch.Tensor:
    """``blocks.{layer}.attn.hook_pattern`` of one batch row: ``[head pos kv_pos]`` (fp32, CPU).

    The cache must hold it: ``model.run_with_cache(ids, names_filter="blocks.*.attn.hook_pattern")``.
    """
    name = f"blocks.{layer}.attn.hook_pattern"
    if name not in cache:
        raise KeyError(
            f"{name} is not in the cache: run model.run_with_cache(ids, names_filter='blocks.*.attn.hook_pattern')"
        )
    pattern = cache[name]
    if not 0 <= batch < pattern.shape[0] and not -pattern.shape[0] <= batch < 0:
        raise IndexError(f"batch row {batch} is outside the cache's batch of {pattern.shape[0]}")
    return pattern[batch].float().cpu()


def token_labels(tokens, n: int, tokenizer=None) -> list[str]:
    """``n`` axis labels: ``"pos token"`` from label strings or ids (decoded with ``tokenizer``), else positions."""
    if tokens is None:
        return [str(i) for i in range(n)]
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.reshape(-1).tolist() if tokens.ndim <= 1 or tokens.shape[0] == 1 else tokens[0].tolist()
    tokens = list(tokens)
    if tokens and not isinstance(tokens[0], str):
        if tokenizer is None:
            raise ValueError("token ids need a tokenizer for labels: set model.tokenizer or pass the strings")
        tokens = sequence_tokens(tokenizer, tokens)
    if len(tokens) != n:
        raise ValueError(f"{len(tokens)} tokens given for {n} positions")
    return [f"{i} {token_label(t)}" for i, t in enumerate(tokens)]


def plot_attention(
    cache,
    layer: int,
    heads: Sequence[int] | int | None = None,
    tokens=None,
    batch: int = 0,
    max_ticks: int = 40,
):
    """A grid of attention patterns of ``layer``: one query (rows) x key (columns) heatmap per head.

    ``heads``: a head, a list of heads, or None for all. ``tokens``: the input as label strings or
    ids ``[pos]`` / ``[batch pos]`` (ids are decoded with ``cache.model.tokenizer`` through
    :func:`ernie_lab.plots.sequence_tokens`); None labels positions by number. Masked (future) keys
    show as 0. Returns a Figure.
    """
    pattern = attention_pattern(cache, layer, batch)
    n_head, n_pos = pattern.shape[0], pattern.shape[1]
    heads = list(range(n_head)) if heads is None else [heads] if isinstance(heads, int) else list(heads)
    bad = [h for h in heads if not 0 <= h < n_head]
    if bad or not heads:
        raise ValueError(f"heads {bad or heads} are not in [0, {n_head})")
    tokenizer = tokenizer_or_none(getattr(cache, "model", None)) if tokens is not None else None
    labels = token_labels(tokens, n_pos, tokenizer)
    cols = min(len(heads), 4)
    rows = math.ceil(len(heads) / cols)
    side = max(3.0, min(0.28 * n_pos + 1.5, 9.0))
    fig, axes = new_figure(rows, cols, figsize=(side * cols + 0.8, side * rows))
    axes = np.atleast_1d(axes).reshape(-1)
    step = max(1, -(-n_pos // max_ticks))
    for ax, h in zip(axes, heads, strict=False):
        image = ax.imshow(pattern[h].numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        ticks = np.arange(0, n_pos, step)
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
        ax.set_title(f"L{layer} H{h}")
    for ax in axes[len(heads) :]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[: len(heads)]), label="attention weight", shrink=0.8)
    return fig


def tokenizer_or_none(model):
    """``model.tokenizer`` when there is one (loaded on first use), else None."""
    if model is None:
        return None
    try:
        return model.tokenizer
    except (MissingTokenizerError, FileNotFoundError):
        return None


def attention_html(pattern: torch.Tensor, tokens: list[str], query: int) -> str:
    """The tokens as ``<span>``s shaded by the attention ``query`` pays them (``pattern [pos kv_pos]``
    of one head); the query token is outlined, each span's title gives the weight."""
    row = pattern[query]
    spans = []
    for pos, token in enumerate(tokens):
        weight = float(row[pos])
        shown = html.escape(token).replace("\n", "↵<br>") or "&nbsp;"
        outline = "outline:2px solid #b2182b;" if pos == query else ""
        spans.append(
            f'<span title="pos {pos}: {weight:.3f}" style="background:rgba(33,102,172,{weight:.3f});{outline}'
            f'padding:1px 2px;margin:1px;border-radius:3px;white-space:pre-wrap">{shown}</span>'
        )
    return f"<div style='font-family:monospace;line-height:1.9'>{''.join(spans)}</div>"
