"""Evaluate the toy model: held-out NLL per domain (and two checkpoints against each other, with a paired
bootstrap interval), task accuracies, expert specialisation and balance.

Used by ``ernie-lab train-toy`` to write the model card and by the tests to hold the shipped
checkpoint to stated floors.
"""

from __future__ import annotations

import itertools
import math

import pandas as pd
import torch

from ernie_lab.ablation.core import token_nll
from ernie_lab.noise import DEFAULT_LEVEL, DEFAULT_N_BOOT, bootstrap_ci, check_interval
from ernie_lab.routing import balance, collect_routing, domain_specialisation
from ernie_lab.toy.chat import encode_document


def _batches(rows: list, size: int):
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


@torch.no_grad()
def document_nll(
    model, tokenizer, rows: list[dict], batch_size: int = 16, shuffle_seed: int | None = None
) -> pd.DataFrame:
    """Per row of ``rows`` ``{"domain", "text"}``: domain, nll_sum (next-token NLL summed over the text's
    predicted tokens, nats), n_tokens (their number) and n_chars (the text's characters), in row order.

    The per-sequence values that :func:`heldout_nll` sums and that bootstrap intervals resample.
    ``shuffle_seed``: see :func:`heldout_nll`.
    """
    gen = torch.Generator().manual_seed(shuffle_seed or 0)
    out = []
    for chunk in _batches(rows, batch_size):
        ids = [encode_document(tokenizer, r) for r in chunk]
        if shuffle_seed is not None:
            ids = [[seq[i] for i in torch.randperm(len(seq), generator=gen).tolist()] for seq in ids]
        width = max(len(s) for s in ids)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(s)) + s for s in ids])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])
        nll = token_nll(model, input_ids, mask)
        for r, row_nll in zip(chunk, nll):
            valid = row_nll[~row_nll.isnan()]
            out.append(
                {
                    "domain": r["domain"],
                    "nll_sum": valid.sum().item(),
                    "n_tokens": valid.numel(),
                    "n_chars": len(r["text"]),
                }
            )
    return pd.DataFrame(out, columns=["domain", "nll_sum", "n_tokens", "n_chars"])


def heldout_nll(
    model, tokenizer, rows: list[dict], batch_size: int = 16, shuffle_seed: int | None = None
) -> pd.DataFrame:
    """Mean next-token NLL (nats) per domain over ``rows`` ``{"domain", "text"}``: columns domain, n_tokens,
    nll (per predicted token) and nats_per_char (the summed NLL over the texts' characters, which compares
    models with different tokenizers).

    With ``shuffle_seed`` each text's tokens are permuted first: the baseline a model that learned
    only unigram statistics would reach, so a large gap means the model learned structure.
    """
    per_doc = document_nll(model, tokenizer, rows, batch_size, shuffle_seed)
    sums = per_doc.groupby("domain", sort=True)[["nll_sum", "n_tokens", "n_chars"]].sum().reset_index()
    return pd.DataFrame(
        {
            "domain": sums.domain,
            "n_tokens": sums.n_tokens,
            "nll": sums.nll_sum / sums.n_tokens,
            "nats_per_char": sums.nll_sum / sums.n_chars,
        }
    )


def compare_nll(
    a: tuple,
    b: tuple,
    rows: list[dict],
    *,
    level: float = DEFAULT_LEVEL,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Held-out NLL of two checkpoints on the same texts, per domain, with a paired bootstrap interval.

    ``a`` and ``b`` are ``(model, tokenizer)`` pairs; their tokenizers may differ, so the figure is nats per
    character (each text's summed NLL over its characters). Columns: domain, n_docs, n_chars,
    nats_per_char_a, nats_per_char_b, difference (a - b: > 0 means ``a`` is worse), relative (difference /
    nats_per_char_b), ci_low, ci_high (the ``level`` percentile interval of the difference over ``n_boot``
    resamples of the texts, seeded; both models see the same resampled texts). An interval that spans 0
    means the texts do not tell the two apart.
    """
    check_interval(level, n_boot)
    for name, pair in (("a", a), ("b", b)):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise ValueError(f"{name} must be a (model, tokenizer) pair, got {type(pair).__name__}")
    if not rows:
        raise ValueError("compare_nll needs at least one row {'domain', 'text'}")
    missing = [i for i, r in enumerate(rows) if not {"domain", "text"} <= set(r)]
    if missing:
        raise ValueError(f"rows {missing[:5]} lack 'domain' or 'text'; every row is {{'domain': str, 'text': str}}")
    doc_a = document_nll(*a, rows, batch_size)
    doc_b = document_nll(*b, rows, batch_size)
    out = []
    for domain in sorted(doc_a.domain.unique()):
        at = (doc_a.domain == domain).to_numpy()
        chars = doc_a.n_chars[at].to_numpy()
        sum_a, sum_b = doc_a.nll_sum[at].to_numpy(), doc_b.nll_sum[at].to_numpy()
        low, high = bootstrap_ci(sum_a - sum_b, chars, level=level, n_boot=n_boot, seed=seed)
        npc_a, npc_b = sum_a.sum() / chars.sum(), sum_b.sum() / chars.sum()
        out.append(
            {
                "domain": domain,
                "n_docs": int(at.sum()),
                "n_chars": int(chars.sum()),
                "nats_per_char_a": npc_a,
                "nats_per_char_b": npc_b,
                "difference": npc_a - npc_b,
                "relative": (npc_a - npc_b) / npc_b,
                "ci_low": float(low),
                "ci_high": float(high),
            }
        )
    table = pd.DataFrame(out)
    table.attrs.update(level=level, n_boot=n_boot, seed=seed)
    return table


@torch.no_grad()
def shared_expert_effect(model, tokenizer, rows: list[dict], intact: pd.DataFrame | None = None) -> pd.DataFrame:
    """How much the shared experts carry: per domain, the held-out NLL (nats per token) with every MoE
    layer's shared-expert output zeroed (``hook_shared_out``), against the intact model.

    Columns domain, nll, nll_zeroed, delta. Empty when the model has no shared experts. ``intact``: the
    intact model's :func:`heldout_nll` on the same ``rows``, when the caller has it already.
    """
    if not model.config.moe_num_shared_experts:
        return pd.DataFrame(columns=["domain", "nll", "nll_zeroed", "delta"])
    base = heldout_nll(model, tokenizer, rows) if intact is None else intact
    with model.hooks([("blocks.*.moe.hook_shared_out", lambda out, hook: torch.zeros_like(out))]):
        zeroed = heldout_nll(model, tokenizer, rows)
    table = base[["domain", "nll"]].merge(zeroed[["domain", "nll"]].rename(columns={"nll": "nll_zeroed"}), on="domain")
    return table.assign(delta=table.nll_zeroed - table.nll)


@torch.no_grad()
def task_accuracy(model, tokenizer, rows: list[dict]) -> pd.DataFrame:
    """Per task: fraction of prompts whose answer greedy decoding reproduces exactly.

    Teacher-forced: the answer is appended and every answer token must be the argmax after its
    prefix, which is the same event as greedy generation emitting the answer.
    """
    hits: dict[str, list[bool]] = {}
    for r in rows:
        prompt, answer = tokenizer.encode(r["prompt"]), tokenizer.encode(r["answer"])
        logits = model(torch.tensor([prompt + answer]))[0]
        predicted = logits[len(prompt) - 1 : -1].argmax(-1)
        hits.setdefault(r["task"], []).append(predicted.tolist() == answer)
    return pd.DataFrame([{"task": t, "n": len(h), "accuracy": sum(h) / len(h)} for t, h in hits.items()]).sort_values(
        "task", ignore_index=True
    )


def domain_load_tv(spec: pd.DataFrame) -> pd.DataFrame:
    """Total-variation distance between the expert-load distributions of every pair of domains,
    per layer: ``TV = 0.5 * sum_e |spec(e,A)/k - spec(e,B)/k|`` (spec sums to k over experts)."""
    rows = []
    for layer, frame in spec.groupby("layer"):
        table = frame.pivot(index="group", columns="expert", values="spec")
        dist = table.div(table.sum(axis=1), axis=0)
        for a, b in itertools.combinations(dist.index, 2):
            rows.append({"layer": layer, "a": a, "b": b, "tv": 0.5 * (dist.loc[a] - dist.loc[b]).abs().sum()})
    return pd.DataFrame(rows)


@torch.no_grad()
def routing_report(model, tokenizer, rows: list[dict]) -> dict[str, pd.DataFrame]:
    """Domain specialisation, pairwise TV of per-domain loads, and balance with and without the
    correction bias (the bias is zeroed temporarily to show what aux-loss-free balancing buys)."""
    texts, groups = [r["text"] for r in rows], [r["domain"] for r in rows]
    routing = collect_routing(model, texts, tokenizer=tokenizer, groups=groups, progress=False)
    spec = domain_specialisation(routing)
    biases = [block.mlp.moe_statics.e_score_correction_bias for block in model.blocks if block.is_moe]
    saved = [b.clone() for b in biases]
    try:
        for b in biases:
            b.zero_()
        unbiased = collect_routing(model, texts, tokenizer=tokenizer, groups=groups, progress=False)
    finally:
        for b, s in zip(biases, saved):
            b.copy_(s)
    bal = balance(routing).assign(bias="with")
    bal_off = balance(unbiased).assign(bias="without")
    return {"specialisation": spec, "tv": domain_load_tv(spec), "balance": pd.concat([bal, bal_off], ignore_index=True)}


def summary_line(nll: pd.DataFrame, shuffled: pd.DataFrame) -> str:
    """One line: mean held-out NLL vs shuffled-token NLL (and perplexities)."""
    a, b = nll["nll"].mean(), shuffled["nll"].mean()
    return f"held-out NLL {a:.3f} nats (ppl {math.exp(a):.1f}) vs shuffled tokens {b:.3f} (ppl {math.exp(b):.1f})"
