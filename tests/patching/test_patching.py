"""Activation patching, attribution patching and their plots (ernie_lab.patching.grids / attribution).

Known answers by construction: positions before the corrupted token carry identical activations in
both runs (causal attention), the last layer cannot move the last position from another position,
patching everything upstream reproduces the source run, and a linear readout makes attribution
patching exact.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from ernie_lab import ErnieConfig, ErnieMoE
from ernie_lab import patching as P

DIFF = 3  # the corrupted position
N_POS = 8
TOL = 1e-5


def tiny(**changes) -> ErnieMoE:
    torch.manual_seed(0)
    return ErnieMoE(ErnieConfig.preset("tiny").replace(initializer_range=0.2, **changes))


def pair(seed: int = 1, batch: int | None = None, vocab: int = 512):
    """Random clean ids and a copy with one token changed at DIFF."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (N_POS,) if batch is None else (batch, N_POS), generator=g)
    corrupt = clean.clone()
    corrupt[..., DIFF] = (corrupt[..., DIFF] + 7) % vocab
    return clean, corrupt


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def setup(model):
    clean, corrupt = pair()
    s = P.PatchingSetup(model, clean, corrupt, P.logit_diff(5, 6), progress=False)
    assert abs(s.m_clean - s.m_corrupt) > 0.1  # a usable, non-degenerate case
    return s


def manual_metric(model, ids, hooks, metric) -> float:
    """One patched run with plain run_with_hooks: the reference the batched grids must match."""
    with torch.no_grad():
        return P.reduce_metric(metric(model.run_with_hooks(ids, fwd_hooks=hooks))).item()


def set_at(src: torch.Tensor, index):
    def fn(x, hook):
        x = x.clone()
        x[index] = src[index]
        return x

    return fn


# ------------------------------------------------------------------------------------------ metrics
def test_metrics_on_hand_made_logits():
    logits = torch.zeros(2, 3, 10)
    logits[0, -1, 4], logits[0, -1, 7] = 3.0, 1.0
    logits[1, 1, 2], logits[1, 1, 4] = 5.0, -1.0
    assert P.logit_diff(4, 7)(logits).tolist() == [2.0, 0.0]
    assert P.logit_diff(torch.tensor([4, 2]), [7, 4])(logits).tolist() == [2.0, 0.0]
    assert P.logit_diff([4, 2], [7, 4], position=torch.tensor([2, 1]))(logits).tolist() == [2.0, 6.0]
    with pytest.raises(ValueError, match="3 entries"):
        P.logit_diff([1, 2, 3], 0)(logits)

    nll = P.loss_metric([4, 2])(logits)
    expected = -F.log_softmax(logits[:, -1], -1)[[0, 1], [4, 2]]
    torch.testing.assert_close(nll, expected)
    targets = torch.tensor([[1, 2, -100], [2, -100, -100]])
    per_pos = P.loss_metric(targets)(logits)
    ref = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(-1) / torch.tensor([2.0, 1.0])
    torch.testing.assert_close(per_pos, ref)

    kl = P.kl_metric(logits)
    assert kl(logits).abs().max() < 1e-6
    other = torch.randn(2, 3, 10)
    want = F.kl_div(other[:, -1].log_softmax(-1), logits[:, -1].log_softmax(-1), log_target=True, reduction="none")
    torch.testing.assert_close(kl(other), want.sum(-1))
    assert P.kl_metric(logits, position=None)(other).shape == (2,)


def test_input_validation(model):
    clean, corrupt = pair()
    with pytest.raises(ValueError, match="8 tokens.*7"):
        P.PatchingSetup(model, clean, corrupt[:7], P.logit_diff(5, 6))
    with pytest.raises(ValueError, match="direction"):
        P.PatchingSetup(model, clean, corrupt, P.logit_diff(5, 6), direction="sideways")
    s = P.PatchingSetup(model, clean, corrupt, P.logit_diff(5, 6), progress=False)
    with pytest.raises(ValueError, match="MoE layers"):
        s.experts(layers=[0])
    with pytest.raises(ValueError, match="hook"):
        s.residual("resid_sideways")


def test_equal_runs_give_nan_with_a_warning(model):
    clean, _ = pair()
    with pytest.warns(RuntimeWarning, match="NaN"):
        s = P.PatchingSetup(model, clean, clean, P.logit_diff(5, 6), progress=False)
    df = s.residual(layers=[0], positions=[0, 1])
    assert df["effect"].isna().all()
    assert (df["metric"] - s.m_clean).abs().max() < TOL


# ------------------------------------------------------------------------------------------ residual
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_patching_everything_upstream_restores_fully(model, direction):
    clean, corrupt = pair()
    s = P.PatchingSetup(model, clean, corrupt, P.logit_diff(5, 6), direction=direction, progress=False)
    last = model.config.num_hidden_layers - 1
    whole = s.residual("resid_pre", per_position=False)  # layer 0: the embeddings; last: its input
    assert set(whole["layer"]) == {0, 1, 2} and (whole["effect"] - 1).abs().max() < TOL
    # the last position's output of the last block fixes the last position's logits
    tail = s.residual("resid_post", layers=[last], positions=[-1])
    assert abs(tail["effect"].item() - 1) < TOL
    # layer 0 at the corrupted token is the whole difference between the runs
    assert abs(s.residual("resid_pre", layers=[0], positions=[DIFF])["effect"].item() - 1) < TOL


def test_identical_prefix_and_unreachable_positions(setup):
    """Before DIFF both runs agree, so denoising there is corrupt-into-corrupt (0) and noising is
    clean-into-clean (metric m(clean), i.e. 1 on the clean/corrupt scale); the last block cannot
    reach the last position from another position."""
    last = setup.model.config.num_hidden_layers - 1
    noising = P.PatchingSetup(
        setup.model, setup.clean_ids, setup.corrupt_ids, setup.metric, direction="noising", progress=False
    )
    for hook in ("resid_pre", "attn_out", "mlp_out"):
        den, noi = setup.residual(hook), noising.residual(hook)
        early = den["pos"] < DIFF
        assert den.loc[early, "effect"].abs().max() < TOL
        assert (noi.loc[early, "metric"] - setup.m_clean).abs().max() < TOL
        assert noi.loc[early, "effect"].abs().max() < TOL  # 0 moved, 1 - 0 = 1 on the clean scale
        unreachable = (den["layer"] == last) & (den["pos"] < N_POS - 1)
        if hook != "resid_pre":
            assert den.loc[unreachable, "effect"].abs().max() < TOL


def test_noising_is_denoising_with_the_roles_swapped(model):
    clean, corrupt = pair(seed=2)
    metric = P.logit_diff(5, 6)
    noise = P.patch_residual(model, clean, corrupt, metric, "attn_out", direction="noising", progress=False)
    swapped = P.patch_residual(model, corrupt, clean, metric, "attn_out", progress=False)
    assert (noise["effect"] - swapped["effect"]).abs().max() < TOL


def test_batched_grid_equals_one_patch_per_run(model, setup):
    big = setup.residual("resid_pre")
    setup.batch_size = 1
    try:
        single = setup.residual("resid_pre")
    finally:
        setup.batch_size = 32
    assert (big["metric"] - single["metric"]).abs().max() < TOL
    _, cache = model.run_with_cache(setup.clean_ids, names_filter="blocks.*.hook_resid_pre")
    for layer, pos in [(0, DIFF), (1, DIFF + 2), (2, N_POS - 1)]:
        name = f"blocks.{layer}.hook_resid_pre"
        want = manual_metric(model, setup.corrupt_ids, [(name, set_at(cache[name], (slice(None), pos)))], setup.metric)
        got = big.query("layer == @layer and pos == @pos")["metric"].item()
        assert abs(got - want) < TOL


def test_prompt_batch_is_patched_together(model):
    clean, corrupt = pair(seed=3, batch=2)
    metric = P.logit_diff([5, 9], [6, 11])
    s = P.PatchingSetup(model, clean, corrupt, metric, batch_size=3, progress=False)
    df = s.residual("mlp_out", layers=[1])
    _, cache = model.run_with_cache(clean, names_filter="blocks.1.hook_mlp_out")
    src = cache["blocks.1.hook_mlp_out"]
    for pos in (DIFF, N_POS - 1):
        want = manual_metric(model, corrupt, [("blocks.1.hook_mlp_out", set_at(src, (slice(None), pos)))], metric)
        assert abs(df.query("pos == @pos")["metric"].item() - want) < TOL


def test_token_labels_and_frame_layout(model):
    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [f"t{i}" for i in ids]

    clean, corrupt = pair()
    df = P.patch_residual(model, clean, corrupt, P.logit_diff(5, 6), tokenizer=Tok(), layers=[0], progress=False)
    assert list(df.columns) == ["hook", "layer", "pos", "token", "metric", "effect", "ci_low", "ci_high", "direction"]
    assert df["token"][0] == f"t{clean[0].item()}"
    assert df["token"][DIFF] == f"t{clean[DIFF].item()}/t{corrupt[DIFF].item()}"


def test_functions_equal_setup_methods(model, setup):
    """The one-call functions build the same setup and grid as the PatchingSetup methods."""
    args = (model, setup.clean_ids, setup.corrupt_ids, setup.metric)
    pairs = [
        (P.patch_heads(*args, layers=[2], progress=False), setup.heads(layers=[2])),
        (P.patch_experts(*args, layers=[1], progress=False), setup.experts(layers=[1])),
        (P.patch_routing(*args, per_position=True, progress=False), setup.routing(per_position=True)),
        (P.attribution_patching(*args, "attn_out", layers=[1]), setup.attribution("attn_out", layers=[1])),
    ]
    for got, want in pairs:
        pd.testing.assert_frame_equal(got, want, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------ heads
def test_heads_match_manual_patches(model, setup):
    df = setup.heads(per_position=True, layers=[1])
    _, cache = model.run_with_cache(setup.clean_ids, names_filter="blocks.1.attn.hook_z")
    z = cache["blocks.1.attn.hook_z"]
    for pos, head in [(DIFF, 0), (N_POS - 1, 3), (1, 2)]:
        want = manual_metric(
            model, setup.corrupt_ids, [("blocks.1.attn.hook_z", set_at(z, (0, pos, head)))], setup.metric
        )
        assert abs(df.query("pos == @pos and head == @head")["metric"].item() - want) < TOL
    assert df.query("pos < @DIFF")["effect"].abs().max() < TOL


def test_single_head_equals_attention_output():
    one_head = tiny(num_attention_heads=1, num_key_value_heads=1)
    clean, corrupt = pair()
    s = P.PatchingSetup(one_head, clean, corrupt, P.logit_diff(5, 6), progress=False)
    heads = s.heads()
    attn = s.residual("attn_out", per_position=False)
    assert abs(heads["effect"].to_numpy() - attn["effect"].to_numpy()).max() < TOL


# ------------------------------------------------------------------------------------------ MoE
def test_routing_patching(model, setup):
    df = setup.routing(per_position=True)
    assert df.query("pos < @DIFF")["n_rerouted"].sum() == 0
    assert df.query("pos < @DIFF")["effect"].abs().max() < TOL  # identical idx and weights: no change
    unreachable = (df["layer"] == model.config.num_hidden_layers - 1) & (df["pos"] < N_POS - 1)
    assert df.loc[unreachable, "effect"].abs().max() < TOL
    names = ["blocks.1.moe.hook_topk_idx", "blocks.1.moe.hook_topk_weights"]
    _, cache = model.run_with_cache(setup.clean_ids, names_filter=names)
    whole = setup.routing(layers=[1])
    hooks = [(n, lambda x, hook: cache[hook.name]) for n in names]
    assert abs(whole["metric"].item() - manual_metric(model, setup.corrupt_ids, hooks, setup.metric)) < TOL


def manual_expert_metric(model, s: P.PatchingSetup, layer: int, expert: int) -> float:
    """Independent loop version of expert-output patching (denoising)."""
    idx, out = f"blocks.{layer}.moe.hook_topk_idx", f"blocks.{layer}.moe.hook_expert_out"
    _, src = model.run_with_cache(s.clean_ids, names_filter=[idx, out])
    _, base = model.run_with_cache(s.corrupt_ids, names_filter=[idx])

    def fn(x, hook):
        x = x.clone()
        for b in range(x.shape[0]):
            for p in range(x.shape[1]):
                here, there = base[idx][b, p].tolist(), src[idx][b, p].tolist()
                if expert in here and expert in there:
                    x[b, p, here.index(expert)] = src[out][b, p, there.index(expert)]
        return x

    return manual_metric(model, s.corrupt_ids, [(out, fn)], s.metric)


def test_expert_patching_matches_loops_and_counts_overlap(model, setup):
    df = setup.experts()
    for layer in model.config.moe_layers:
        a = setup.acts("base", [f"blocks.{layer}.moe.hook_topk_idx"])[f"blocks.{layer}.moe.hook_topk_idx"][0]
        b = setup.acts("source", [f"blocks.{layer}.moe.hook_topk_idx"])[f"blocks.{layer}.moe.hook_topk_idx"][0]
        overlap = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b, strict=True))
        assert df.query("layer == @layer")["n_positions"].sum() == overlap
        # the case worth testing: an expert sitting in different slots in the two runs
        moved = any(
            e in y.tolist() and x.tolist().index(e) != y.tolist().index(e)
            for x, y in zip(a, b, strict=True)
            for e in x.tolist()
        )
        assert moved
        for expert in range(model.config.moe_num_experts):
            got = df.query("layer == @layer and expert == @expert")["metric"].item()
            assert abs(got - manual_expert_metric(model, setup, layer, expert)) < TOL


def test_sole_expert_equals_mlp_out():
    """k = 1, no shared experts, expert 0 forced by the correction bias: mlp_out is expert 0's output
    (weight p/p = 1), so patching expert 0 is patching mlp_out at every position."""
    m = tiny(moe_k=1, moe_num_shared_experts=0)
    with torch.no_grad():
        m.blocks[1].mlp.moe_statics.e_score_correction_bias[0, 0] = 10.0
    clean, corrupt = pair()
    s = P.PatchingSetup(m, clean, corrupt, P.logit_diff(5, 6), progress=False)
    experts = s.experts(layers=[1])
    row = experts.query("expert == 0")
    assert row["n_positions"].item() == N_POS and experts["n_positions"].sum() == N_POS
    mlp = s.residual("mlp_out", layers=[1], per_position=False)
    assert abs(row["effect"].item() - mlp["effect"].item()) < TOL
    assert abs(mlp["effect"].item()) > 1e-3


# ------------------------------------------------------------------------------------------ attribution
def linear_readout_hooks(model):
    """Skip the final RMSNorm: logits = W_U @ resid_post of the last block, linear in its mlp_out."""
    last, seen = model.config.num_hidden_layers - 1, {}

    def grab(x, hook):
        seen["x"] = x

    return [(f"blocks.{last}.hook_resid_post", grab), ("ln_final.hook_normalized", lambda x, hook: seen["x"])]


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_attribution_is_exact_when_linear(model, direction):
    clean, corrupt = pair(seed=4, batch=4)
    hooks = linear_readout_hooks(model)
    s = P.PatchingSetup(model, clean, corrupt, P.logit_diff(5, 6), direction=direction, fwd_hooks=hooks, progress=False)
    last = model.config.num_hidden_layers - 1
    for hook, exact in (("mlp_out", s.residual("mlp_out", layers=[last])), ("expert_out", s.experts(layers=[last]))):
        attr = s.attribution(hook, layers=[last])
        merged = P.merge_effects(exact, attr)
        assert len(merged) == len(exact) == len(attr)
        assert (merged["effect_exact"] - merged["effect_attr"]).abs().max() < 1e-4
        assert merged["effect_exact"].abs().max() > 1e-2  # a non-trivial case
    whole = s.attribution("mlp_out", layers=[last], per_position=False)
    assert (
        abs(whole["effect"].item() - s.residual("mlp_out", layers=[last], per_position=False)["effect"].item()) < 1e-4
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_attribution_tracks_exact_for_a_small_corruption(seed):
    """Corrupted token = the clean token's embedding plus 1% noise: first order must dominate, as long as
    no routing decision flips (a flip is a jump that a gradient cannot see)."""
    m = tiny()
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(10, 500, (N_POS,), generator=g)
    corrupt = clean.clone()
    corrupt[DIFF] = 501
    with torch.no_grad():
        w = m.model.embed_tokens.weight
        w[501] = (
            w[clean[DIFF]] + 0.01 * w[clean[DIFF]].norm() * torch.randn(w.shape[1], generator=g) / w.shape[1] ** 0.5
        )
    s = P.PatchingSetup(m, clean, corrupt, P.logit_diff(5, 6), progress=False)
    assert s.routing(per_position=True)["n_rerouted"].sum() == 0
    grids = {"resid_pre": s.residual("resid_pre"), "mlp_out": s.residual("mlp_out"), "z": s.heads()}
    grids["expert_out"] = s.experts()
    for hook, exact in grids.items():
        attr = s.attribution(hook, per_position=hook != "z")
        assert P.compare_attribution(exact, attr) > 0.99, hook
    assert all(p.grad is None for p in m.parameters())


def test_compare_attribution_needs_rows():
    a = pd.DataFrame({"layer": [0], "pos": [0], "effect": [1.0]})
    with pytest.raises(ValueError, match="at least 2"):
        P.compare_attribution(a, a)
    b = pd.DataFrame({"layer": [0, 1, 2], "pos": [0, 0, 0], "effect": [0.0, 1.0, 2.0]})
    assert abs(P.compare_attribution(b, b.assign(effect=[1.0, 3.0, 5.0])) - 1) < 1e-12


def test_attribution_agreement_reports_slope_and_r2_beside_r():
    """An attribution that halves every effect has r = 1 but slope 0.5 and an R² against y = x well below 1."""
    exact = pd.DataFrame({"layer": [0, 1, 2, 3], "pos": 0, "effect": [0.1, 0.4, 0.8, 1.0]})
    half = P.attribution_agreement(exact, exact.assign(effect=exact["effect"] / 2))
    assert half["r"] == pytest.approx(1.0) and half["slope"] == pytest.approx(0.5) and half["r2_identity"] < 0.5
    same = P.attribution_agreement(exact, exact)
    assert same["slope"] == pytest.approx(1.0) and same["r2_identity"] == pytest.approx(1.0) and same["n"] == 4


# ------------------------------------------------------------------------------------------ plots
def test_plots(setup):
    grid = setup.residual("resid_pre")
    fig = P.plot_patching_heatmap(grid, tokens=[f"w{i}" for i in range(N_POS)])
    assert isinstance(fig, Figure)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][:2] == ["w0 (0)", "w1 (1)"]
    assert len(fig.axes[0].get_yticklabels()) == setup.model.config.num_hidden_layers
    heads = setup.heads()
    assert isinstance(P.plot_head_grid(heads), Figure)
    with pytest.raises(ValueError, match="pos"):
        P.plot_patching_heatmap(heads)
    attr = setup.attribution("resid_pre")
    fig = P.plot_attribution_vs_exact(grid, attr)
    title = fig.axes[0].get_title()
    assert "r = " in title and "slope = " in title and "R²" in title


def test_pairs_of_two_templates_are_not_averaged(model):
    """Pairs that change different positions cannot share a grid: a clear error, before any run."""
    clean, corrupt = pair(seed=3, batch=2)
    corrupt[1] = clean[1]
    corrupt[1, DIFF + 1] = (clean[1, DIFF + 1] + 7) % 512  # pair 1 changes the next position instead
    with pytest.raises(ValueError, match=r"pair 0: \[3\], pair 1: \[4\].*same token layout"):
        P.PatchingSetup(model, clean, corrupt, P.logit_diff(5, 6), progress=False)


def test_labels_mark_positions_whose_token_varies_across_pairs(model):
    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [" a" if i == 0 else f"t{i}" for i in ids]

    clean, corrupt = pair(seed=3, batch=2)
    clean[:, 0] = 0  # shared by both pairs, a token with a leading space
    corrupt[:, 0] = 0
    s = P.PatchingSetup(model, clean, corrupt, P.logit_diff(5, 6), tokenizer=Tok(), progress=False)
    labels = s.token_labels()
    assert labels[0] == "␣a"
    assert labels[1] == f"t{clean[0, 1].item()}…"  # random tokens differ between the two pairs
    assert labels[DIFF] == f"t{clean[0, DIFF].item()}/t{corrupt[0, DIFF].item()}…"
