"""Noise floors of the patching grids: bootstrap intervals of the effect over prompt pairs.

The reference is computed from single-pair setups (one pair per run, nothing shared), so a grid's
per-pair values and its interval are checked against runs that never saw the batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ernie_lab import ErnieConfig, ErnieMoE
from ernie_lab import patching as P
from ernie_lab.noise import resample_weights

DIFF, N_POS, N_PAIRS = 3, 8, 6


def tiny() -> ErnieMoE:
    torch.manual_seed(0)
    return ErnieMoE(ErnieConfig.preset("tiny").replace(initializer_range=0.2))


def pairs(batch: int, seed: int = 3, vocab: int = 512):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (batch, N_POS), generator=g)
    corrupt = clean.clone()
    corrupt[:, DIFF] = (corrupt[:, DIFF] + 7) % vocab
    return clean, corrupt


@pytest.fixture(scope="module")
def model():
    return tiny()


METRIC = P.logit_diff(5, 6)


def reference_interval(per_pair: list, n_boot: int, seed: int, level: float = 0.95):
    """The percentile interval of (m_patched - m_base) / (m_source - m_base) over resampled pairs, from
    single-pair results ``[(grid, m_base, m_source)]``."""
    patched = np.stack([g["metric"].to_numpy() for g, _, _ in per_pair], axis=1)  # [row pair]
    base = np.array([b for _, b, _ in per_pair])
    source = np.array([s for _, _, s in per_pair])
    w = resample_weights(len(per_pair), n_boot, seed)
    stats = []
    for draw in w:  # one resample at a time, the plain way
        take = np.repeat(np.arange(len(per_pair)), draw.astype(int))
        mb, ms = base[take].mean(), source[take].mean()
        stats.append((patched[:, take].mean(1) - mb) / (ms - mb))
    alpha = (1 - level) / 2
    return np.quantile(np.array(stats), [alpha, 1 - alpha], axis=0)


def single_pairs(model, clean, corrupt, grid):
    out = []
    for i in range(len(clean)):
        s = P.PatchingSetup(model, clean[i], corrupt[i], METRIC, progress=False)
        out.append((grid(s), s.m_base, s.m_source))
    return out


def test_residual_interval_is_a_bootstrap_over_pairs(model):
    clean, corrupt = pairs(N_PAIRS)
    setup = P.PatchingSetup(model, clean, corrupt, METRIC, progress=False, n_boot=200, seed=5)
    grid = lambda s: s.residual(layers=[0, 1], positions=[DIFF, N_POS - 1])
    df = grid(setup)
    low, high = reference_interval(single_pairs(model, clean, corrupt, grid), n_boot=200, seed=5)
    # batched and single-pair runs differ by fp32 round-off, which the ratio can magnify to ~1e-5
    np.testing.assert_allclose(df["ci_low"], low, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(df["ci_high"], high, rtol=1e-4, atol=1e-4)
    assert (df["ci_high"] - df["ci_low"] > 1e-3).any()  # the pairs disagree: a real, non-zero width
    assert df.attrs["level"] == 0.95 and df.attrs["n_prompts"] == N_PAIRS


def test_attribution_interval_uses_each_pairs_own_estimate(model):
    clean, corrupt = pairs(N_PAIRS, seed=4)
    setup = P.PatchingSetup(model, clean, corrupt, METRIC, progress=False, n_boot=150, seed=2)
    df = setup.attribution("resid_pre")
    low, high = reference_interval(
        single_pairs(model, clean, corrupt, lambda s: s.attribution("resid_pre")), n_boot=150, seed=2
    )
    np.testing.assert_allclose(df["ci_low"], low, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(df["ci_high"], high, rtol=1e-4, atol=1e-4)


def test_identical_pairs_give_a_zero_width_interval(model):
    clean, corrupt = pairs(1)
    clean, corrupt = clean.repeat(4, 1), corrupt.repeat(4, 1)
    setup = P.PatchingSetup(model, clean, corrupt, METRIC, progress=False)
    for df in (setup.residual(layers=[0, 1]), setup.heads(layers=[1]), setup.experts(), setup.attribution("z")):
        finite = df["effect"].notna()
        np.testing.assert_allclose(df.loc[finite, "ci_low"], df.loc[finite, "effect"], atol=1e-6)
        np.testing.assert_allclose(df.loc[finite, "ci_high"], df.loc[finite, "effect"], atol=1e-6)


def test_unpatched_experts_have_a_zero_interval(model):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 512, (2, 3), generator=g)  # 6 prompt-positions, top-2 of 8 experts: some stay idle
    corrupt = clean.clone()
    corrupt[:, 1] = (corrupt[:, 1] + 7) % 512
    df = P.PatchingSetup(model, clean, corrupt, P.logit_diff(5, 6), progress=False).experts()
    idle = df[df["n_positions"] == 0]
    assert len(idle) and (idle["effect"] == 0).all()
    assert (idle["ci_low"].abs() < 1e-12).all() and (idle["ci_high"].abs() < 1e-12).all()


def test_no_interval_from_one_pair_or_a_batch_level_metric(model):
    clean, corrupt = pairs(N_PAIRS)
    one = P.PatchingSetup(model, clean[0], corrupt[0], METRIC, progress=False).residual(layers=[0])
    assert one["ci_low"].isna().all() and one["ci_high"].isna().all()
    mean_metric = lambda logits: METRIC(logits).mean()  # one value for the whole batch
    pooled = P.PatchingSetup(model, clean, corrupt, mean_metric, progress=False).residual(layers=[0])
    assert pooled["ci_low"].isna().all()
    assert pooled["effect"].notna().any()  # the point estimate is unaffected


def test_level_seed_and_resamples(model):
    clean, corrupt = pairs(N_PAIRS)
    run = lambda **kw: P.PatchingSetup(model, clean, corrupt, METRIC, progress=False, **kw).residual(layers=[1])
    wide, narrow = run(level=0.95, seed=1), run(level=0.5, seed=1)
    assert (narrow["ci_low"] >= wide["ci_low"] - 1e-12).all() and (narrow["ci_high"] <= wide["ci_high"] + 1e-12).all()
    again = run(level=0.95, seed=1)
    assert wide["ci_low"].equals(again["ci_low"])
    assert not wide["ci_low"].equals(run(level=0.95, seed=2)["ci_low"])


@pytest.mark.parametrize("bad", [dict(level=1.0), dict(level=0), dict(level="0.9"), dict(n_boot=0), dict(n_boot=2.5)])
def test_bad_interval_settings_are_refused(model, bad):
    clean, corrupt = pairs(2)
    with pytest.raises(ValueError, match="level|n_boot"):
        P.PatchingSetup(model, clean, corrupt, METRIC, progress=False, **bad)


def test_heatmap_marks_cells_indistinguishable_from_zero(model):
    clean, corrupt = pairs(N_PAIRS)
    setup = P.PatchingSetup(model, clean, corrupt, METRIC, progress=False)
    df = setup.residual()
    fig = P.plot_patching_heatmap(df)
    title = fig.axes[0].get_title()
    n_zero = int(((df["ci_low"] <= 0) & (df["ci_high"] >= 0)).sum())
    assert n_zero > 0 and "includes 0" in title and f"over {N_PAIRS} pairs" in title
    dots = [c for c in fig.axes[0].collections if len(c.get_offsets())]
    assert sum(len(c.get_offsets()) for c in dots) == n_zero
    single = P.plot_patching_heatmap(P.PatchingSetup(model, clean[0], corrupt[0], METRIC, progress=False).residual())
    assert "includes 0" not in single.axes[0].get_title()
