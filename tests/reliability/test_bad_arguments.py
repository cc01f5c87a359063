"""Every public entry point checks its arguments up front and raises a named error that names the
argument and what would be valid (never a raw error from deep inside, never a silent wrong result)."""

from __future__ import annotations

import pytest
import torch

import ernie_lab as el
from ernie_lab.generation.generate import stream
from ernie_lab.model.kv_cache import KVCache


@pytest.fixture(scope="module")
def model():
    return el.load_model("toy")


@pytest.fixture(scope="module")
def tok():
    return el.load_tokenizer("toy")


IDS = torch.tensor([[5, 6, 7]])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_ids": "The capital of"}, TypeError, "input_ids must be a torch.Tensor"),  # never iterated as ids
        ({"input_ids": torch.tensor([[5, 99999]])}, ValueError, "token id 99999 is outside the vocabulary"),
        ({"eos_token_id": "2"}, ValueError, "eos_token_id must be None or token ids"),
        ({"eos_token_id": 10**6}, ValueError, "eos_token_id must be None or token ids"),
        ({"pad_token_id": -1}, ValueError, "pad_token_id"),
        ({"temperature": "0.7"}, ValueError, "temperature must be a number >= 0"),
        ({"top_k": 0, "temperature": 1.0}, ValueError, "top_k must be None or an integer >= 1"),
        ({"top_p": 0.0}, ValueError, r"top_p must be None or a number in \(0, 1\]"),
        ({"min_p": 2}, ValueError, "min_p"),
        ({"repetition_penalty": 0}, ValueError, "repetition_penalty"),
        ({"max_new_tokens": 1.5}, ValueError, "max_new_tokens must be an integer >= 0"),
        ({"max_new_tokens": 10**6}, ValueError, "exceeds the model's max_position_embeddings"),
        ({"seed": "42"}, ValueError, "seed"),
        ({"stop_strings": 3}, ValueError, "stop_strings"),
        ({"fwd_hooks": ["hook_embed"]}, TypeError, r"\(name, fn\) pairs"),
    ],
)
def test_generation_options_fail_before_the_first_token(model, kwargs, error, match):
    kwargs = {"input_ids": IDS, **kwargs}
    with pytest.raises(error, match=match):
        model.generate(**kwargs)
    with pytest.raises(error, match=match):  # at the call, not at the first next()
        stream(model, **kwargs)


@pytest.mark.parametrize(
    ("hooks", "error", "match"),
    [
        ([(None, lambda x, hook: None)], TypeError, "hook names"),  # None must not mean "every point"
        ([([], lambda x, hook: None)], TypeError, "hook names"),
        ([(3, lambda x, hook: None)], TypeError, "a name, a glob, a list of them or a predicate"),
        ([("hook_embed", "not a function")], TypeError, "must be callable"),
        (["hook_embed"], TypeError, r"\(name, fn\) pairs"),
        ([("hook_embd", lambda x, hook: None)], KeyError, "did you mean hook_embed"),
    ],
)
def test_hook_names_and_functions_are_checked(model, hooks, error, match):
    with pytest.raises(error, match=match):
        model.run_with_hooks(IDS, fwd_hooks=hooks)
    with pytest.raises(error, match=match), model.hooks(fwd_hooks=hooks):
        pass
    assert not any(hp.fwd for hp in model.hook_dict.values())  # nothing left attached
    with pytest.raises(TypeError, match="hook names"):
        model.add_hook(None, lambda x, hook: None)
    with pytest.raises(TypeError, match="hook names"):
        model.run_with_cache(IDS, names_filter=3)


def test_loading_and_saving_arguments(model, tmp_path):
    with pytest.raises(TypeError, match="a model source must be"):
        el.load_model(None)
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        el.load_model("toy", dtype=torch.int8)
    with pytest.raises(ValueError, match="device must be None, 'auto' or a torch device"):
        el.load_model("toy", device=5.5)
    with pytest.raises(TypeError, match="a model source must be"):
        el.load_tokenizer(3)
    with pytest.raises(TypeError, match="save_model needs an ErnieMoE"):
        el.save_model("model", tmp_path / "out")
    with pytest.raises(TypeError, match="output folder must be a str or a path"):
        el.save_model(model, 3)
    with pytest.raises(TypeError, match="from_hf takes a path"):
        el.ErnieConfig.from_hf(3)
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        KVCache.allocate(model.config, 0, 8)
    with pytest.raises(ValueError, match="max_pos must be an integer >= 1"):
        KVCache.allocate(model.config, 1, "8")


def test_tokenizer_and_chat_arguments(model, tok):
    with pytest.raises(TypeError, match="encode takes a str"):
        tok.encode(3)
    with pytest.raises(TypeError, match="ids must be a list of integer token ids"):
        tok.decode("abc")  # never iterate a string as ids
    with pytest.raises(TypeError, match="chat needs a tokenizer"):
        el.chat(model, None, "hi")
    with pytest.raises(TypeError, match=r"messages\[0\]"):
        el.chat(model, tok, [3])


def test_expert_ids_and_datasets_are_checked(model, tok):
    iv = el.interventions
    with pytest.raises(TypeError, match="expert ids"):
        iv.zero_ablate_experts(model, {1: "3"})  # a string is not iterated as ids
    n = model.config.moe_num_experts
    with pytest.raises(ValueError, match=rf"experts \[99\] of layer 1 are out of range \[0, {n}\)"):
        iv.reroute_ablate_experts(model, {1: [99]})
    with pytest.raises(ValueError, match="layer 0 is not a MoE layer"):
        iv.zero_ablate_experts(model, {0: [1]})
    with pytest.raises(TypeError, match="a recipe is a bundled recipe's name or a path"):
        iv.load_recipe(3)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        el.routing.collect_routing(model, ["a b"], tokenizer=tok, batch_size=0)
    with pytest.raises(TypeError, match="must hold integer token ids"):
        el.routing.collect_routing(model, [[0.5, 1.5]])
    with pytest.raises(ValueError, match="texts need a tokenizer"):
        el.routing.collect_routing(model, ["a b"])


def test_patching_inputs_are_token_ids(model):
    metric = el.patching.logit_diff(torch.tensor([5]), torch.tensor([6]))
    with pytest.raises(TypeError, match="clean_ids must be token ids"):
        el.patching.PatchingSetup(model, "The capital of", IDS, metric)
    with pytest.raises(TypeError, match="corrupt_ids must hold integer token ids"):
        el.patching.PatchingSetup(model, IDS, IDS.float(), metric)
