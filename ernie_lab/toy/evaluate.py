"""Evaluate the toy model: held-out NLL per domain, task accuracies, expert specialisation and balance.

Used by ``ernie-lab train-toy`` to write the model card and by the tests to hold the shipped
checkpoint to stated floors.
"""

from __future__ import annotations

import itertools
import math

import pandas as pd
import torch

from ernie_lab.ablation.core import token_nll
from ernie_lab.routing import balance, collect_routing, domain_specialisation
from ernie_lab.toy.chat import encode_document


def _batches(rows: list, size: int):
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


@torch.no_grad()
def heldout_nll(
    model, tokenizer, rows: list[dict], batch_size: int = 16, shuffle_seed: int | None = None
) -> pd.DataFrame:
    """Mean next-token NLL (nats) per domain over ``rows`` ``{"domain", "text"}``: columns domain, n_tokens,
    nll (per predicted token) and nats_per_char (the summed NLL over the texts' characters, which compares
    models with different tokenizers).

    With ``shuffle_seed`` each text's tokens are permuted first: the baseline a model that learned
    only unigram statistics would reach, so a large gap means the model learned structure.
    """
    gen = torch.Generator().manual_seed(shuffle_seed or 0)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    chars: dict[str, int] = {}
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
            sums[r["domain"]] = sums.get(r["domain"], 0.0) + valid.sum().item()
            counts[r["domain"]] = counts.get(r["domain"], 0) + valid.numel()
            chars[r["domain"]] = chars.get(r["domain"], 0) + len(r["text"])
    frame = [
        {"domain": d, "n_tokens": counts[d], "nll": sums[d] / counts[d], "nats_per_char": sums[d] / chars[d]}
        for d in sums
    ]
    return pd.DataFrame(frame).sort_values("domain", ignore_index=True)


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
