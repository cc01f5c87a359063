"""TransformerLens' model conveniences: weight views (no copies), tokens <-> text, the padding warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_model

import ernie_lab as el
from ernie_lab.model import MissingTokenizerError


@pytest.fixture(scope="module")
def model():
    return tiny_model(bias_std=0.1)


@pytest.fixture(scope="module")
def toy():
    return el.load_model("toy")


def shares_storage(view: torch.Tensor, weight: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()


def test_weight_views_share_storage_and_reproduce_the_hooks(model):
    cfg = model.config
    assert model.W_E is model.model.embed_tokens.weight
    assert model.W_U.shape == (cfg.hidden_size, cfg.vocab_size)
    assert model.W_U.data_ptr() == model.lm_head.weight.data_ptr()
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    names = ["blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v", "blocks.1.attn.hook_z"]
    names += ["blocks.1.hook_attn_out", "ln_final.hook_normalized", "hook_logits"]
    logits, cache = model.run_with_cache(ids, names_filter=names + ["blocks.1.hook_resid_pre"])
    x = model.blocks[1].input_layernorm(cache["blocks.1.hook_resid_pre"])
    attn = model.blocks[1].self_attn
    for kind, heads in (("Q", cfg.num_attention_heads), ("K", cfg.num_key_value_heads), ("V", cfg.num_key_value_heads)):
        w = getattr(model, f"W_{kind}")[1]
        assert w.shape == (heads, cfg.hidden_size, cfg.d_head)
        assert shares_storage(w, getattr(attn, f"{kind.lower()}_proj").weight)
        got = torch.einsum("bpm,hmd->bphd", x, w)
        torch.testing.assert_close(got, cache[f"blocks.1.attn.hook_{kind.lower()}"], atol=1e-5, rtol=0)
    w_o = model.W_O[1]
    assert w_o.shape == (cfg.num_attention_heads, cfg.d_head, cfg.hidden_size)
    assert shares_storage(w_o, attn.o_proj.weight)
    out = torch.einsum("bphd,hdm->bpm", cache["blocks.1.attn.hook_z"], w_o)
    torch.testing.assert_close(out, cache["blocks.1.hook_attn_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["ln_final.hook_normalized"] @ model.W_U, logits, atol=1e-5, rtol=0)
    assert len(model.W_Q) == cfg.num_hidden_layers


def test_an_edit_through_a_view_edits_the_model(model):
    twin = tiny_model(bias_std=0.1)
    with torch.no_grad():
        twin.W_O[0][1].zero_()  # head 1 of layer 0 writes nothing
    assert not twin.blocks[0].self_attn.o_proj.weight[:, twin.config.d_head : 2 * twin.config.d_head].any()
    assert twin.blocks[0].self_attn.o_proj.weight.any()


def test_tokens_and_strings(toy):
    text = "The capital of Veloria is"
    ids = toy.to_tokens(text)
    assert torch.equal(ids, toy.tokenizer([text]).input_ids)
    assert ids.shape[0] == 1 and ids.device == toy.device
    strs = toy.to_str_tokens(text)
    assert len(strs) == ids.shape[1] and "".join(strs) == text
    assert toy.to_str_tokens(ids) == strs == toy.to_str_tokens(ids[0])
    assert toy.to_string(ids[0]) == text
    assert toy.to_string(ids) == [text]
    batch = toy.to_tokens([text, "Hi"])
    assert toy.to_str_tokens(batch)[0] == strs
    word = toy.to_str_tokens(text)[1]
    assert toy.to_single_token(word) == ids[0, 1].item()
    with pytest.raises(ValueError, match="not one"):
        toy.to_single_token(text)
    direction = toy.tokens_to_residual_directions(ids[0, 1].item())
    assert torch.equal(direction, toy.W_U[:, ids[0, 1]])


def test_model_without_tokenizer_names_the_fix(model):
    with pytest.raises(MissingTokenizerError, match="el.load_tokenizer"):
        model.to_tokens("hi")
    twin = tiny_model()
    twin.tokenizer = el.load_tokenizer("toy")
    assert twin.to_str_tokens([5, 6]) == twin.tokenizer.convert_ids_to_tokens([5, 6])


def test_padded_batch_without_mask_warns_once(toy):
    enc = toy.tokenizer(["The capital of Veloria is", "Hi"])
    assert (enc.input_ids == toy.config.pad_token_id).any()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        masked = toy(**enc)
        assert not seen
        toy(enc.input_ids)
        toy(enc.input_ids)
    assert len(seen) == 1
    assert "attention_mask" in str(seen[0].message) and seen[0].filename == __file__
    # the fix the warning names gives the unpadded logits for the short row
    alone = toy(toy.tokenizer(["Hi"]).input_ids)
    torch.testing.assert_close(masked[1, -2:], alone[0], atol=1e-4, rtol=0)
