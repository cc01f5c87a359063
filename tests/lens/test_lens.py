"""Logit lens and attention views: the final lens row is the model's own prediction; patterns are the cache's."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from matplotlib.figure import Figure

import ernie_lab as el
from ernie_lab import lens

TEXT = "The capital of Veloria is Mirren. The capital of Veloria is"


@pytest.fixture(scope="module")
def toy():
    return el.load_model("toy")


@pytest.fixture(scope="module")
def ids(toy):
    return toy.to_tokens(TEXT)


def test_final_lens_row_is_the_model_prediction(toy, ids):
    df = lens.logit_lens(toy, ids)
    n = toy.config.num_hidden_layers
    assert sorted(df["layer"].unique()) == list(range(n + 1))
    assert len(df) == (n + 1) * ids.shape[1]
    final = df[df["layer"] == n].sort_values("pos")
    assert set(final["label"]) == {"final_post"}
    logits = toy(ids)[0].float()
    probs = logits.softmax(-1)
    targets = torch.cat([ids[0, 1:], logits[-1:].argmax(-1)])  # next token; the prediction at the end
    assert final["target_id"].tolist() == targets.tolist()
    want = probs.gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(final["prob"].to_numpy()), want, atol=1e-5, rtol=0)
    ranks = [int((row > row[t]).sum()) + 1 for row, t in zip(logits, targets, strict=True)]
    assert final["rank"].tolist() == ranks
    assert final["top_id"].tolist() == logits.argmax(-1).tolist()
    assert final["token"].tolist() == toy.to_str_tokens(ids)
    assert final["target"].tolist() == toy.tokenizer.convert_ids_to_tokens(targets)


def test_lens_rows_are_the_unembedded_residual(toy, ids):
    df = lens.logit_lens(toy, ids, target=" Mirren")
    L = 2
    _, cache = toy.run_with_cache(ids, names_filter=f"blocks.{L}.hook_resid_pre")
    logits = toy.model.norm(cache[f"blocks.{L}.hook_resid_pre"][0]) @ toy.W_U
    mirren = toy.to_single_token(" Mirren")
    rows = df[df["layer"] == L].sort_values("pos")
    assert set(rows["target_id"]) == {mirren}
    want = logits.softmax(-1)[:, mirren]
    torch.testing.assert_close(torch.tensor(rows["prob"].to_numpy()), want.detach(), atol=1e-5, rtol=0)
    assert rows["top_id"].tolist() == logits.argmax(-1).tolist()
    assert isinstance(lens.plot_logit_lens(df), Figure)
    with pytest.raises(ValueError, match="batch row 3"):
        lens.plot_logit_lens(df, batch=3)
    with pytest.raises(ValueError, match="not one"):
        lens.logit_lens(toy, ids, target=TEXT)


def test_lens_without_tokenizer_and_with_a_given_cache():
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    _, cache = model.run_with_cache(ids)
    df = lens.logit_lens(model, ids, target=torch.tensor([3, 4]), cache=cache)
    assert df["token"].isna().all() and len(df) == 2 * 5 * (model.config.num_hidden_layers + 1)
    assert df.groupby("batch")["target_id"].unique().map(list).tolist() == [[3], [4]]
    assert isinstance(lens.plot_logit_lens(df, batch=1), Figure)


def test_plot_attention_draws_the_cached_patterns(toy, ids):
    _, cache = toy.run_with_cache(ids, names_filter="blocks.*.attn.hook_pattern")
    pattern = lens.attention_pattern(cache, 1)
    assert pattern.shape == (toy.config.num_attention_heads, ids.shape[1], ids.shape[1])
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:2]))
    fig = lens.plot_attention(cache, 1, heads=[0, 2], tokens=ids)
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in shown] == ["L1 H0", "L1 H2"]
    labels = [t.get_text() for t in shown[0].get_yticklabels()]
    assert labels[3] == "3 ␣Veloria"  # sequence_tokens, spaces shown
    assert (shown[1].images[0].get_array() == pattern[2].numpy()).all()
    assert isinstance(lens.plot_attention(cache, 0), Figure)  # all heads, positions as labels
    with pytest.raises(ValueError, match="heads"):
        lens.plot_attention(cache, 1, heads=[99])
    with pytest.raises(ValueError, match="tokens given"):
        lens.plot_attention(cache, 1, tokens=["a", "b"])
    with pytest.raises(KeyError, match="names_filter"):
        lens.plot_attention(toy.run_with_cache(ids, names_filter="hook_embed")[1], 1)


def test_attention_html_shades_by_weight():
    pattern = torch.tensor([[1.0, 0.0, 0.0], [0.25, 0.75, 0.0], [0.1, 0.2, 0.7]])
    out = lens.attention_html(pattern, ["a", "<b>", "c"], query=1)
    assert 'title="pos 1: 0.750"' in out and "rgba(33,102,172,0.250)" in out
    assert "&lt;b&gt;" in out and out.count("outline") == 1
