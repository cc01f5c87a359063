"""Train the toy model's byte-level BPE tokenizer and save it in the Hugging Face layout.

The pipeline mirrors what ERNIE-style chat needs at toy scale:
- special tokens at fixed ids, ERNIE 4.5 style: 0 ``<unk>`` (also padding), 1 ``<s>``, 2 ``</s>``,
  3 ``<|begin_of_sentence|>`` (cls, opens a chat), 4 ``<|end_of_sentence|>`` (sep, closes an
  assistant turn), then ``<mask:0>`` .. ``<mask:3>``;
- pre-tokenizer: every digit is its own piece (so arithmetic is learnable), then GPT-2 style
  byte-level splitting with no prefix space added; the byte-level decoder makes any text,
  Chinese included, round-trip exactly;
- no BOS/EOS added on encode (like ERNIE 4.5); the chat template adds the cls token.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ernie_lab.io.sources import toy_dir
from ernie_lab.io.tokenizer import ERNIE_CHAT_TEMPLATE
from ernie_lab.toy.corpus import DEFAULT_N_DOCS, training_corpus

UNK, BOS, EOS, CLS, SEP = "<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"
MASK_TOKENS = tuple(f"<mask:{i}>" for i in range(4))
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, CLS, SEP, *MASK_TOKENS)  # id = position
DEFAULT_VOCAB_SIZE = 4096
# The toy model's context length; generous for documents of a few hundred tokens.
MODEL_MAX_LENGTH = 2048


def _without_specials(text: str) -> str:
    # Special tokens are matched whole at encode time; keep their characters out of the merges.
    for token in SPECIAL_TOKENS:
        text = text.replace(token, "\n")
    return text


def train_tokenizer(docs: Iterable[dict[str, str] | str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train byte-level BPE on ``docs`` (rows with a ``"text"`` key, or strings).

    ``vocab_size`` counts the special tokens and the 256 byte symbols.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (_without_specials(d if isinstance(d, str) else d["text"]) for d in docs)
    tok.train_from_iterator(texts, trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != i:
            raise RuntimeError(f"special token {token!r} got id {tok.token_to_id(token)}, expected {i}")
    return tok


def tokenizer_config() -> dict:
    """The ``tokenizer_config.json`` contents for a tokenizer made by ``train_tokenizer``."""
    added = {
        str(i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "additional_special_tokens": list(MASK_TOKENS),
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "chat_template": ERNIE_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "cls_token": CLS,
        "eos_token": EOS,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": UNK,
        "sep_token": SEP,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNK,
    }


def save_tokenizer(tok: Tokenizer, out_dir: str | Path) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``; returns ``out_dir``.

    Both files are written to a temporary folder next to their destination, then moved into place
    with ``os.replace``, so a reader never sees a half-written file. Other files in ``out_dir``
    (a checkpoint) are left alone.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer-") as tmp:
        staged = Path(tmp)
        (staged / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
        (staged / "tokenizer_config.json").write_text(config, encoding="utf-8")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            os.replace(staged / name, out_dir / name)
    return out_dir


def build_toy_tokenizer(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    n_docs: int = DEFAULT_N_DOCS,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> Tokenizer:
    """Train on ``training_corpus(seed, n_docs)`` and save to ``out_dir`` (default ``data/toy``)."""
    tok = train_tokenizer(training_corpus(seed=seed, n_docs=n_docs), vocab_size=vocab_size)
    save_tokenizer(tok, toy_dir() if out_dir is None else out_dir)
    return tok
