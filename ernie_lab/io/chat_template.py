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

from ernie_lab.model.checks import check_text

# private-use characters: a template passes them through, and chat text does not contain them
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


class ChatMessageError(ValueError):
    """A chat message this template cannot render faithfully: a role it does not render (the text
    would vanish from the prompt) or a content part that is not text."""


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


# roles a template names: message['role'] == 'user', message.role != "tool", 'system' == message["role"]
_ROLE_TEST = re.compile(
    r"""role['"]?\]?\s*[!=]=\s*['"]([^'"]+)['"]"""  # role == 'user'
    r"""|['"]([^'"]+)['"]\s*[!=]=\s*\w+(?:\.role|\[['"]role['"]\])"""  # 'user' == message.role
)
_ROLE_IN = re.compile(r"""role['"]?\]?\s+in\s+[\[(]([^\])]*)[\])]""")
_PARTS = re.compile(r"""\[\s*['"]type['"]\s*\]|\.type\b""")  # the template reads content parts itself
_PROBE = "\ue002probe\ue002"


def template_roles(template: str) -> list[str]:
    """The roles ``template`` tests for, read from its source (sorted; empty when it tests none)."""
    roles = {a or b for a, b in _ROLE_TEST.findall(template)}
    for group in _ROLE_IN.findall(template):
        roles |= set(re.findall(r"""['"]([^'"]+)['"]""", group))
    return sorted(roles)


def prepare_messages(template: str, messages: list[dict[str, Any]], variables: dict) -> list[dict[str, Any]]:
    """Messages checked against ``template`` before rendering.

    Content: a string, None, or a list of ``{"type": "text", "text": str}`` parts, joined without a
    separator (as templates that read parts render consecutive text parts) unless the template reads
    the parts itself; any other part type (an image...) is a ChatMessageError for this text-only
    model. Roles: each role must appear in the rendering of a one-message probe, else the message
    would vanish from the prompt: ChatMessageError listing the template's roles. Lone surrogates in
    text: ArgumentRangeError naming the character and position.
    """
    reads_parts = bool(_PARTS.search(template))
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list | tuple):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ChatMessageError(
                        f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': str}}; got "
                        f"{part!r} (this model reads text only)"
                    )
                texts.append(part["text"])
            content = list(content) if reads_parts else "".join(texts)
            message = {**message, "content": content}
        elif content is not None and not isinstance(content, str):
            raise ChatMessageError(f"messages[{i}].content must be a string or a list of text parts, got {content!r}")
        if isinstance(content, str):
            check_text(content, f"messages[{i}].content")
        out.append(message)
    probes = [_PROBE, [{"type": "text", "text": _PROBE}]] if reads_parts else [_PROBE]
    for role in dict.fromkeys(m["role"] for m in out):
        rendered = []
        for content in probes:
            try:
                rendered.append(render_chat(template, [{"role": role, "content": content}], False, variables))
            except Exception:  # a template that refuses a lone message: nothing learnt from the probe
                rendered.append(_PROBE)
        if not any(_PROBE in text for text in rendered):
            where = next(i for i, m in enumerate(out) if m["role"] == role)
            raise ChatMessageError(
                f"messages[{where}] has role {role!r}, which this chat template does not render (its text would "
                f"vanish from the prompt); the template's roles: {template_roles(template) or 'none named'}"
            )
    return out


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
