"""Recipes in hooks/: each loads by name, builds hooks on a tiny model and does what its docstring says."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from ernie_lab import interventions as iv
from ernie_lab.model.ernie import ErnieMoE

RECIPES = ("ablate_experts", "force_routing", "steer_residual", "freeze_router")
BATCH, POS = 2, 6


@pytest.fixture(scope="module")
def model() -> ErnieMoE:
    return tiny_model(bias_std=0.0)


@pytest.fixture(scope="module")
def ids(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (BATCH, POS), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def other(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (BATCH, POS), generator=torch.Generator().manual_seed(4))


def moe(L: int, point: str) -> str:
    return f"blocks.{L}.moe.hook_{point}"


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_by_name_and_path(name):
    assert name in iv.list_recipes()
    module = iv.load_recipe(name)
    doc = module.__doc__ or ""
    assert "Hooks used" in doc and "Decode" in doc and "Params" in doc
    assert iv.load_recipe(iv.recipe_dir() / f"{name}.py").make_hooks.__code__.co_name == "make_hooks"
    assert callable(iv.load_recipe(f"{name}.py").make_hooks)


def test_load_recipe_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ablate_experts"):  # lists what is available
        iv.load_recipe("no_such_recipe")
    with pytest.raises(FileNotFoundError):
        iv.load_recipe(tmp_path / "missing.py")
    empty = tmp_path / "empty.py"
    empty.write_text('"""No make_hooks here."""\n')
    with pytest.raises(AttributeError, match="make_hooks"):
        iv.load_recipe(empty)
    custom = tmp_path / "custom.py"
    custom.write_text("def make_hooks(model, name='hook_embed'):\n    return [(name, lambda x, hook: x * 0)]\n")
    assert iv.load_recipe(str(custom)).make_hooks(None)[0][0] == "hook_embed"


# ----------------------------------------------------------------------------- behaviour
def test_ablate_experts_modes(model, ids, other):
    recipe = iv.load_recipe("ablate_experts")
    L, e = model.config.moe_layers[0], 2
    names = [moe(L, p) for p in ("topk_idx", "topk_weights", "expert_out")]
    _, zero = model.run_with_cache(ids, names_filter=names, fwd_hooks=recipe.make_hooks(model, experts={L: [e]}))
    hit = zero[moe(L, "topk_idx")] == e
    assert bool(hit.any()) and bool((zero[moe(L, "topk_weights")][hit] == 0).all())
    _, rer = model.run_with_cache(ids, names_filter=names, fwd_hooks=recipe.make_hooks(model, {L: [e]}, "reroute"))
    assert not bool((rer[moe(L, "topk_idx")] == e).any())
    hooks = recipe.make_hooks(model, {L: [e]}, mode="mean", reference_ids=other)
    _, mean = model.run_with_cache(ids, names_filter=names, fwd_hooks=hooks)
    expected = iv.expert_mean_outputs(model, other, {L: [e]})[(L, e)]
    hit = mean[moe(L, "topk_idx")] == e
    torch.testing.assert_close(mean[moe(L, "expert_out")][hit], expected.expand(int(hit.sum()), -1))
    with pytest.raises(ValueError, match="reference_ids"):
        recipe.make_hooks(model, {L: [e]}, mode="mean")
    with pytest.raises(ValueError, match="mode"):
        recipe.make_hooks(model, {L: [e]}, mode="half")


def test_force_routing_every_layer(model, ids):
    hooks = iv.load_recipe("force_routing").make_hooks(model, experts=[7, 1])
    _, cache = model.run_with_cache(ids, names_filter="blocks.*.moe.hook_topk_idx", fwd_hooks=hooks)
    assert torch.equal(cache.stack("moe.hook_topk_idx"), torch.tensor([7, 1]).expand(2, BATCH, POS, 2))
    one = iv.load_recipe("force_routing").make_hooks(model, experts=[7, 1], layers=2, weights=[1.0, 0.0])
    assert [n for n, _ in one] == [moe(2, "topk_idx"), moe(2, "topk_weights")]


def test_steer_residual_vector_and_direction(model, ids, other):
    recipe = iv.load_recipe("steer_residual")
    name = "blocks.1.hook_resid_pre"
    _, clean = model.run_with_cache(ids, names_filter=name)
    v = torch.randn(model.config.hidden_size)
    _, got = model.run_with_cache(
        ids, names_filter=name, fwd_hooks=recipe.make_hooks(model, layer=1, vector=v, scale=3)
    )
    torch.testing.assert_close(got[name] - clean[name], 3 * v.expand(BATCH, POS, -1))
    _, pos_c = model.run_with_cache(ids[0], names_filter=name)
    _, neg_c = model.run_with_cache(other, names_filter=name)
    by_hand = pos_c[name].mean((0, 1)) - neg_c[name].mean((0, 1))
    torch.testing.assert_close(recipe.direction(model, 1, ids[0], other), by_hand)
    hooks = recipe.make_hooks(model, layer=1, positive=ids[0], negative=other, positions=[-1])
    _, got = model.run_with_cache(ids, names_filter=name, fwd_hooks=hooks)
    delta = got[name] - clean[name]
    torch.testing.assert_close(delta[:, -1], by_hand.expand(BATCH, -1))
    assert bool((delta[:, :-1] == 0).all())
    with pytest.raises(ValueError, match="either"):
        recipe.make_hooks(model, layer=1)


def test_freeze_router_copies_routing(model, ids, other):
    recipe = iv.load_recipe("freeze_router")
    names = "blocks.*.moe.hook_topk_*"
    _, source = model.run_with_cache(other, names_filter=names)
    _, own = model.run_with_cache(ids, names_filter=names)
    _, frozen = model.run_with_cache(ids, names_filter=names, fwd_hooks=recipe.make_hooks(model, source_ids=other))
    for point in ("moe.hook_topk_idx", "moe.hook_topk_weights"):
        assert torch.equal(frozen.stack(point), source.stack(point))
        assert not torch.equal(frozen.stack(point), own.stack(point))
    L = model.config.moe_layers[-1]
    _, part = model.run_with_cache(ids, names_filter=names, fwd_hooks=recipe.make_hooks(model, cache=source, layers=L))
    assert torch.equal(part[moe(L, "topk_idx")], source[moe(L, "topk_idx")])
    first = model.config.moe_layers[0]
    assert torch.equal(part[moe(first, "topk_idx")], own[moe(first, "topk_idx")])  # other layers route freely


# ----------------------------------------------------------------------------- inside generate
def test_recipes_fire_at_every_generation_step(model, ids):
    pytest.importorskip("ernie_lab.generation.generate")
    forced = [5, 4]
    seen = []
    record = (moe(2, "topk_idx"), lambda idx, hook: seen.append(idx.clone()))
    hooks = iv.load_recipe("force_routing").make_hooks(model, experts=forced) + [record]
    new = 4
    model.generate(ids, max_new_tokens=new, temperature=0.0, fwd_hooks=hooks)
    assert seen[0].shape == (BATCH, POS, 2)  # prefill: every prompt position
    assert all(s.shape == (BATCH, 1, 2) for s in seen[1:])  # decode: the new position only
    assert len(seen) >= new
    assert all(torch.equal(s, torch.tensor(forced).expand_as(s)) for s in seen)
    v = torch.randn(model.config.hidden_size)
    steer = iv.load_recipe("steer_residual").make_hooks(model, layer=0, vector=v, positions=[-1])
    embeds, resids = [], []
    watch = [
        ("hook_embed", lambda x, hook: embeds.append(x)),
        ("blocks.0.hook_resid_pre", lambda x, hook: resids.append(x)),
    ]
    model.generate(ids, max_new_tokens=new, temperature=0.0, fwd_hooks=steer + watch)
    assert resids[0].shape[1] == POS and {r.shape[1] for r in resids[1:]} == {1}
    for embed, resid in zip(embeds, resids, strict=True):  # the last position of every step is steered, nothing else
        torch.testing.assert_close(resid[:, -1] - embed[:, -1], v.expand(BATCH, -1))
        assert torch.equal(resid[:, :-1], embed[:, :-1])


def test_ablation_and_frozen_routing_during_generation(model, ids, other):
    pytest.importorskip("ernie_lab.generation.generate")
    L, E = model.config.moe_layers[-1], model.config.moe_num_experts
    weights = []
    record = (moe(L, "topk_weights"), lambda w, hook: weights.append(w.clone()))
    zero_all = iv.load_recipe("ablate_experts").make_hooks(model, experts={L: range(E)})
    model.generate(ids, max_new_tokens=3, temperature=0.0, fwd_hooks=zero_all + [record])
    assert len(weights) >= 3 and all(bool((w == 0).all()) for w in weights)  # prefill and every decode step
    _, source = model.run_with_cache(other, names_filter="blocks.*.moe.hook_topk_*")
    idx = []
    frozen = iv.load_recipe("freeze_router").make_hooks(model, cache=source)
    record = (moe(L, "topk_idx"), lambda i, hook: idx.append(i))
    model.generate(ids, max_new_tokens=3, temperature=0.0, fwd_hooks=frozen + [record])
    assert torch.equal(idx[0], source[moe(L, "topk_idx")])  # prefill frozen
    assert all(i.shape == (BATCH, 1, model.config.moe_k) for i in idx[1:])  # decode routed freely
