"""Pure next-token selection: logits in, logits or ids out (no model, no state).

Axes: batch vocab. Every function takes next-token logits ``[batch vocab]`` and returns a new tensor
(inputs are never modified). Filters set removed tokens to ``-inf`` so a later softmax gives them 0.
The order :func:`sample_next` applies them is the one transformers' ``generate`` uses: repetition
penalty, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import torch


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``; temperature must be > 0 (0 means greedy, handled by the caller)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to scale logits, got {temperature}")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties at the k-th value are all kept)."""
    if k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {k}")
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to >= ``p``.

    Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration". The most likely token is
    always kept, so a row is never emptied.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the tokens ranked above it already reach p
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the row's largest probability.

    Nguyen et al. 2024, "Min P Sampling". The most likely token always survives.
    """
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def token_presence(
    input_ids: torch.Tensor, vocab_size: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Which tokens each row has seen: bool ``[batch vocab]`` from ``input_ids [batch pos]``.

    Positions where ``attention_mask`` is 0 (padding) do not count, so a padded row is penalised
    exactly like the unpadded prompt.
    """
    real = torch.ones_like(input_ids, dtype=torch.int32)
    if attention_mask is not None:
        real = attention_mask.to(device=input_ids.device, dtype=torch.int32)
    # count hits rather than scatter booleans: with repeated ids a plain scatter keeps an arbitrary write
    hits = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.int32, device=input_ids.device)
    return hits.scatter_add_(-1, input_ids, real) > 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise already-seen tokens: positive logits are divided by ``penalty``, negative ones multiplied.

    The rule of Keskar et al. 2019 (CTRL) as transformers' ``RepetitionPenaltyLogitsProcessor``
    applies it. ``seen`` is bool ``[batch vocab]`` (see :func:`token_presence`); penalty > 1 discourages
    repeats, 1 changes nothing.
    """
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Most likely token of each row: ids ``[batch]`` (first index on ties, like ``argmax``)."""
    return logits.argmax(dim=-1)


def sample_from(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one id per row ``[batch]`` from ``softmax(logits)``; ``generator`` makes it reproducible."""
    probs = logits.float().softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next ids ``[batch]`` from logits ``[batch vocab]``: greedy when ``temperature == 0``, else
    temperature, then the top-k / top-p / min-p filters that are set, then a draw."""
    if temperature == 0:
        return greedy(logits)
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    if min_p is not None:
        logits = min_p_filter(logits, min_p)
    return sample_from(logits, generator)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (None: use torch's global RNG)."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
