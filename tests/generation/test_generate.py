"""Generation: greedy parity with transformers, cached == uncached, batching, sampling, stopping,
hooks at every step, activation caches over a generation, chat and the ``generate`` command."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_hf_checkpoint

from ernie_lab.cli import main
from ernie_lab.generation.generate import chat, generate, stream
from ernie_lab.io.weights import load_model, save_model
from ernie_lab.model.kv_cache import KVCache

VOCAB = 128  # conftest.TINY_HF
STD = 0.4  # larger than the default init: peaked logits, so no near-tie can flip a greedy token
CONFIGS = {
    "gqa_shared2": {},
    "mqa_shared0_top1": dict(num_key_value_heads=1, moe_num_shared_experts=0, moe_k=1),
    "bias_mha_untied": dict(use_bias=True, num_key_value_heads=4, tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (transformers model, our model from the same checkpoint)."""
    out = {}
    for seed, (name, overrides) in enumerate(CONFIGS.items()):
        directory = tmp_path_factory.mktemp(name)
        hf = save_hf_checkpoint(directory, std=STD, seed=seed, **overrides)
        out[name] = (hf, load_model(directory))
    return out


@pytest.fixture(scope="module")
def model(pairs):
    return pairs["gqa_shared2"][1]


def prompt(batch: int = 2, pos: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


# ----------------------------------------------------------------------------- parity and caching
@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_matches_transformers(pairs, name):
    hf, ours = pairs[name]
    ids = prompt(batch=2, pos=6, seed=1)
    new = 12
    with torch.no_grad():
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
        )
    got = generate(ours, ids, max_new_tokens=new, eos_token_id=())  # as min_new_tokens: never stop early
    assert got.shape == (2, 6 + new)
    assert torch.equal(got, ref)


def test_cached_decode_logits_equal_full_forward(model):
    ids = prompt(batch=2, pos=5)
    steps = []
    hooks = [("hook_logits", lambda x, hook: steps.append(x[:, -1].clone()))]
    out = generate(model, ids, max_new_tokens=8, fwd_hooks=hooks)
    full = model(out)
    assert len(steps) == 8  # prefill + 7 decode steps (the last token is never fed back)
    for i, step_logits in enumerate(steps):
        torch.testing.assert_close(step_logits, full[:, 4 + i], atol=1e-4, rtol=1e-4)


def test_cache_follows_the_layers_devices(model):
    """A model spread over devices gets each layer's keys and values on that layer's device."""
    n = model.config.num_hidden_layers
    devices = ["cpu"] * (n - 1) + ["meta"]
    cache = KVCache.allocate(model.config, 2, 16, device=devices)
    assert [kv.k.device.type for kv in cache.layers] == [torch.device(d).type for d in devices]
    assert cache.key_mask.device.type == "cpu"
    made = KVCache.for_model(model, 2, 16)
    assert all(kv.k.device == b.input_layernorm.weight.device for kv, b in zip(made.layers, model.blocks, strict=True))
    assert made.layers[0].k.dtype == model.model.embed_tokens.weight.dtype
    with pytest.raises(ValueError, match="2 cache devices given for"):
        KVCache.allocate(model.config, 2, 16, device=["cpu", "cpu"])


def test_compiled_decode_equals_eager(model):
    ids = prompt(batch=1, pos=5)
    eager = generate(model, ids, max_new_tokens=6)
    assert torch.equal(generate(model, ids, max_new_tokens=6, compile=True), eager)
    # the compiled step reads the weights at every call: an in-place edit changes its output too
    norm = model.model.norm.weight
    saved = norm.detach().clone()
    with torch.no_grad():
        norm.mul_(-1.0)
    try:
        flipped = generate(model, ids, max_new_tokens=6)
        assert not torch.equal(flipped, eager)
        assert torch.equal(generate(model, ids, max_new_tokens=6, compile=True), flipped)
    finally:
        with torch.no_grad():
            norm.copy_(saved)


def test_left_padded_batch_equals_single_runs(model):
    rows = [prompt(1, n, seed=n)[0] for n in (3, 8, 5)]
    ids, mask = left_pad(rows)
    batch = generate(model, ids, attention_mask=mask, max_new_tokens=10)
    for i, r in enumerate(rows):
        single = generate(model, r, max_new_tokens=10)
        assert torch.equal(batch[i, ids.shape[1] :], single[0, len(r) :])


def test_stream_yields_the_generate_tokens(model):
    ids = prompt()
    steps = list(stream(model, ids, max_new_tokens=6))
    assert len(steps) == 6 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, dim=1), generate(model, ids, max_new_tokens=6)[:, ids.shape[1] :])
    assert torch.equal(model.stream(ids, max_new_tokens=6).__next__(), steps[0])


def test_model_generate_delegates(model):
    ids = prompt()
    assert torch.equal(model.generate(ids, max_new_tokens=4), generate(model, ids, max_new_tokens=4))
    one_d = generate(model, ids[0], max_new_tokens=4)
    assert torch.equal(one_d, generate(model, ids[:1], max_new_tokens=4))


# ----------------------------------------------------------------------------- sampling
def test_seeded_sampling_reproducible_and_seeds_differ(model):
    ids = prompt()
    kw = dict(max_new_tokens=12, temperature=3.0, top_p=0.95)
    a = generate(model, ids, seed=7, **kw)
    assert torch.equal(a, generate(model, ids, seed=7, **kw))
    assert not torch.equal(a, generate(model, ids, seed=8, **kw))


def test_top_k_one_sampling_is_greedy(model):
    ids = prompt()
    sampled = generate(model, ids, max_new_tokens=8, temperature=2.0, top_k=1, seed=0)
    assert torch.equal(sampled, generate(model, ids, max_new_tokens=8))


def test_repetition_penalty_prevents_repeats(model):
    ids = prompt(batch=1, pos=4)
    plain = generate(model, ids, max_new_tokens=16)[0].tolist()
    assert len(set(plain)) < len(plain), "pick a prompt whose greedy continuation repeats a token"
    out = generate(model, ids, max_new_tokens=16, repetition_penalty=1e4)[0].tolist()
    assert len(set(out)) == len(out)


# ----------------------------------------------------------------------------- stopping
def test_eos_int_and_list_end_rows_and_pad(model):
    ids = prompt(batch=2, pos=6, seed=3)
    free = generate(model, ids, max_new_tokens=10)
    eos = int(free[0, 6 + 2])  # row 0's third new token
    assert eos not in free[0, 6 : 6 + 2].tolist()
    out = generate(model, ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=99)
    row0 = out[0, 6:].tolist()
    assert row0[:3] == free[0, 6:9].tolist() and row0[3:] == [99] * (len(row0) - 3)
    if eos not in free[1, 6:].tolist():  # row 1 runs on unchanged
        assert torch.equal(out[1], free[1, : out.shape[1]])
    listed = generate(model, ids, max_new_tokens=10, eos_token_id=[VOCAB - 1, eos], pad_token_id=99)
    assert torch.equal(listed[0], out[0])


def test_generation_stops_when_every_row_ended(model):
    ids = prompt(batch=1, pos=5, seed=4)
    free = generate(model, ids, max_new_tokens=8)
    eos = int(free[0, 5 + 1])
    assert eos != int(free[0, 5])
    out = generate(model, ids, max_new_tokens=8, eos_token_id=eos)
    assert out.shape == (1, 5 + 2)


class CharTokenizer:
    """A stand-in tokenizer for stop strings: id i decodes to one letter."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + int(i) % 26) for i in ids)


def test_stop_strings_end_rows(model):
    ids = prompt(batch=2, pos=6, seed=5)
    free = generate(model, ids, max_new_tokens=10)
    tok = CharTokenizer()
    stop = tok.decode(free[0, 6 + 2 : 6 + 4])  # spans row 0's third and fourth new tokens
    out = generate(model, ids, max_new_tokens=10, stop_strings=[stop], tokenizer=tok, pad_token_id=VOCAB - 1)
    text = tok.decode(free[0, 6:])
    end = text.index(stop) + len(stop)
    assert out[0, 6 : 6 + end].tolist() == free[0, 6 : 6 + end].tolist()
    assert set(out[0, 6 + end :].tolist()) <= {VOCAB - 1}
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ids, max_new_tokens=2, stop_strings="x")


def test_bad_arguments_raise(model):
    ids = prompt()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, ids, attention_mask=torch.tensor([[1] * 6 + [0], [1] * 7]), max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, ids + VOCAB, max_new_tokens=2)
    assert torch.equal(generate(model, ids, max_new_tokens=0), ids)


# ----------------------------------------------------------------------------- hooks during generation
def test_hooks_fire_once_per_step_with_documented_shapes(model):
    ids = prompt(batch=2, pos=5)
    seen: dict[str, list[tuple[int, ...]]] = {}

    def record(x, hook):
        seen.setdefault(hook.name, []).append(tuple(x.shape))

    names = ["blocks.0.hook_resid_pre", "blocks.1.moe.hook_topk_idx", "blocks.2.attn.hook_pattern"]
    generate(model, ids, max_new_tokens=4, fwd_hooks=[(n, record) for n in names])
    c = model.config
    assert seen["blocks.0.hook_resid_pre"] == [(2, 5, c.hidden_size)] + [(2, 1, c.hidden_size)] * 3
    assert seen["blocks.1.moe.hook_topk_idx"] == [(2, 5, c.moe_k)] + [(2, 1, c.moe_k)] * 3
    heads = c.num_attention_heads
    assert seen["blocks.2.attn.hook_pattern"] == [(2, heads, 5, 5)] + [(2, heads, 1, 6 + i) for i in range(3)]
    assert all(not hp.fwd for hp in model.hook_dict.values())  # removed afterwards


def test_hooks_from_the_context_manager_and_edits_steer_generation(model):
    ids = prompt(batch=1, pos=5)
    calls = []
    with model.hooks([("hook_embed", lambda x, hook: calls.append(x.shape[1]))]):
        generate(model, ids, max_new_tokens=3)
    assert calls == [5, 1, 1]
    # a forced token through an edited logits hook: every step picks it
    force = [("hook_logits", lambda x, hook: torch.where(torch.arange(VOCAB) == 3, 1e4, x))]
    assert generate(model, ids, max_new_tokens=4, fwd_hooks=force)[0, 5:].tolist() == [3] * 4


@pytest.mark.parametrize(
    "names",
    [
        "blocks.*.moe.hook_topk_idx",
        ["blocks.1.moe.hook_router_probs", "blocks.2.moe.hook_topk_weights", "blocks.0.hook_resid_post"],
        ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_attn_scores", "blocks.2.moe.hook_expert_out"],
    ],
)
def test_cache_names_concatenate_to_run_with_cache(model, names):
    rows = [prompt(1, n, seed=10 + n)[0] for n in (4, 7)]
    ids, mask = left_pad(rows)
    out, cache = generate(model, ids, attention_mask=mask, max_new_tokens=6, cache_names=names)
    fed = out[:, :-1]  # every token that went through the model
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
    _, ref = model.run_with_cache(fed, names_filter=names, attention_mask=full_mask)
    assert set(cache.keys()) == set(ref.keys())
    for name in ref:
        assert cache[name].shape == ref[name].shape, name
        if name.endswith("topk_idx"):
            assert torch.equal(cache[name], ref[name])
        elif name.endswith("attn_scores"):  # -inf where masked, on both sides
            torch.testing.assert_close(cache[name], ref[name], atol=1e-4, rtol=1e-4)
        else:
            torch.testing.assert_close(cache[name], ref[name], atol=1e-5, rtol=1e-4)


def test_gathered_expert_path_equals_sorted_path(model):
    """The accelerator decode path (gathered expert weights, no host sync) gives the CPU numbers."""
    from einops import rearrange

    from ernie_lab.model.moe import _gathered_experts, _mix

    moe = model.blocks[1].mlp
    x = torch.randn(3, 2, model.config.hidden_size)
    idx, weights = moe.route(x)
    gathered = _gathered_experts(moe.experts, rearrange(x, "b p d -> (b p) d"), rearrange(idx, "b p k -> (b p) k"))
    got = _mix(rearrange(gathered, "(b p) k d -> b p k d", b=3), weights)
    torch.testing.assert_close(got, moe._routed_fast(x, idx, weights), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(5,), (1, 5), (1, 1, 5), (2, 5), (3, 1, 5), (4, 5), (0, 5), (2, 2, 5)])
def test_decode_linear_equals_f_linear(shape):
    from ernie_lab.model.layers import linear

    weight, bias = torch.randn(7, 5), torch.randn(7)
    x = torch.randn(*shape)
    torch.testing.assert_close(linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))


def test_decode_linear_rows_do_not_depend_on_their_neighbours():
    """Patching one position must leave the other positions' numbers alone."""
    from ernie_lab.model.layers import linear

    weight, rows = torch.randn(64, 48), torch.randn(3, 48)
    edited = rows.clone()
    edited[0], edited[2] = 0.0, 100.0
    assert torch.equal(linear(edited, weight)[1], linear(rows, weight)[1])


def test_single_token_fast_path_equals_explicit_path(model):
    ids = prompt(batch=1, pos=6)
    fast = generate(model, ids, max_new_tokens=5, cache_names="hook_logits")[1]["hook_logits"]
    names = ["hook_logits", "blocks.*.moe.hook_expert_out", "blocks.*.attn.hook_pattern"]
    explicit = generate(model, ids, max_new_tokens=5, cache_names=names)[1]["hook_logits"]
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- chat and the command
@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """A tiny random checkpoint next to the toy tokenizer (vocab 4096)."""
    from ernie_lab.io.sources import toy_dir

    directory = tmp_path_factory.mktemp("chat")
    save_hf_checkpoint(directory, std=STD, vocab_size=4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy_dir() / name, directory / name)
    return directory


def test_chat_renders_template_and_decodes_reply(chat_dir):
    from ernie_lab.io.tokenizer import load_tokenizer

    model, tok = load_model(chat_dir), load_tokenizer(chat_dir)
    messages = [{"role": "user", "content": "Hello there"}]
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    lengths = []
    reply = chat(
        model, tok, messages, max_new_tokens=6, fwd_hooks=[("hook_embed", lambda x, h: lengths.append(x.shape[1]))]
    )
    assert lengths[0] == len(prompt_ids)
    out = generate(model, torch.tensor([prompt_ids]), max_new_tokens=6, eos_token_id=tok.eos_token_ids)
    assert reply == tok.decode(out[0, len(prompt_ids) :], skip_special_tokens=True).strip()
    assert chat(model, tok, "Hello there", max_new_tokens=6) == reply


def test_generate_command_streams_text(chat_dir, capsys):
    from ernie_lab.io.tokenizer import load_tokenizer

    tok = load_tokenizer(chat_dir)
    assert main(["generate", str(chat_dir), "--prompt", "Once upon", "--max-new-tokens", "5", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    ids = tok.encode("Once upon")
    out = generate(load_model(chat_dir), torch.tensor([ids]), max_new_tokens=5, eos_token_id=tok.eos_token_ids)
    new = [t for t in out[0, len(ids) :].tolist() if t not in tok.eos_token_ids]
    # a trailing incomplete UTF-8 character (a lone byte piece) is held back, never printed as U+FFFD
    assert printed == "Once upon" + tok.decode(new, skip_special_tokens=True).rstrip("\ufffd") + "\n"
    assert main(["generate", str(chat_dir), "--prompt", "Hi", "--chat", "--max-new-tokens", "3", "--no-progress"]) == 0
    assert capsys.readouterr().out.endswith("\n")


# ----------------------------------------------------------------------------- eos default
def test_eos_defaults_to_generation_config_and_empty_disables(model):
    ids = prompt(batch=1, pos=5, seed=4)
    free = generate(model, ids, max_new_tokens=8, eos_token_id=())
    eos = int(free[0, 5 + 1])
    assert eos != int(free[0, 5])
    saved = model.generation_config
    try:
        model.generation_config = dataclasses.replace(saved, eos_token_id=[VOCAB - 1, eos])
        assert generate(model, ids, max_new_tokens=8).shape == (1, 5 + 2)  # like transformers: config's eos
        assert torch.equal(generate(model, ids, max_new_tokens=8, eos_token_id=()), free)
    finally:
        model.generation_config = saved


def test_load_model_reads_generation_config(tmp_path):
    toy = load_model("toy")
    assert load_model(save_model(toy, tmp_path / "copy")).generation_config == toy.generation_config
    stored = json.loads((Path(__file__).parents[2] / "data/toy/generation_config.json").read_text())
    assert toy.generation_config.eos_token_ids == stored["eos_token_id"] != toy.config.eos_token_id
    assert toy.generation_config.pad_token_id == stored["pad_token_id"]
