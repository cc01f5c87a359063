"""Shared plot helpers: figures that display themselves in Jupyter, token labels that show what a
token is (spaces, characters split over several byte-level tokens)."""

from __future__ import annotations

import pytest

import ernie_lab as el
from ernie_lab.plots import NotebookFigure, new_figure, sequence_tokens, token_label


@pytest.fixture(scope="module")
def tok():
    return el.load_tokenizer("toy")


def test_figures_render_as_png_for_jupyter():
    fig, ax = new_figure()
    ax.plot([0, 1], [1, 0])
    assert isinstance(fig, NotebookFigure) and fig._repr_png_().startswith(b"\x89PNG")


def test_token_label_shows_spaces_and_keeps_text():
    assert token_label(" Mirren") == "␣Mirren"
    assert token_label("a ") == "a␣" and token_label("  ") == "␣␣" and token_label("\n") == "⏎"
    assert token_label("学习") == "学习"


@pytest.mark.parametrize("text", ["我们在北京学习中文，龘", "他喜欢唱歌。", "The capital of Veloria is Mirren."])
def test_sequence_tokens_reassemble_characters(tok, text):
    ids = tok.encode(text)
    labels = sequence_tokens(tok, ids)
    assert len(labels) == len(ids) and not any("\\x" in label for label in labels)
    whole = [label for label in labels if not (label.startswith("(") and label.endswith(")") and len(label) == 3)]
    assert "".join(whole) == text  # the tokens that complete characters spell the text, nothing lost
    pieces = tok.convert_ids_to_tokens(ids)
    if any("\\x" in p for p in pieces):  # the toy vocabulary splits rare characters: those are marked
        assert any(label.startswith("(") for label in labels)
