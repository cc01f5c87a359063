"""Chat messages are rendered faithfully or refused: a role the template does not render is an error
listing the template's roles (never a message that vanishes), list content of text parts is joined,
other part types are refused, text with a lone surrogate names the character and its position."""

from __future__ import annotations

import pytest

import ernie_lab as el
from ernie_lab.io.chat_template import ChatMessageError, template_roles

GENERIC = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"  # renders any role
PARTS = (
    "{% for m in messages %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}[{{ p['text'] }}]{% endif %}{% endfor %}{% endfor %}"
)


@pytest.fixture(scope="module")
def tok():
    return el.load_tokenizer("toy")


def test_unknown_role_is_an_error_listing_the_roles(tok):
    roles = template_roles(tok.chat_template)
    assert roles and "usr" not in roles
    for tokenize in (False, True):
        with pytest.raises(ChatMessageError, match=r"messages\[1\] has role 'usr'.*" + str(roles).replace("[", r"\[")):
            tok.apply_chat_template(
                [{"role": "system", "content": "Be brief."}, {"role": "usr", "content": "hi"}], tokenize=tokenize
            )
    for role in roles:  # every role the template names renders its text
        assert "probe text" in tok.apply_chat_template([{"role": role, "content": "probe text"}])
    assert "<|usr|>hi" in tok.apply_chat_template([{"role": "usr", "content": "hi"}], chat_template=GENERIC)


def test_text_parts_are_joined_and_other_parts_refused(tok):
    plain = tok.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    listed = tok.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    assert listed == plain and "'type'" not in listed  # never a Python repr
    ids = tok.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=True)
    assert ids == tok.apply_chat_template([{"role": "user", "content": "Hello there"}], True, tokenize=True)
    # a template that reads the parts itself gets them as they are
    assert tok.apply_chat_template([{"role": "user", "content": parts}], chat_template=PARTS) == "[Hello ][there]"
    for bad in ([{"type": "image", "url": "cat.png"}], [{"type": "text", "text": 3}], ["Hello"]):
        with pytest.raises(ChatMessageError, match=r"messages\[0\]\.content\[0\] must be a text part"):
            tok.apply_chat_template([{"role": "user", "content": bad}])
    with pytest.raises(ChatMessageError, match="must be a string or a list of text parts"):
        tok.apply_chat_template([{"role": "user", "content": 42}])


def test_lone_surrogate_names_the_character_and_position(tok):
    with pytest.raises(el.ArgumentRangeError, match=r"lone surrogate '\\udc80' \(U\+DC80\) at position 4"):
        tok.encode("abcd\udc80e")
    with pytest.raises(ValueError, match=r"messages\[0\]\.content holds a lone surrogate .* at position 1"):
        tok.apply_chat_template([{"role": "user", "content": "a\ud800"}])
    with pytest.raises(ValueError, match="lone surrogate"):
        tok(["fine", "x\udfff"])
