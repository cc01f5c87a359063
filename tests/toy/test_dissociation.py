"""Issue 19's acceptance on the shipped toy: its specialised experts are causal, with a noise floor.

Experts are picked on one half of each domain's held-out texts (data/prompts/domains.jsonl) and
ablated on the other half; see :mod:`ernie_lab.toy.causal` for the table's definition.
"""

from __future__ import annotations

import pytest

import ernie_lab as el


@pytest.fixture(scope="module")
def table():
    model, tok = el.load_model("toy"), el.load_tokenizer("toy")
    return el.toy.dissociation(model, tok, controls=4, n_boot=400)


def test_chinese_and_another_domain_dissociate_in_three_layers(table):
    passing = table[table.passes].groupby("domain").layer.nunique()
    assert passing.get("chinese", 0) >= 3, table.query("domain == 'chinese'").to_string()
    assert (passing.drop(index="chinese", errors="ignore") >= 3).any(), table.to_string()


def test_effects_are_held_out_and_above_their_noise_floor(table):
    hits = table[table.passes]
    # a passing effect's interval excludes the control's mean rise (an effect counts only then)
    assert (hits.ci_low > hits.control).all()
    assert (hits.ci_low <= hits.delta).all() and (hits.delta <= hits.ci_high).all()
    assert (table.n_seq > 0).all()


def test_every_moe_layer_matters(table):
    zero_all = table.groupby("layer").zero_all.first()
    assert (zero_all >= 0.2).all(), zero_all
