"""Held-out prompt sets for the notebooks, tests and reports, written to ``data/prompts``.

- ``domains.jsonl``: ``{"domain", "text"}``, held-out documents of every domain (routing
  specialisation by domain);
- ``tasks.jsonl``: ``{"task", "kind", "prompt", "answer"}`` for the tasks ``arithmetic``,
  ``arithmetic_2digit``, ``recall``, ``ioi`` and ``chat``; ``answer`` is the exact continuation of
  ``prompt``;
- ``patching_pairs.jsonl``: ``{"task", "kind", "clean", "corrupt", "answer", "distractor"}``;
  clean and corrupt differ in one entity, have the same token length, and ``answer`` /
  ``distractor`` (the clean and the corrupt continuation) are single tokens of the toy tokenizer.

What is held out: recall prompts use phrasings never used in training
(``HELDOUT_FACT_TEMPLATES``, ``HELDOUT_QUESTIONS``) about the trained facts; indirect-object
prompts use places the training sentences never use; ``arithmetic_2digit`` prompts are two-digit
problems kept out of training (``is_heldout_problem``), a test of generalisation the toy model
mostly fails (see its model card). The ``arithmetic`` task and the arithmetic patching pairs use
one-digit sums and differences and the times table, which the corpus teaches like facts: the
prompts are new lines, the problems are not, and patching studies how they are recalled.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

from ernie_lab.io.sources import data_dir
from ernie_lab.toy.chat import HELDOUT_QUESTIONS, format_chat, recall_answer
from ernie_lab.toy.corpus import heldout_domains
from ernie_lab.toy.domains import format_problem, sample_problem, solve
from ernie_lab.toy.english import HELDOUT_FACT_TEMPLATES, IOI_FRAMES, IOI_HELDOUT_PLACES
from ernie_lab.toy.world import FACTS, OBJECTS, WORLD

TASKS: tuple[str, ...] = ("arithmetic", "arithmetic_2digit", "recall", "ioi", "chat")
PATCHING_TASKS: tuple[str, ...] = ("recall", "ioi", "arithmetic")
PROMPT_FILES: tuple[str, ...] = ("domains.jsonl", "tasks.jsonl", "patching_pairs.jsonl")
_NAMES = tuple(p.name for p in WORLD.people)
_OP_KIND = {"+": "add", "-": "sub", "*": "mul"}


def _recall_prompt(template: str, subject: str) -> str:
    """The text of a fact template before its object, e.g. "The capital of Veloria is"."""
    return template[: template.index(" {o}")].format(s=subject)


def _ioi_prompt(frame: str, a: str, b: str, giver: str, place: str, obj: str) -> str:
    """An indirect-object sentence cut before its final name."""
    return frame[: frame.rindex(" {A}")].format(A=a, B=b, S=giver, place=place, obj=obj)


def _arithmetic_task(rng: random.Random) -> dict[str, str]:
    """A one-digit sum or difference, or a times-table product, after one solved problem."""
    op = rng.choice("+-*")
    top = 12 if op == "*" else 9
    a, b = rng.randint(0, top), rng.randint(0, top)
    if op == "-" and b > a:
        a, b = b, a
    context = format_problem(rng.randint(1, 9), "+", rng.randint(1, 9))
    prompt = f"{context} {format_problem(a, op, b, with_answer=False)}"
    return {"task": "arithmetic", "kind": _OP_KIND[op], "prompt": prompt, "answer": str(solve(a, op, b))}


def _arithmetic_2digit_task(rng: random.Random) -> dict[str, str]:
    """A problem with a two-digit operand that training never shows: does the model add, or recall?"""
    a, op, b = sample_problem(rng, heldout=True)
    prompt = format_problem(a, op, b, with_answer=False)
    return {"task": "arithmetic_2digit", "kind": _OP_KIND[op], "prompt": prompt, "answer": str(solve(a, op, b))}


def _recall_task(rng: random.Random, relation: str) -> dict[str, str]:
    subject, obj = rng.choice(FACTS[relation])
    prompt = _recall_prompt(rng.choice(HELDOUT_FACT_TEMPLATES[relation]), subject)
    return {"task": "recall", "kind": relation, "prompt": prompt, "answer": f" {obj}"}


def _ioi_task(rng: random.Random) -> dict[str, str]:
    a, b = rng.sample(_NAMES, 2)
    frame_id = rng.randrange(len(IOI_FRAMES))
    prompt = _ioi_prompt(IOI_FRAMES[frame_id], a, b, b, rng.choice(IOI_HELDOUT_PLACES), rng.choice(OBJECTS))
    return {"task": "ioi", "kind": f"frame{frame_id}", "prompt": prompt, "answer": f" {a}"}


def _chat_task(rng: random.Random, relation: str) -> dict[str, str]:
    subject = rng.choice(FACTS[relation])[0]
    question = rng.choice(HELDOUT_QUESTIONS[relation]).format(s=subject)
    prompt = format_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    return {"task": "chat", "kind": relation, "prompt": prompt, "answer": recall_answer(relation, subject)}


def task_prompts(seed: int = 0, n_per_task: int = 60) -> list[dict[str, str]]:
    """``n_per_task`` distinct held-out prompts per task in ``TASKS``, grouped by task.

    Recall and chat prompts cycle through the relations in ``FACTS`` so each is represented.
    """
    rng = random.Random(f"ernie-lab-toy/tasks/{seed}")
    relations = tuple(FACTS)
    makers = {
        "arithmetic": lambda i: _arithmetic_task(rng),
        "arithmetic_2digit": lambda i: _arithmetic_2digit_task(rng),
        "recall": lambda i: _recall_task(rng, relations[i % len(relations)]),
        "ioi": lambda i: _ioi_task(rng),
        "chat": lambda i: _chat_task(rng, relations[i % len(relations)]),
    }
    rows = []
    for task in TASKS:
        seen: set[str] = set()
        while len(seen) < n_per_task:
            row = makers[task](len(seen))
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
    return rows


def _recall_pair(rng: random.Random, relation: str) -> dict[str, str]:
    (subject, obj), (other, other_obj) = rng.sample(FACTS[relation], 2)
    while other_obj == obj:
        other, other_obj = rng.choice(FACTS[relation])
    template = rng.choice(HELDOUT_FACT_TEMPLATES[relation])
    return {
        "task": "recall",
        "kind": relation,
        "clean": _recall_prompt(template, subject),
        "corrupt": _recall_prompt(template, other),
        "answer": f" {obj}",
        "distractor": f" {other_obj}",
    }


def _ioi_pair(rng: random.Random) -> dict[str, str]:
    # Corruption replaces the repeated name (the giver) with a third name: "A and B ..., C gave".
    a, b, c = rng.sample(_NAMES, 3)
    frame_id = rng.randrange(len(IOI_FRAMES))
    frame, place, obj = IOI_FRAMES[frame_id], rng.choice(IOI_HELDOUT_PLACES), rng.choice(OBJECTS)
    return {
        "task": "ioi",
        "kind": f"frame{frame_id}",
        "clean": _ioi_prompt(frame, a, b, b, place, obj),
        "corrupt": _ioi_prompt(frame, a, b, c, place, obj),
        "answer": f" {a}",
        "distractor": f" {b}",
    }


def _arithmetic_pair(rng: random.Random) -> dict[str, str]:
    # Single-digit operands and results, so answer and distractor are one digit token each.
    op = rng.choice("+-")
    while True:
        a, b, b2 = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9)
        answers = (solve(a, op, b), solve(a, op, b2))
        if b != b2 and all(0 <= x <= 9 for x in answers):
            break
    context = format_problem(rng.randint(1, 4), "+", rng.randint(1, 5))
    return {
        "task": "arithmetic",
        "kind": _OP_KIND[op],
        "clean": f"{context} {a}{op}{b}=",
        "corrupt": f"{context} {a}{op}{b2}=",
        "answer": str(answers[0]),
        "distractor": str(answers[1]),
    }


def patching_pairs(seed: int = 0, n_per_task: int = 20) -> list[dict[str, str]]:
    """``n_per_task`` distinct clean/corrupt pairs per task in ``PATCHING_TASKS``, grouped by task."""
    rng = random.Random(f"ernie-lab-toy/patching/{seed}")
    relations = tuple(FACTS)
    makers = {
        "recall": lambda i: _recall_pair(rng, relations[i % len(relations)]),
        "ioi": lambda i: _ioi_pair(rng),
        "arithmetic": lambda i: _arithmetic_pair(rng),
    }
    rows = []
    for task in PATCHING_TASKS:
        seen: set[tuple[str, str]] = set()
        while len(seen) < n_per_task:
            row = makers[task](len(seen))
            if (row["clean"], row["corrupt"]) not in seen:
                seen.add((row["clean"], row["corrupt"]))
                rows.append(row)
    return rows


def prompt_sets(seed: int = 0) -> dict[str, list[dict]]:
    """The rows of every file in ``PROMPT_FILES``, as ``write_prompt_sets`` writes them."""
    return {
        "domains.jsonl": heldout_domains(seed),
        "tasks.jsonl": task_prompts(seed),
        "patching_pairs.jsonl": patching_pairs(seed),
    }


def to_jsonl(rows: list[dict]) -> str:
    """One JSON object per line, UTF-8 text kept readable, trailing newline."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_prompt_sets(out_dir: str | Path | None = None, seed: int = 0) -> dict[str, Path]:
    """Write ``PROMPT_FILES`` into ``out_dir`` (default ``data/prompts``); same bytes on every run.

    Each file is written to a temporary file next to it and moved into place with ``os.replace``.
    """
    out_dir = Path(data_dir() / "prompts" if out_dir is None else out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, rows in prompt_sets(seed).items():
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}-")
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(to_jsonl(rows))
        os.chmod(tmp, 0o644)  # mkstemp creates owner-only files
        os.replace(tmp, out_dir / name)
        written[name] = out_dir / name
    return written


def load_prompt_set(name: str, prompts_dir: str | Path | None = None) -> list[dict]:
    """Read one prompt file, e.g. ``load_prompt_set("patching_pairs")`` (".jsonl" optional)."""
    name = name if name.endswith(".jsonl") else f"{name}.jsonl"
    path = Path(data_dir() / "prompts" if prompts_dir is None else prompts_dir) / name
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
