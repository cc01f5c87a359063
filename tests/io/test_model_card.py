"""The ERNIE 4.5 model card's transformers examples port by renaming the function (README, "Model card examples").

Each test is the card's code with ``AutoTokenizer.from_pretrained`` -> ``el.load_tokenizer`` and
``AutoModelForCausalLM.from_pretrained`` -> ``el.load_model``, the hub id replaced by ``"toy"`` and a
toy-sized prompt; every other line is as the card writes it.
"""

from __future__ import annotations

import pytest
import torch

import ernie_lab as el


def test_card_chat_example_runs_on_the_toy_model():
    model_name = "toy"
    tokenizer = el.load_tokenizer(model_name)
    model = el.load_model(model_name, device_map="auto", torch_dtype=torch.float32)
    prompt = "What is the capital of Veloria?"
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    model_inputs = tokenizer([text], add_special_tokens=False, return_tensors="pt").to(model.device)
    generated_ids = model.generate(**model_inputs, max_new_tokens=32)
    output_ids = generated_ids[0][len(model_inputs.input_ids[0]) :].tolist()
    generate_text = tokenizer.decode(output_ids, skip_special_tokens=True).strip("\n")
    assert generate_text == "The capital of Veloria is Mirren."  # the toy world's fact (ernie_lab.toy.world)
    assert output_ids[-1] in model.generation_config.eos_token_ids  # stopped at end-of-sentence by default


def test_card_generate_example_runs_on_the_toy_model():
    model_name = "toy"
    tokenizer = el.load_tokenizer(model_name)
    model = el.load_model(model_name, device_map="auto", torch_dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and model.device.type in ("cpu", "cuda")
    inputs = tokenizer("The capital of Veloria is", return_tensors="pt").to(model.device)
    generated_ids = model.generate(**inputs, max_new_tokens=4)
    assert generated_ids.shape[0] == 1 and generated_ids.shape[1] > inputs.input_ids.shape[1]


def test_aliases_conflict_with_their_own_spelling():
    with pytest.raises(TypeError, match="dtype= or its alias torch_dtype="):
        el.load_model("toy", dtype="float32", torch_dtype=torch.float32)
    with pytest.raises(TypeError, match="device= or its alias device_map="):
        el.load_model("toy", device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="per-module maps"):
        el.load_model("toy", device_map={"": "cpu"})
