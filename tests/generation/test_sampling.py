"""Pure sampling functions: hand-made logits, transformers' logits processors as the reference."""

from __future__ import annotations

import math

import pytest
import torch

from ernie_lab.generation.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    greedy,
    make_generator,
    min_p_filter,
    sample_from,
    sample_next,
    token_presence,
    top_k_filter,
    top_p_filter,
)

NEG = float("-inf")


def log_probs(*p: float) -> torch.Tensor:
    return torch.tensor([p]).log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_temperature_scales_and_rejects_zero():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    torch.testing.assert_close(apply_temperature(logits, 0.5), logits * 2)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(logits, 0.0)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -2.0, 2.5, 1.0]])
    out = top_k_filter(logits, 2)
    assert kept(out) == [1, 3]
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])  # survivors unchanged
    assert torch.equal(top_k_filter(logits, 10), logits)
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(logits, 0)


def test_top_p_nucleus_on_hand_made_probabilities():
    logits = log_probs(0.05, 0.5, 0.15, 0.3)
    assert kept(top_p_filter(logits, 0.7)) == [1, 3]  # 0.5 + 0.3 reaches 0.7
    assert kept(top_p_filter(logits, 0.85)) == [1, 2, 3]
    assert kept(top_p_filter(logits, 0.01)) == [1]  # the most likely token always stays
    assert kept(top_p_filter(logits, 1.0)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(logits, 0.0)


def test_min_p_relative_to_the_top_probability():
    logits = log_probs(0.6, 0.3, 0.06, 0.04)
    assert kept(min_p_filter(logits, 0.2)) == [0, 1]  # threshold 0.12
    assert kept(min_p_filter(logits, 0.05)) == [0, 1, 2, 3]  # threshold 0.03
    assert kept(min_p_filter(logits, 1.0)) == [0]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 1.0, -1.0]]))
    assert torch.equal(logits, torch.tensor([[2.0, -2.0, 1.0, -1.0]]))  # input untouched


def test_token_presence_ignores_padding():
    ids = torch.tensor([[0, 0, 5, 3, 5], [7, 1, 2, 2, 1]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    seen = token_presence(ids, 8, mask)
    assert seen[0].nonzero().flatten().tolist() == [3, 5]  # pad id 0 is not "seen"
    assert seen[1].nonzero().flatten().tolist() == [1, 2, 7]
    assert token_presence(ids, 8)[0].nonzero().flatten().tolist() == [0, 3, 5]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filters_match_transformers_processors(seed):
    tp = pytest.importorskip("transformers.generation.logits_process")
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 50, generator=gen) * 3
    ids = torch.randint(0, 50, (3, 7), generator=gen)

    def ref(processor, scores):
        return processor(ids, scores.clone())

    torch.testing.assert_close(top_k_filter(logits, 5), ref(tp.TopKLogitsWarper(5), logits))
    torch.testing.assert_close(top_p_filter(logits, 0.8), ref(tp.TopPLogitsWarper(0.8), logits))
    torch.testing.assert_close(min_p_filter(logits, 0.1), ref(tp.MinPLogitsWarper(0.1), logits))
    torch.testing.assert_close(
        apply_repetition_penalty(logits, token_presence(ids, 50), 1.3),
        ref(tp.RepetitionPenaltyLogitsProcessor(1.3), logits),
    )


def test_greedy_and_temperature_zero_are_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0], [9.0, 1.0, 2.0]])
    assert greedy(logits).tolist() == [1, 0]
    assert sample_next(logits, temperature=0.0, top_k=2, top_p=0.5).tolist() == [1, 0]
    # top_k=1 leaves a draw only one choice
    assert sample_next(logits, temperature=1.0, top_k=1, generator=make_generator(0, "cpu")).tolist() == [1, 0]


def test_seeded_sampling_reproducible_and_seed_dependent():
    logits = torch.zeros(4, 1000)
    a = sample_next(logits, temperature=1.0, generator=make_generator(3, "cpu"))
    b = sample_next(logits, temperature=1.0, generator=make_generator(3, "cpu"))
    c = sample_next(logits, temperature=1.0, generator=make_generator(4, "cpu"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert make_generator(None, "cpu") is None


def test_sampling_frequencies_follow_softmax():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(20_000, 4)
    draws = sample_from(logits, make_generator(0, "cpu"))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    # 4 standard errors of a binomial proportion
    assert torch.all((freq - probs).abs() < 4 * (probs * (1 - probs) / draws.numel()).sqrt())


def test_filters_never_empty_a_row():
    logits = torch.full((1, 6), -math.inf)
    logits[0, 2] = 0.0
    for out in (top_k_filter(logits, 3), top_p_filter(logits, 0.5), min_p_filter(logits, 0.9)):
        assert kept(out) == [2]
