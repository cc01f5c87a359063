"""The toy corpus, its held-out prompt sets and the shipped toy tokenizer (data/toy)."""

from __future__ import annotations

import json
import random
import re

import pytest
from tokenizers import Tokenizer

from ernie_lab.io.sources import data_dir, toy_dir
from ernie_lab.io.tokenizer import load_tokenizer
from ernie_lab.toy import (
    DOMAINS,
    PATCHING_TASKS,
    TASKS,
    WORLD,
    format_chat,
    generate_documents,
    heldout_domains,
    is_heldout_text,
    load_prompt_set,
    prompt_sets,
    training_corpus,
)
from ernie_lab.toy.build import token_stream
from ernie_lab.toy.chat import chat_segments
from ernie_lab.toy.domains import is_heldout_problem
from ernie_lab.toy.prompts import PROMPT_FILES, to_jsonl
from ernie_lab.toy.tokenizer_train import SPECIAL_TOKENS, save_tokenizer, train_tokenizer

_PROBLEM = re.compile(r"(?<!\d)(\d+)([+\-*])(\d+)=")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(str(toy_dir() / "tokenizer.json"))


@pytest.fixture(scope="module")
def corpus() -> list[dict[str, str]]:
    return training_corpus()


def test_same_seed_same_documents_other_seed_other_documents():
    assert generate_documents(60, seed=1) == generate_documents(60, seed=1)
    assert generate_documents(60, seed=1) != generate_documents(60, seed=2)


def test_generation_leaves_global_random_state_alone():
    random.seed(123)
    state = random.getstate()
    generate_documents(30, seed=0)
    heldout_domains(per_domain=2)
    assert random.getstate() == state


def test_every_domain_is_present(corpus):
    assert {d["domain"] for d in generate_documents(len(DOMAINS), seed=0)} == set(DOMAINS)
    assert {d["domain"] for d in corpus} == set(DOMAINS)
    assert all(d["text"].strip() for d in corpus)
    chats = [d["text"] for d in corpus if d["domain"] == "chat"]
    assert all(t.startswith("<|begin_of_sentence|>") and t.endswith("<|end_of_sentence|>") for t in chats)
    assert all("User: " in t and "\nAssistant: " in t for t in chats)


def test_heldout_domain_texts_are_not_in_training(corpus):
    rows = load_prompt_set("domains")
    assert {r["domain"] for r in rows} == set(DOMAINS)
    assert all(sum(r["domain"] == d for r in rows) >= 40 for d in DOMAINS)
    train_texts = {d["text"] for d in corpus}
    assert not any(r["text"] in train_texts for r in rows)
    assert all(is_heldout_text(r["text"]) for r in rows)
    assert not any(is_heldout_text(t) for t in train_texts)


def test_task_prompts_are_not_in_training(corpus):
    rows = load_prompt_set("tasks")
    assert all(sum(r["task"] == t for r in rows) >= 50 for t in TASKS)
    text = "\n".join(d["text"] for d in corpus)
    for r in rows:
        if r["task"] == "arithmetic_2digit":
            a, op, b = _PROBLEM.fullmatch(r["prompt"]).groups()
            assert is_heldout_problem(int(a), op, int(b))
        elif r["task"] == "arithmetic":  # one-digit or times-table problems, taught like facts
            a, op, b = _PROBLEM.fullmatch(r["prompt"].split(" ")[-1]).groups()
            assert max(int(a), int(b)) <= (12 if op == "*" else 9), r
        else:
            assert r["prompt"] not in text, r
    trained_problems = {(int(a), op, int(b)) for a, op, b in _PROBLEM.findall(text)}
    assert not any(is_heldout_problem(*p) for p in trained_problems)


def test_patching_pairs_align_token_by_token(tok):
    rows = load_prompt_set("patching_pairs")
    assert len(rows) >= 40 and {r["task"] for r in rows} == set(PATCHING_TASKS)
    for r in rows:
        clean, corrupt = tok.encode(r["clean"]).ids, tok.encode(r["corrupt"]).ids
        assert len(clean) == len(corrupt), r
        assert sum(c != k for c, k in zip(clean, corrupt, strict=True)) == 1, r  # one entity differs
        assert len(tok.encode(r["answer"]).ids) == 1, r
        assert len(tok.encode(r["distractor"]).ids) == 1, r
        assert r["answer"] != r["distractor"]


def test_entities_and_recall_answers_are_single_tokens(tok):
    for name in WORLD.entity_names():
        assert len(tok.encode(" " + name).ids) == 1, name
    for r in load_prompt_set("tasks"):
        if r["task"] in ("recall", "ioi"):
            assert len(tok.encode(r["answer"]).ids) == 1, r


@pytest.mark.parametrize(
    "text",
    [
        "The capital of Veloria is Mirren.",
        "王明是一名老师，住在北京。你好！",
        'def f(x):\n    return {"a": x}  # comment\n',
        "37+45=82 9*7=63 1000-1=999",
        "  two  spaces\tand\ttabs \u00e9 \U0001f600",
    ],
)
def test_tokenizer_round_trips(tok, text):
    assert tok.decode(tok.encode(text).ids) == text


def test_digits_are_single_tokens(tok):
    assert tok.encode("9876543210").tokens == list("9876543210")
    assert tok.encode("37+45=82").tokens == ["3", "7", "+", "4", "5", "=", "8", "2"]


def test_special_tokens_have_fixed_ids(tok):
    expected = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"]
    assert list(SPECIAL_TOKENS[:5]) == expected
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i
    assert tok.get_vocab_size() == 4096
    text = format_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    ids = tok.encode(text).ids
    assert ids[0] == 3 and ids[-1] == 4 and ids.count(3) == 1 and ids.count(4) == 1


def test_prompt_files_match_the_generator():
    for name, rows in prompt_sets(seed=0).items():
        assert name in PROMPT_FILES
        shipped = (data_dir() / "prompts" / name).read_bytes()
        assert shipped == to_jsonl(rows).encode("utf-8"), f"{name} is stale: rerun write_prompt_sets()"


def _bpe_tables(path) -> tuple:
    # Parsed, so that a tokenizers release that serialises merges differently still compares equal.
    state = json.loads(path.read_text(encoding="utf-8"))
    merges = [m.split(" ") if isinstance(m, str) else m for m in state["model"]["merges"]]
    return state["model"]["vocab"], merges, state["added_tokens"], state["pre_tokenizer"], state["decoder"]


def test_tokenizer_files_match_a_retrain(tmp_path, corpus):
    save_tokenizer(train_tokenizer(corpus), tmp_path)
    assert _bpe_tables(tmp_path / "tokenizer.json") == _bpe_tables(toy_dir() / "tokenizer.json"), "stale"
    config = "tokenizer_config.json"
    assert (tmp_path / config).read_bytes() == (toy_dir() / config).read_bytes(), f"{config} is stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", config]  # no temp files left


def test_format_chat_matches_the_ernie_chat_template():
    import ernie_lab as el

    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "2+3=5."},
        {"role": "user", "content": "你好"},
    ]
    tok = el.load_tokenizer(toy_dir())
    for gen in (False, True):
        rendered = tok.apply_chat_template(messages, add_generation_prompt=gen)
        assert rendered == format_chat(messages, add_generation_prompt=gen)


def test_transformers_autotokenizer_loads_the_toy_tokenizer(tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(toy_dir()))
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.cls_token_id, hf.sep_token_id) == (0, 1, 2, 3, 4)
    assert hf.pad_token_id == 0
    text = "<|begin_of_sentence|>User: 张伟 37+45?\nAssistant: 82<|end_of_sentence|>"
    assert hf(text)["input_ids"] == tok.encode(text).ids
    messages = [{"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == format_chat(
        messages, add_generation_prompt=True
    )


def test_chats_are_encoded_as_at_inference():
    """The training stream encodes a chat the way ``chat()`` does: the rendered prompt up to
    "Assistant: " on its own, then the reply; encoded whole, the trailing space would merge."""
    tok = load_tokenizer("toy")
    user = [{"role": "user", "content": "What is 2+3?"}]
    reply = "The answer is 5."
    prompt = format_chat(user, add_generation_prompt=True)
    text = format_chat(user + [{"role": "assistant", "content": reply}])
    stream = token_stream(tok, [{"domain": "chat", "text": text}]).tolist()
    expected = tok.encode(prompt) + tok.encode(reply + "<|end_of_sentence|>") + [tok.eos_token_id]
    assert stream == expected
    assert tok.encode(text) != expected[:-1]  # whole-text encoding differs: the split matters
    assert "".join(chat_segments(text)) == text
