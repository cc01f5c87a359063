"""ERNIE 4.5 tokenizer: ``tokenizers`` for encoding, jinja2 for the chat template.

``load_tokenizer(src)`` reads a Hugging Face layout directory (or ``"toy"``, or a hub id):
``tokenizer.json`` when present, else the SentencePiece ``tokenizer.model`` that ERNIE 4.5's hub
repos ship, converted once by ``ernie_lab.io.spm_convert``. Special tokens and the chat template come
from ``tokenizer_config.json`` (plus ``special_tokens_map.json``, ``added_tokens.json``,
``chat_template.jinja`` and ``generation_config.json`` when present).

ERNIE adds no BOS: ``encode(text)`` returns the text's ids only. A chat starts with the cls token
``<|begin_of_sentence|>`` written by the chat template, and assistant turns end with the sep token
``<|end_of_sentence|>``, which is therefore a stop token next to ``</s>``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from ernie_lab.io.chat_template import check_messages, encode_chat, prepare_messages, render_chat
from ernie_lab.io.encoding import BatchEncoding, batch_encoding
from ernie_lab.io.sources import resolve_source
from ernie_lab.io.spm_convert import SPACE, converted_tokenizer_json
from ernie_lab.io.tokenizer_files import (
    TokenizerError,
    chat_template_of,
    declared_tokens,
    max_length_of,
    merge_added_tokens,
    named_tokens,
    read_json,
)
from ernie_lab.model.checks import ArgumentTypeError, as_ints, check_text

# The ERNIE 4.5 chat format (as the hub chat_template renders it), written as a jinja template that renders the
# same strings as the ``chat_template`` shipped in the ERNIE 4.5 hub ``tokenizer_config.json``:
# cls, then per message: system -> "{text}\n", user -> "User: {text}\n",
# assistant -> "Assistant: {text}" + sep; and "Assistant: " as the generation prompt.
ERNIE_CHAT_TEMPLATE = (
    "{%- set cls = cls_token if cls_token is defined else '<|begin_of_sentence|>' -%}"
    "{%- set sep = sep_token if sep_token is defined else '<|end_of_sentence|>' -%}"
    "{{- cls -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] ~ '\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'User: ' ~ message['content'] ~ '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Assistant: ' ~ message['content'] ~ sep -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt is not defined or add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)

# Files a tokenizer needs; also what is downloaded for a hub id.
TOKENIZER_PATTERNS = [
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
]
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def load_tokenizer(src: str | Path) -> ErnieTokenizer:
    """Load the tokenizer of ``src``: ``"toy"``, a local directory, or a hub id.

    Raises FileNotFoundError naming the directory when it has neither ``tokenizer.json`` nor
    ``tokenizer.model``; :class:`TokenizerError` (a ValueError) naming a file that is not valid JSON
    of the expected shape; ImportError with the install command when a SentencePiece model must be
    converted and the ``sentencepiece`` extra is missing.
    """
    directory = resolve_source(src, allow_patterns=TOKENIZER_PATTERNS)
    if (directory / "tokenizer.json").is_file():
        tokenizer_json = directory / "tokenizer.json"
    elif (directory / "tokenizer.model").is_file():
        tokenizer_json = converted_tokenizer_json(directory / "tokenizer.model")
    else:
        raise FileNotFoundError(
            f"no tokenizer in {directory}: looked for tokenizer.json or tokenizer.model "
            "(a Hugging Face layout directory, e.g. a copy of an ERNIE 4.5 hub repo)"
        )
    config = read_json(directory / "tokenizer_config.json")
    named = named_tokens(config, read_json(directory / "special_tokens_map.json"))
    state = read_json(tokenizer_json)
    if not isinstance(state.get("model"), dict):
        raise TokenizerError(f"{tokenizer_json} is not a tokenizers file (no 'model' object)")
    state["added_tokens"] = merge_added_tokens(
        state, declared_tokens(config, named, read_json(directory / "added_tokens.json"))
    )
    generation = read_json(directory / "generation_config.json").get("eos_token_id")
    eos = [generation] if isinstance(generation, int) else generation or []
    if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
        raise TokenizerError(f"{directory / 'generation_config.json'}: eos_token_id={generation!r} must be token ids")
    try:
        tokenizer = Tokenizer.from_str(json.dumps(state))
    except Exception as err:  # the Rust library raises plain Exceptions
        raise TokenizerError(f"{tokenizer_json} is not a valid tokenizers file: {err}") from err
    return ErnieTokenizer(
        tokenizer,
        special_tokens=named,
        chat_template=chat_template_of(directory, config),
        extra_eos_ids=eos,
        model_max_length=max_length_of(config.get("model_max_length")),
    )


class ErnieTokenizer:
    """A ``tokenizers.Tokenizer`` with ERNIE's special tokens and chat template.

    ``special_tokens`` maps names (``bos_token``, ``cls_token``, ``sys_start_token``...) to token
    strings; they are also the variables the chat template sees, as in transformers.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        extra_eos_ids: list[int] | tuple[int, ...] = (),
        model_max_length: int | None = None,
    ):
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length  # tokenizer_config.json's; the default max_length
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self._extra_eos_ids = list(extra_eos_ids)
        decoder = tokenizer.decoder.__getstate__() if tokenizer.decoder is not None else b""
        self._byte_level = b'"ByteLevel"' in decoder
        self._added_ids = set(tokenizer.get_added_tokens_decoder())

    # ids of the named special tokens (None when the tokenizer has no such token)
    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def cls_token_id(self) -> int | None:
        return self._named_id("cls_token")

    @property
    def sep_token_id(self) -> int | None:
        return self._named_id("sep_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._named_id("unk_token")

    @property
    def pad_token_id(self) -> int:
        """The pad token's id, falling back to ``<unk>`` (ERNIE pads with it) and then 0."""
        for name in ("pad_token", "unk_token"):
            if (idx := self._named_id(name)) is not None:
                return idx
        return 0

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: sep (end of an assistant turn), eos, and generation_config's."""
        ids = [self.sep_token_id, self.eos_token_id, *self._extra_eos_ids]
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding may be larger)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.tokenizer.id_to_token(int(idx))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; nothing added (no BOS). Special-token strings become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        check_text(text)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list or a 1-D integer tensor of ids in ``[0, vocab_size)``; a string,
        floats or bools raise ArgumentTypeError, never read digit by digit)."""
        return self.tokenizer.decode(_id_list(ids, self.vocab_size), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: list[list[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        """``decode`` for each row of ``batch`` ([batch pos] tensor or list of lists)."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in batch]

    def __call__(
        self,
        texts: str | list[str],
        padding_side: str = "left",
        return_tensors: str | None = "pt",
        add_special_tokens: bool = False,
        padding: bool | str = "longest",
        truncation: bool | str = False,
        max_length: int | None = None,
        truncation_side: str = "right",
    ) -> BatchEncoding:
        """Encode a batch: ``input_ids`` and ``attention_mask`` ([batch pos], 0 on padding).

        ``padding``, ``truncation``, ``max_length``, ``truncation_side``: as in transformers
        (:func:`ernie_lab.io.encoding.batch_encoding`; ``max_length`` defaults to the config's
        ``model_max_length``). Two defaults differ, for batched generation: ``padding_side="left"``
        keeps every prompt's last token in the last column, and ``padding="longest"`` (transformers:
        no padding) makes a batch one tensor. ``return_tensors=None`` gives lists instead of
        LongTensors. A :class:`BatchEncoding` (``model.generate(**tok([text]).to(model.device))``
        works as in transformers). ``add_special_tokens``: transformers' spelling; ERNIE adds no
        BOS/EOS either way.
        """
        rows = [self.encode(t) for t in ([texts] if isinstance(texts, str) else texts)]
        return batch_encoding(
            rows,
            self.pad_token_id,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            model_max_length=self.model_max_length,
            padding_side=padding_side,
            truncation_side=truncation_side,
            return_tensors=return_tensors,
        )

    def convert_ids_to_tokens(self, ids: list[int] | torch.Tensor) -> list[str]:
        """Readable token strings, e.g. for plot labels.

        SentencePiece's ``▁`` shows as a space and ASCII byte pieces (``<0x0A>``) as their character;
        byte-level BPE tokens (GPT-2's ``Ġ`` alphabet) are shown as their UTF-8 text, with
        ``\\xNN`` escapes for bytes that do not complete a character. Added tokens show verbatim.
        """
        return [self._readable(i) for i in _id_list(ids, self.vocab_size)]

    def _readable(self, idx: int) -> str:
        token = self.tokenizer.id_to_token(idx)
        if token is None:
            return f"<id {idx}?>"
        if idx in self._added_ids:
            return token
        if self._byte_level:
            raw = bytes(_UNICODE_TO_BYTE.get(ch, ord("?")) for ch in token)
            return raw.decode("utf-8", errors="backslashreplace")
        if m := _BYTE_PIECE.fullmatch(token):
            value = int(m.group(1), 16)
            return chr(value) if value < 0x80 else token
        return token.replace(SPACE, " ")

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        special_tokens_in_content: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the checkpoint's chat template (``ERNIE_CHAT_TEMPLATE`` if none).

        Renders exactly as transformers does: sandboxed jinja2 with ``trim_blocks``/``lstrip_blocks``,
        ``raise_exception``/``strftime_now``, every named special token as a variable, messages
        prepared as transformers prepares them.

        ``tokenize=True`` returns ids. Message content is data: the template's own special tokens
        become control ids, while special-token strings inside a message's text are encoded as plain
        text, so a message cannot end a turn or forge one (``<|end_of_sentence|>Assistant: ...``).
        ``special_tokens_in_content=True`` parses them in the content too (transformers' behaviour).
        """
        check_messages(messages)
        template = chat_template or self.chat_template or ERNIE_CHAT_TEMPLATE
        if not isinstance(template, str):
            raise TypeError(f"chat_template must be a jinja template string, got {type(template).__name__}")
        variables = {**self.special_tokens, **template_kwargs}
        messages = prepare_messages(template, messages, variables)
        if tokenize and not special_tokens_in_content:
            return encode_chat(self.tokenizer, template, messages, add_generation_prompt, variables)
        text = render_chat(template, messages, add_generation_prompt, variables)
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        named = ", ".join(f"{k}={v!r}" for k, v in self.special_tokens.items())
        return f"ErnieTokenizer(vocab_size={self.vocab_size}, {named})"


def _id_list(ids: list[int] | torch.Tensor, vocab: int) -> list[int]:
    if isinstance(ids, torch.Tensor) and ids.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of ids, got shape {tuple(ids.shape)}")
    if isinstance(ids, str | bytes):
        raise ArgumentTypeError(f"ids must be a list of integer token ids or a 1-D tensor, got {ids!r}")
    return as_ints(ids, "ids (token ids)", 0, vocab)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (used by byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


_UNICODE_TO_BYTE = {ch: b for b, ch in _byte_to_unicode().items()}
