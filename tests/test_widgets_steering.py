"""The steering explorer: its plain logic (continuations with and without steering) and its callbacks
triggered programmatically."""

from __future__ import annotations

import pandas as pd
import pytest

import ernie_lab as el
from ernie_lab import widgets as W
from ernie_lab.toy.prompts import load_prompt_set

pytest.importorskip("ipywidgets")


@pytest.fixture(scope="module")
def model():
    return el.load_model("toy")


@pytest.fixture(scope="module")
def tok():
    return el.load_tokenizer("toy")


def test_steered_continuations(model, tok):
    same = W.steered_continuations(model, tok, "The capital of Veloria is", {}, {}, max_new_tokens=6)
    assert list(same["run"]) == ["plain", "steered"] and same["continuation"].nunique() == 1
    forced = {L: [0, 1] for L in model.config.moe_layers}
    moved = W.steered_continuations(model, tok, "The capital of Veloria is", forced, {}, max_new_tokens=6)
    assert moved["continuation"].nunique() == 2  # forcing every layer's experts changes the text


def test_steering_explorer_callbacks(model, tok):
    docs = pd.DataFrame(load_prompt_set("domains")).groupby("domain").head(2)
    sets = {d: g.text.tolist() for d, g in docs.groupby("domain")}
    w = W.steering_explorer(model, tok, sets, prompt="The capital of Veloria is")
    c = w.controls
    assert bytes(c.image.value) == b""
    c.compare.click()
    assert bytes(c.image.value).startswith(b"\x89PNG")
    c.generate.click()
    assert "<table" in c.output.value and "steered" in c.output.value and "{}" not in c.output.value
    c.steer.value = False
    c.generate.click()
    assert c.output.value.count("{}") == 2  # nothing forced on or off
    with pytest.raises(ValueError, match="two prompt sets"):
        W.steering_explorer(model, tok, {"one": ["x"]})
