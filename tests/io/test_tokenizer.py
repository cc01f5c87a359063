"""Tests for ernie_lab.io.tokenizer and ernie_lab.io.spm_convert.

Everything is built in tmp dirs: small SentencePiece BPE models (byte fallback) trained on generated
mixed English / Chinese / code / digit text. References are SentencePiece itself (ids) and
transformers (chat-template rendering), never numbers taken from our own output.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

spm = pytest.importorskip("sentencepiece")

from ernie_lab.io import spm_convert  # noqa: E402
from ernie_lab.io.tokenizer import ERNIE_CHAT_TEMPLATE, load_tokenizer  # noqa: E402

CLS, SEP = "<|begin_of_sentence|>", "<|end_of_sentence|>"
# The chat_template of ERNIE 4.5's hub tokenizer_config.json (baidu/ERNIE-4.5-*), verbatim.
HUB_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}\n    {%- set add_generation_prompt = true -%}\n"
    "{%- endif -%}\n{%- if not cls_token is defined -%}\n"
    '    {%- set cls_token = "<|begin_of_sentence|>" -%}\n{%- endif -%}\n'
    "{%- if not sep_token is defined -%}\n"
    '    {%- set sep_token = "<|end_of_sentence|>" -%}\n{%- endif -%}\n{{- cls_token -}}\n'
    "{%- for message in messages -%}\n"
    '    {%- if message["role"] == "user" -%}\n        {{- "User: " + message["content"] + "\n" -}}\n'
    '    {%- elif message["role"] == "assistant" -%}\n'
    '        {{- "Assistant: " + message["content"] + sep_token -}}\n'
    '    {%- elif message["role"] == "system" -%}\n        {{- message["content"] + "\n" -}}\n'
    "    {%- endif -%}\n{%- endfor -%}\n"
    '{%- if add_generation_prompt -%}\n    {{- "Assistant: " -}}\n{%- endif -%}'
)
ERNIE_CONFIG = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<unk>",
    "unk_token": "<unk>",
    "cls_token": CLS,
    "sep_token": SEP,
    "mask_token": "<mask:1>",
    "sys_start_token": "<mask:4>",
    "sys_end_token": "<mask:5>",
    "additional_special_tokens": None,
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "1 + 1 = ?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "用中文回答：为什么？\n谢谢"},
    ],
    [
        {"role": "user", "content": "def f(x):\n    return x"},
        {"role": "assistant", "content": "  Looks fine.  ", "reasoning": "Check the indent."},
        {"role": "user", "content": "Sure?", "name": None},
        {"role": "assistant", "content": "Yes."},
    ],
]
SAMPLES = [
    "Hello world",
    "  leading spaces",
    "multiple    spaces  inside  and trailing  ",
    "line one\nline two\n\n\n  indented\n",
    "数字 12345 和中文混合，专家路由。",
    "def route(x):\n\treturn x**2  # comment",
    "unseen ☃ snowman, 🦊 fox, Ωmega, ﬁ ligature",
    "Ｆｕｌｌ width １２３ and café naïve über",
    "x" * 40,
    "3.14159 2718281828 007",
    "",
    " ",
    "\n",
    "🦊🦊",
]


def corpus(n: int = 600) -> list[str]:
    """Mixed English / Chinese / code / digit lines, deterministic."""
    rng = random.Random(0)
    words = ["the", "model", "routes", "each", "token", "to", "experts", "layer", "attention", "router"]
    hanzi = "我们的模型使用专家混合结构来提高效率中文分词测试语言理解生成路由器权重"
    lines = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))))
        elif kind == 1:
            lines.append("".join(rng.choice(hanzi) for _ in range(rng.randint(5, 25))))
        elif kind == 2:
            lines.append(f"def f_{i}(x):\n    return x * {rng.randint(0, 99999)}  # {rng.choice(words)}")
        else:
            lines.append(f"{rng.randint(0, 10**9)} + {rng.random():.4f} = {rng.choice(words)}{rng.choice(hanzi)}")
    return lines


def train_spm(prefix: str, **options) -> str:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_prefix=prefix,
        **{"vocab_size": 700, "model_type": "bpe", "byte_fallback": True, "character_coverage": 0.9995, **options},
        minloglevel=2,
    )
    return prefix + ".model"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """SentencePiece BPE models: ERNIE-like (identity normalization, no dummy prefix, chat special
    tokens as pieces), SentencePiece's default normalization, and one without byte fallback."""
    root = tmp_path_factory.mktemp("spm")
    ernie = train_spm(
        str(root / "ernie"),
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=[CLS, SEP, "<mask:1>"],
        control_symbols=["<mask:4>", "<mask:5>"],
    )
    default = train_spm(str(root / "default"), user_defined_symbols=["<mask:1>"])
    no_fallback = train_spm(str(root / "no_fallback"), byte_fallback=False)
    return {"ernie": ernie, "default": default, "no_fallback": no_fallback}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ERNIE_LAB_CACHE", str(tmp_path / "cache"))


def make_dir(path, model_file, config=None, **extra_files):
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(Path(model_file).read_bytes())
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    for name, content in extra_files.items():
        (path / name.replace("__", ".")).write_text(json.dumps(content))
    return path


@pytest.fixture
def ernie_dir(tmp_path, models):
    return make_dir(tmp_path / "ernie", models["ernie"], {**ERNIE_CONFIG, "chat_template": HUB_TEMPLATE})


@pytest.fixture
def reference(ernie_dir, tmp_path):
    """transformers' tokenizer for the same SentencePiece-only files (it converts them itself)."""
    transformers = pytest.importorskip("transformers")
    spm_only = shutil.copytree(ernie_dir, tmp_path / "reference")
    return transformers.AutoTokenizer.from_pretrained(str(spm_only))


def random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,:;()[]{}#_=+-*/'\"\t\n") + list(
        "我们的模型专家路由中文测试生成" + "éüñçΩжЖ☃🦊𝔘" + "   \n\n"
    )
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


@pytest.mark.parametrize("kind", ["ernie", "default", "no_fallback"])
def test_encode_matches_sentencepiece(kind, models, tmp_path):
    tok = load_tokenizer(make_dir(tmp_path / kind, models[kind]))
    sp = spm.SentencePieceProcessor(model_file=models[kind])
    for text in SAMPLES + corpus()[:100] + random_strings(300, seed=1):
        assert tok.encode(text) == sp.encode(text), repr(text)
    fallback = "<0x" if kind != "no_fallback" else "<unk>"  # unseen characters must have been hit
    assert any(fallback in sp.id_to_piece(i) for i in sp.encode(SAMPLES[6]))


def test_user_defined_pieces_with_dummy_prefix_split_the_text(models, tmp_path):
    tok = load_tokenizer(make_dir(tmp_path / "default", models["default"]))
    sp = spm.SentencePieceProcessor(model_file=models["default"])
    mask = sp.piece_to_id("<mask:1>")
    for left, right in [("the model", "routes"), ("", " 专家 "), ("x  ", "")]:
        assert tok.encode(f"{left}<mask:1>{right}") == [*sp.encode(left), mask, *sp.encode(right)]


def test_decode_round_trips(ernie_dir, models, tmp_path):
    tok = load_tokenizer(ernie_dir)
    for text in SAMPLES + random_strings(200, seed=2):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text
    # with SentencePiece's default normalization, text changes (NFKC, spaces), so compare with it
    default = load_tokenizer(make_dir(tmp_path / "default", models["default"]))
    sp = spm.SentencePieceProcessor(model_file=models["default"])
    for text in SAMPLES:
        assert default.decode(default.encode(text)) == sp.decode(sp.encode(text)), repr(text)


def test_special_tokens_are_single_ids_and_no_bos(ernie_dir, models):
    tok = load_tokenizer(ernie_dir)
    sp = spm.SentencePieceProcessor(model_file=models["ernie"])
    assert tok.cls_token_id == sp.piece_to_id(CLS) and tok.sep_token_id == sp.piece_to_id(SEP)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert tok.eos_token_ids == [sp.piece_to_id(SEP), sp.eos_id()]
    # special tokens split the text first, each part is encoded as SentencePiece would
    text = f"{CLS}User: hi 你好\nAssistant: ok{SEP}</s>"
    expected = [tok.cls_token_id, *sp.encode("User: hi 你好\nAssistant: ok"), tok.sep_token_id, sp.eos_id()]
    assert tok.encode(text) == expected
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "User: hi 你好\nAssistant: ok"
    assert tok.bos_token_id not in tok.encode("Hello world")
    assert tok.vocab_size == sp.get_piece_size()
    assert tok.id_to_token(tok.token_to_id("<mask:4>")) == "<mask:4>"


def test_converted_json_is_cached_outside_the_model_dir_and_reused(ernie_dir, tmp_path, monkeypatch):
    before = sorted(p.name for p in ernie_dir.iterdir())
    first = load_tokenizer(ernie_dir)
    assert sorted(p.name for p in ernie_dir.iterdir()) == before  # nothing written into the checkpoint
    (cached,) = (tmp_path / "cache" / "tokenizers").glob("*/tokenizer.json")
    assert cached.stat().st_mode & 0o777 == 0o644  # readable by others, like the checkpoint
    monkeypatch.setattr(spm_convert, "spm_to_tokenizer", lambda *a: pytest.fail("converted again"))
    assert load_tokenizer(ernie_dir).encode(SAMPLES[4]) == first.encode(SAMPLES[4])


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(ernie_dir, reference, conversation, add_generation_prompt):
    tok = load_tokenizer(ernie_dir)
    kwargs = {"add_generation_prompt": add_generation_prompt}
    expected = reference.apply_chat_template(conversation, tokenize=False, **kwargs)
    assert tok.apply_chat_template(conversation, **kwargs) == expected
    assert tok.apply_chat_template(conversation, chat_template=ERNIE_CHAT_TEMPLATE, **kwargs) == expected
    ids = tok.apply_chat_template(conversation, tokenize=True, **kwargs)
    assert ids == reference.apply_chat_template(conversation, tokenize=True, return_dict=False, **kwargs)
    assert ids[0] == tok.cls_token_id and ids.count(tok.sep_token_id) == expected.count(SEP)


def test_loads_a_directory_saved_by_transformers(ernie_dir, reference, tmp_path):
    """transformers v5 writes its own tokenizer.json, chat_template.jinja and
    model_specific_special_tokens; we must read all three and encode as before."""
    ours = load_tokenizer(ernie_dir)
    reference.save_pretrained(str(tmp_path / "saved"))
    assert {"tokenizer.json", "chat_template.jinja"} <= {p.name for p in (tmp_path / "saved").iterdir()}
    reloaded = load_tokenizer(tmp_path / "saved")
    assert reloaded.special_tokens == {k: v for k, v in ERNIE_CONFIG.items() if v is not None}
    assert reloaded.chat_template == HUB_TEMPLATE
    for conversation in CONVERSATIONS:
        assert reloaded.apply_chat_template(conversation, tokenize=True) == ours.apply_chat_template(
            conversation, tokenize=True
        )


def test_jinja_environment_matches_transformers(ernie_dir, reference):
    """A template leaning on trim/lstrip_blocks, globals, filters and loop controls."""
    template = (
        "{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\n"
        "    {% if loop.index > 3 %}{% break %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "  [{{ m['role'] | upper }}] {{ m | tojson }} {{ m.reasoning_content }}\n"
        "{% endfor %}\n"
        "{{ bos_token }}{{ sys_start_token }}{{ ns.n }}{{ strftime_now('%Y') }}"
        "{% if add_generation_prompt %}{% generation %}<go>{% endgeneration %}{% endif %}"
    )
    tok = load_tokenizer(ernie_dir)
    for conversation in CONVERSATIONS:
        for gen in (False, True):
            expected = reference.apply_chat_template(
                conversation, chat_template=template, add_generation_prompt=gen, tokenize=False
            )
            assert tok.apply_chat_template(conversation, add_generation_prompt=gen, chat_template=template) == (
                expected
            )
    with pytest.raises(Exception, match="no tools"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=template)


def test_fallback_template_when_config_has_none(tmp_path, models):
    tok = load_tokenizer(make_dir(tmp_path / "plain", models["ernie"], ERNIE_CONFIG))
    assert tok.chat_template is None
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    # the ERNIE 4.5 chat format, written out by hand
    turns = f"{CLS}Be brief.\nUser: Hi\nAssistant: Hello{SEP}User: Bye\n"
    assert tok.apply_chat_template(chat) == turns
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == turns + "Assistant: "


def test_chat_template_jinja_file_wins(tmp_path, models):
    model_dir = make_dir(tmp_path / "jinja", models["ernie"], {**ERNIE_CONFIG, "chat_template": HUB_TEMPLATE})
    (model_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert load_tokenizer(model_dir).apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding(ernie_dir, side):
    tok = load_tokenizer(ernie_dir)
    texts = ["Hi", "a much longer prompt 中文 12345", ""]
    batch = tok(texts, padding_side=side)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = [tok.encode(t) for t in texts]
    width = max(map(len, rows))
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (3, width)
    for i, row in enumerate(rows):
        real = ids[i][mask[i].bool()].tolist()
        assert real == row and int(mask[i].sum()) == len(row)
        padding = ids[i][~mask[i].bool()]
        assert (padding == tok.pad_token_id).all()
        if row and len(row) < width:
            assert mask[i, -1 if side == "left" else 0] == 1 and mask[i, 0 if side == "left" else -1] == 0
    assert tok("Hi")["input_ids"].shape == (1, len(rows[0]))
    assert tok.batch_decode(ids[:2, :], skip_special_tokens=True)[1] == texts[1]


def test_readable_tokens_for_spm(tmp_path, models):
    tok = load_tokenizer(make_dir(tmp_path / "default", models["default"]))
    sp = spm.SentencePieceProcessor(model_file=models["default"])
    ids = tok.encode("the model\nexperts ☃")
    assert tok.convert_ids_to_tokens(ids) == [
        sp.id_to_piece(i).replace("▁", " ").replace("<0x0A>", "\n") for i in sp.encode("the model\nexperts ☃")
    ]
    assert tok.convert_ids_to_tokens(torch.tensor(ids))[0] == " the"


def test_readable_tokens_for_byte_level_bpe(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus(200), trainer=trainer)
    (tmp_path / "bl").mkdir()
    bpe.save(str(tmp_path / "bl" / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "bl")
    ids = tok.encode("the model routes 路由 naïve")
    pieces = tok.convert_ids_to_tokens(ids)
    for idx, piece in zip(ids, pieces, strict=True):
        alone = bpe.decode([idx])  # the byte-level decoder; U+FFFD marks an incomplete character
        assert piece == alone if "\ufffd" not in alone else "\\x" in piece
    assert any(p.startswith(" ") for p in pieces) and not any("Ġ" in p for p in pieces)


def test_declared_added_tokens(tmp_path, models):
    sp = spm.SentencePieceProcessor(model_file=models["ernie"])
    new_id = sp.get_piece_size()
    decoder = {str(new_id): {"content": "<|tool|>", "special": True, "lstrip": False, "rstrip": False}}
    tok = load_tokenizer(
        make_dir(
            tmp_path / "added",
            models["ernie"],
            {**ERNIE_CONFIG, "added_tokens_decoder": decoder, "extra_special_tokens": {"image_token": "<|IMG|>"}},
            generation_config__json={"eos_token_id": [2, new_id]},
            added_tokens__json={"<|video|>": new_id + 1},
        )
    )
    assert tok.encode("a<|tool|>b") == [*sp.encode("a"), new_id, *sp.encode("b")]
    assert tok.encode("<|video|>") == [new_id + 1]
    assert tok.eos_token_ids == [sp.piece_to_id(SEP), sp.eos_id(), new_id]
    # a dict of extra special tokens names them (transformers v5 layout); they are special ids
    assert tok.special_tokens["image_token"] == "<|IMG|>"
    assert len(tok.encode("<|IMG|>")) == 1 and tok.decode(tok.encode("x<|IMG|>"), skip_special_tokens=True) == "x"
    assert tok.vocab_size == new_id + 3
    wrong = {str(new_id + 5): decoder[str(new_id)]}
    with pytest.raises(ValueError, match="<\\|tool\\|>"):
        load_tokenizer(make_dir(tmp_path / "wrong", models["ernie"], {**ERNIE_CONFIG, "added_tokens_decoder": wrong}))


def test_missing_tokenizer_files_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path / "empty")
    message = str(err.value)
    assert str(tmp_path / "empty") in message and "tokenizer.json" in message and "tokenizer.model" in message


def test_missing_sentencepiece_error(tmp_path, models, monkeypatch):
    model_dir = make_dir(tmp_path / "nospm", models["ernie"], ERNIE_CONFIG)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", None)
    with pytest.raises(ImportError, match=r"pip install 'ernie-lab\[sentencepiece\]'"):
        load_tokenizer(model_dir)


def test_unigram_model_is_rejected(tmp_path):
    prefix = str(tmp_path / "uni")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(200)), model_prefix=prefix, vocab_size=300, model_type="unigram", minloglevel=2
    )
    with pytest.raises(ValueError, match="BPE"):
        load_tokenizer(make_dir(tmp_path / "unidir", prefix + ".model"))
