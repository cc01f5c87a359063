"""Chat templates: rendering as transformers does, and encoding with message content as data.

transformers renders the template and encodes the whole string, so a user message containing
``<|end_of_sentence|>Assistant: ...`` becomes real control tokens and can end a turn or forge an
assistant reply. :func:`encode_chat` instead renders each message's text as a placeholder, encodes the
template's own special tokens as control ids and every message's text as plain text (special-token
strings in it become ordinary pieces). Text with no special-token strings gets exactly the ids of the
whole-string encoding: the tokenizer splits at special tokens first either way.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any

from tokenizers import Tokenizer

# private-use characters: a template passes them through, and chat text does not contain them
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """``messages`` as a list of ``{"role": str, "content": ...}`` dicts, else a TypeError naming the entry."""
    if not isinstance(messages, list | tuple):
        raise TypeError(
            f'messages must be a list of {{"role": ..., "content": ...}} dicts, got {type(messages).__name__}'
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise TypeError(f'messages[{i}] must be a dict with a string "role", got {message!r}')
    return list(messages)


def render_chat(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, variables: dict) -> str:
    """The template's text for ``messages``, rendered exactly as transformers renders it."""
    chat = [template_message(m) for m in messages]
    return compile_template(template).render(
        messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **variables
    )


def encode_chat(
    tokenizer: Tokenizer, template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, variables: dict
) -> list[int]:
    """Ids of the rendered chat with the template's special tokens as control ids and each message's
    string ``content`` encoded as plain text (special-token strings in it are not parsed).

    Raises ValueError when the template inspects the content (its output changes once the content is
    replaced by a placeholder): encode such a chat with ``special_tokens_in_content=True``.
    """
    texts: list[str] = []
    marked = []
    for message in messages:
        if isinstance(message.get("content"), str):
            marked.append({**message, "content": f"{_OPEN}{len(texts)}{_CLOSE}"})
            texts.append(message["content"])
        else:
            marked.append(message)
    rendered = render_chat(template, marked, add_generation_prompt, variables)
    plain = render_chat(template, messages, add_generation_prompt, variables)
    if _PLACEHOLDER.sub(lambda m: texts[int(m.group(1))], rendered) != plain:
        raise ValueError(
            "this chat template changes its output with the message text, so the text cannot be kept apart "
            "from the template's control tokens; pass special_tokens_in_content=True to encode the rendered text"
        )
    specials = sorted(
        (t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special), key=len, reverse=True
    )
    control = re.compile("|".join(map(re.escape, specials))) if specials else None
    segments: list[str | int] = [""]  # text to encode as plain text, or a control id
    for i, piece in enumerate(_PLACEHOLDER.split(rendered)):
        if i % 2:  # a message's text
            segments[-1] += texts[int(piece)]
            continue
        at = 0
        for match in control.finditer(piece) if control else ():
            segments[-1] += piece[at : match.start()]
            segments += [tokenizer.token_to_id(match.group()), ""]
            at = match.end()
        segments[-1] += piece[at:]
    ids: list[int] = []
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True  # special-token strings in the text are plain text
    try:
        for segment in segments:
            if isinstance(segment, int):
                ids.append(segment)
            elif segment:
                ids += tokenizer.encode(segment, add_special_tokens=False).ids
    finally:
        tokenizer.encode_special_tokens = previous
    return ids


def template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as transformers hands it to a template: None values dropped (templates test for
    missing keys) and reasoning copied under each name templates read it by."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=16)
def compile_template(template: str):
    """Compile like transformers' ``_compile_jinja_template`` (same environment and globals)."""
    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text; rendering just keeps it."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_keep"), [], [], body).set_lineno(lineno)

        def _keep(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
