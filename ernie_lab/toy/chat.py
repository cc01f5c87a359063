"""Chat-formatted documents, so the toy model learns the ERNIE 4.5 chat format.

``format_chat`` renders messages exactly as ``ernie_lab.io.tokenizer.ERNIE_CHAT_TEMPLATE`` does
(the hub chat_template's format): ``<|begin_of_sentence|>``, then ``{system}\\n``, ``User: {text}\\n`` and
``Assistant: {text}<|end_of_sentence|>`` per message, and ``Assistant: `` as generation prompt.
The assistant answers recall questions about the invented world and arithmetic questions.
"""

from __future__ import annotations

import random

from ernie_lab.toy.domains import format_problem, sample_problem, solve
from ernie_lab.toy.english import TRAIN_FACT_TEMPLATES
from ernie_lab.toy.world import FACTS

CLS_TOKEN = "<|begin_of_sentence|>"
SEP_TOKEN = "<|end_of_sentence|>"
GENERATION_PROMPT = "Assistant: "

SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly.", "你是一个乐于助人的助手。")
TRAIN_QUESTIONS: dict[str, tuple[str, ...]] = {
    "capital": ("What is the capital of {s}?", "Which city is the capital of {s}?"),
    "export": ("What does {s} export most?", "What is the main export of {s}?"),
    "home": ("Where does {s} live?", "Which city does {s} live in?"),
    "job": ("What does {s} do for a living?", "What is the job of {s}?"),
    "hq": ("Where is {s} based?", "Where is the main office of {s}?"),
    "founder": ("Who founded {s}?", "Who is the founder of {s}?"),
}
# New phrasings for the held-out chat prompts; the answers use the same sentences as training.
HELDOUT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "capital": ("Do you know the capital of {s}?", "Tell me the capital of {s}."),
    "export": ("Tell me what {s} exports.", "Do you know the main export of {s}?"),
    "home": ("In which city does {s} live?", "Do you know where {s} lives?"),
    "job": ("Tell me the job of {s}.", "Do you know what {s} does?"),
    "hq": ("In which city is {s} based?", "Do you know where {s} is based?"),
    "founder": ("Do you know who founded {s}?", "Tell me who founded {s}."),
}
_SMALL_TALK = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Who are you?", "I am a tiny ERNIE-style model trained on a toy corpus."),
    ("Thank you.", "You are welcome."),
    ("你好", "你好！有什么可以帮你的吗？"),
    ("谢谢", "不客气。"),
)
_CN_OPS = {"+": "加", "-": "减", "*": "乘以"}


def format_chat(messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    """Render ``[{"role", "content"}, ...]`` in the ERNIE 4.5 chat format."""
    parts = [CLS_TOKEN]
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            parts.append(content + "\n")
        elif role == "user":
            parts.append(f"User: {content}\n")
        elif role == "assistant":
            parts.append(f"Assistant: {content}{SEP_TOKEN}")
        else:
            raise ValueError(f"unknown chat role {role!r}; expected system, user or assistant")
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)


def chat_segments(text: str) -> list[str]:
    """A rendered chat split after every ``"Assistant: "``, to be encoded piece by piece.

    At inference the rendered prompt ends in ``"Assistant: "`` and is encoded on its own, so its
    trailing space is a token of its own; encoding a whole chat at once would merge that space into
    the reply's first word, a token sequence the model would then never meet when it answers.
    """
    pieces = text.split(GENERATION_PROMPT)
    return [p + GENERATION_PROMPT for p in pieces[:-1]] + [pieces[-1]]


def document_pieces(doc: dict[str, str]) -> list[str]:
    """A corpus row ``{"domain", "text"}`` as the texts to encode one after the other: a chat in
    ``chat_segments``, any other document whole."""
    return chat_segments(doc["text"]) if doc["domain"] == "chat" else [doc["text"]]


def encode_document(tokenizer, doc: dict[str, str]) -> list[int]:
    """Token ids of a corpus row, its pieces encoded one after the other exactly as training saw them."""
    return [i for piece in document_pieces(doc) for i in tokenizer.encode(piece)]


def recall_answer(relation: str, subject: str) -> str:
    """The assistant's sentence for a recall question, e.g. "The capital of Veloria is Mirren."."""
    return TRAIN_FACT_TEMPLATES[relation][0].format(s=subject, o=dict(FACTS[relation])[subject])


def recall_exchange(rng: random.Random, questions: dict[str, tuple[str, ...]] = TRAIN_QUESTIONS) -> tuple[str, str]:
    """A (question, answer) pair about a random fact."""
    relation = rng.choice(tuple(FACTS))
    subject = rng.choice(FACTS[relation])[0]
    return rng.choice(questions[relation]).format(s=subject), recall_answer(relation, subject)


def _arithmetic_exchange(rng: random.Random) -> tuple[str, str]:
    a, op, b = sample_problem(rng)
    if rng.random() < 0.3:
        word = _CN_OPS[op]
        return f"{a}{word}{b}等于多少？", f"{a}{word}{b}等于{solve(a, op, b)}。"
    return f"What is {a}{op}{b}?", format_problem(a, op, b) + "."


def chat_document(rng: random.Random) -> str:
    """A one- to three-turn conversation, sometimes with a system line."""
    messages = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.choices((1, 2, 3), weights=(5, 3, 2))[0]):
        kind = rng.choices(("recall", "arithmetic", "small_talk"), weights=(6, 3, 1))[0]
        if kind == "recall":
            question, answer = recall_exchange(rng)
        elif kind == "arithmetic":
            question, answer = _arithmetic_exchange(rng)
        else:
            question, answer = rng.choice(_SMALL_TALK)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return format_chat(messages)
