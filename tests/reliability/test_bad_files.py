"""Files and objects that are not what they claim raise named errors saying so: a KV cache made for
another config, a recipe path that is not a Python file (or fails to import), a model.safetensors
that is a symlink loop or a dangling link, a tokenizer.model that is not a SentencePiece model."""

from __future__ import annotations

import shutil

import pytest
import torch

import ernie_lab as el
from ernie_lab.interventions import load_recipe
from ernie_lab.io.sources import toy_dir
from ernie_lab.io.tokenizer import TokenizerError
from ernie_lab.recipes import RecipeError


def test_kv_cache_of_another_config(tmp_path):
    model = el.load_model("toy")
    other = el.ErnieConfig.preset("tiny")
    cache = el.KVCache.allocate(other, 1, 8)
    with pytest.raises(el.model.CacheError, match="made for another config"):
        model(torch.tensor([[5, 6]]), cache=cache)
    assert cache.pos == 0 and all(not lkv.k.any() for lkv in cache.layers)  # nothing was written
    fits = el.KVCache.for_model(model, 1, 8)
    model(torch.tensor([[5, 6]]), cache=fits)
    assert fits.pos == 2


def test_recipe_paths_that_are_not_python(tmp_path):
    text = tmp_path / "recipe.txt"
    text.write_text("def make_hooks(model):\n    return []\n")
    broken = tmp_path / "broken.py"
    broken.write_text("def make_hooks(model:\n")
    for path, message in ((text, "is not a Python file"), (tmp_path, "is not a Python file"), (broken, "SyntaxError")):
        with pytest.raises(RecipeError, match=message):
            load_recipe(str(path))
    good = tmp_path / "good.py"
    good.write_text("def make_hooks(model):\n    return []\n")
    assert load_recipe(str(good)).make_hooks(None) == []


def _model_folder(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(toy_dir() / "config.json", folder / "config.json")
    return folder


def test_symlinked_weights_that_do_not_resolve(tmp_path):
    loop = _model_folder(tmp_path, "loop")
    (loop / "model.safetensors").symlink_to("model.safetensors")
    with pytest.raises(el.CheckpointError, match="model.safetensors is a symbolic link .*symlink loop"):
        el.load_model(loop)
    dangling = _model_folder(tmp_path, "dangling")
    (dangling / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(el.CheckpointError, match="gone.safetensors does not exist"):
        el.load_model(dangling)
    linked = _model_folder(tmp_path, "linked")
    (linked / "model.safetensors").symlink_to(toy_dir() / "model.safetensors")
    assert el.load_model(linked).config.vocab_size > 0  # a link that resolves is read


@pytest.mark.parametrize("content", [b"\xff\x00 not a protobuf \x13\x37" * 10, b""])
def test_tokenizer_model_that_is_not_sentencepiece(tmp_path, content):
    pytest.importorskip("sentencepiece")
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(TokenizerError, match="tokenizer.model is not a SentencePiece model"):
        el.load_tokenizer(tmp_path)
