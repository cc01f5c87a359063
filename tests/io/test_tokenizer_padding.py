"""Tokenizer calls with transformers' padding / truncation / max_length, against transformers' own
PreTrainedTokenizerFast loaded on the toy's tokenizer files."""

from __future__ import annotations

import pytest
import torch

import ernie_lab as el
from ernie_lab.io.sources import toy_dir

transformers = pytest.importorskip("transformers")

TEXTS = ["The capital of Veloria is", "Hi", "", "a much longer sentence, with many words in it."]


@pytest.fixture(scope="module")
def tok():
    return el.load_tokenizer("toy")


@pytest.fixture(scope="module")
def reference():
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(toy_dir())
    hf.padding_side = "left"  # ours by default (transformers': right)
    return hf


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(padding=True),
        dict(padding="longest"),
        dict(padding="max_length", max_length=40),
        dict(padding=True, truncation=True, max_length=4),
        dict(padding="max_length", truncation=True, max_length=6),
        dict(padding=True, truncation="longest_first", max_length=3, truncation_side="left"),
        dict(padding=False),
        dict(padding=False, truncation=True, max_length=2),
        dict(padding=True, truncation=True),  # max_length: model_max_length from tokenizer_config.json
        dict(padding=True, padding_side="right"),
    ],
)
def test_padding_and_truncation_match_transformers(tok, reference, kwargs):
    ref_kwargs = dict(kwargs)
    side = ref_kwargs.pop("padding_side", "left")
    trunc_side = ref_kwargs.pop("truncation_side", "right")
    reference.padding_side, reference.truncation_side = side, trunc_side
    try:
        want = reference(TEXTS, **ref_kwargs)
    finally:
        reference.padding_side, reference.truncation_side = "left", "right"
    got = tok(TEXTS, return_tensors=None, **kwargs)
    assert got["input_ids"] == want["input_ids"]
    assert got["attention_mask"] == want["attention_mask"]
    if len({len(r) for r in want["input_ids"]}) == 1:
        tensors = tok(TEXTS, **kwargs)
        assert torch.equal(tensors.input_ids, torch.tensor(want["input_ids"]))


def test_default_is_left_padding_to_the_longest(tok, reference):
    got = tok(TEXTS)
    want = reference(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(got.input_ids, want["input_ids"])
    assert torch.equal(got.attention_mask, want["attention_mask"])
    assert (got.attention_mask[:, -1] == 1).sum() == sum(bool(t) for t in TEXTS)  # last column is real


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(padding="yes"), "padding must be one of"),
        (dict(truncation="only_second"), "truncation must be one of"),
        (dict(max_length=0), "max_length must be a positive int"),
        (dict(truncation_side="middle"), "truncation_side"),
        (dict(padding=False), "padding=True"),
    ],
)
def test_bad_padding_arguments_are_named(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tok(TEXTS, **kwargs)
