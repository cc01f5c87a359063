"""Datasets of a report spec, and clean/corrupted prompt batches for activation patching.

A dataset is either **texts** (with optional group labels, e.g. the domain of each document) or
**pairs** (clean/corrupt prompts with the clean and the corrupt answer). Prompt sets are the JSONL
files of ``data/prompts`` (``ernie_lab.toy.prompts.load_prompt_set``); rows with ``clean`` and
``corrupt`` fields are pairs, other rows are texts (field ``text`` or ``prompt``).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ernie_lab.patching.metrics import logit_diff
from ernie_lab.report.spec import SpecError
from ernie_lab.toy.prompts import load_prompt_set

PAIR_FIELDS = ("clean", "corrupt", "answer", "distractor")


@dataclass
class TextData:
    """Texts and their group labels (None when the dataset has no groups)."""

    name: str
    texts: list[str]
    groups: list[str] | None


@dataclass
class PairData:
    """Rows with ``clean``, ``corrupt``, ``answer``, ``distractor`` (and ``task`` when known)."""

    name: str
    rows: list[dict]


def resolve_dataset(name: str, ds: dict, seed: int = 0) -> TextData | PairData:
    """Build the dataset ``name`` of a resolved spec (see ``report_spec``); SpecError on bad fields."""

    where = f"datasets.{name}"
    if ds.get("texts") is not None:
        texts = ds["texts"]
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise SpecError(f"{where}.texts: must be a list of strings")
        groups = ds.get("groups")
        if groups is not None and len(groups) != len(texts):
            raise SpecError(f"{where}.groups: {len(groups)} labels for {len(texts)} texts")
        rows = [{"text": t} for t in texts]
        if groups is not None:
            rows = [r | {"group": str(g)} for r, g in zip(rows, groups, strict=True)]
        fields = {"text_field": "text", "group_field": "group" if groups is not None else None}
    elif ds.get("pairs") is not None:
        rows = [dict(r) for r in ds["pairs"]]
        fields = {}
    else:
        rows = load_prompt_set(str(ds["prompt_set"]))
        fields = {}
    if not rows:
        raise SpecError(f"{where}: the dataset is empty")
    is_pairs = all(isinstance(r, dict) and {"clean", "corrupt"} <= set(r) for r in rows)
    if is_pairs:
        missing = [f for f in PAIR_FIELDS if f not in rows[0]]
        if missing:
            raise SpecError(f"{where}: pairs lack the field(s) {', '.join(missing)}")
    text_field = ds.get("text_field", fields.get("text_field") or _first(rows[0], ("text", "prompt")))
    group_field = ds.get("group_field", fields.get("group_field", _first(rows[0], ("domain", "task", "group"))))
    if is_pairs:
        group_field = ds.get("group_field", "task" if "task" in rows[0] else None)
    for key, value in (("text_field", text_field), ("group_field", group_field)):
        if value is not None and value not in rows[0]:
            raise SpecError(f"{where}.{key}: rows have no field {value!r}; fields: {', '.join(rows[0])}")
    if not is_pairs and text_field is None:
        raise SpecError(
            f"{where}: cannot tell which field holds the text; set text_field (fields: {', '.join(rows[0])})"
        )
    rows = _select(rows, ds, group_field, seed, name, where)
    if is_pairs:
        return PairData(name, rows)
    groups = None if group_field is None else [str(r[group_field]) for r in rows]
    return TextData(name, [str(r[text_field]) for r in rows], groups)


def _first(row: dict, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in row), None)


def _select(rows: list[dict], ds: dict, group_field: str | None, seed: int, name: str, where: str) -> list[dict]:
    """Apply ``filter``, ``shuffle`` (seeded), ``per_group`` and ``limit``, in that order."""
    for key, wanted in (ds.get("filter") or {}).items():
        if key not in rows[0]:
            raise SpecError(f"{where}.filter: rows have no field {key!r}; fields: {', '.join(rows[0])}")
        wanted = {str(w) for w in (wanted if isinstance(wanted, list) else [wanted])}
        rows = [r for r in rows if str(r[key]) in wanted]
    if not rows:
        raise SpecError(f"{where}.filter: no row matches {ds['filter']}")
    if ds.get("shuffle"):
        rows = list(rows)
        random.Random(f"ernie-lab-report/{seed}/{name}").shuffle(rows)
    if ds.get("per_group") is not None:
        if group_field is None:
            raise SpecError(f"{where}.per_group: the dataset has no groups (set group_field)")
        seen: Counter = Counter()
        kept = []
        for r in rows:
            if seen[r[group_field]] < ds["per_group"]:
                seen[r[group_field]] += 1
                kept.append(r)
        rows = kept
    if ds.get("limit") is not None:
        rows = rows[: ds["limit"]]
    return rows


# --------------------------------------------------------------------------------------- patching
@dataclass
class PairBatch:
    """Clean/corrupt token ids ``[batch pos]`` of equal length, answer and distractor ids ``[batch]``,
    the dataset rows they came from and the positions where every clean/corrupt pair differs."""

    clean: torch.Tensor
    corrupt: torch.Tensor
    answer: torch.Tensor
    distractor: torch.Tensor
    rows: list[dict]
    task: str | None
    changed: list[int] = field(default_factory=list)

    def metric(self):
        """Logit difference ``logit[answer] - logit[distractor]`` at the last position, per prompt."""

        return logit_diff(self.answer, self.distractor)


def pair_batch(tokenizer: Any, rows: list[dict], task: str | None = None, n_pairs: int = 8) -> PairBatch:
    """Up to ``n_pairs`` pairs that can be patched together: of ``task`` (default: the first row's task),
    clean and corrupt of equal token length, all with the same token layout (the most common one).

    Layout = (token length, positions where clean and corrupt differ): patching grids average the
    pairs position by position, so only pairs whose changed tokens sit at the same positions are
    averaged (prompts of one template, e.g. the entity at position 10 of 12). Ties between layouts go
    to the one seen first. Answer and distractor are the first token of their text (the toy prompt
    sets make them single tokens); pairs where those coincide are skipped. Raises ValueError when no
    pair qualifies.
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    if task is None and rows and "task" in rows[0]:
        task = rows[0]["task"]
    chosen = [r for r in rows if task is None or r.get("task") == task]
    usable = []
    for r in chosen:
        clean, corrupt = tokenizer.encode(r["clean"]), tokenizer.encode(r["corrupt"])
        answer, distractor = tokenizer.encode(r["answer"]), tokenizer.encode(r["distractor"])
        if len(clean) == len(corrupt) and clean and answer and distractor and answer[0] != distractor[0]:
            usable.append((r, clean, corrupt, answer[0], distractor[0]))
    if not usable:
        tasks = sorted({str(r.get("task")) for r in rows})
        raise ValueError(f"no usable clean/corrupt pair for task {task!r} (equal token length needed); tasks: {tasks}")
    layouts = [_layout(u[1], u[2]) for u in usable]
    layout = Counter(layouts).most_common(1)[0][0]  # Counter keeps first-seen order among ties
    picked = [u for u, lay in zip(usable, layouts, strict=True) if lay == layout][:n_pairs]
    return PairBatch(
        clean=torch.tensor([u[1] for u in picked], dtype=torch.long),
        corrupt=torch.tensor([u[2] for u in picked], dtype=torch.long),
        answer=torch.tensor([u[3] for u in picked], dtype=torch.long),
        distractor=torch.tensor([u[4] for u in picked], dtype=torch.long),
        rows=[u[0] for u in picked],
        task=task,
        changed=list(layout[1]),
    )


def _layout(clean: list[int], corrupt: list[int]) -> tuple[int, tuple[int, ...]]:
    """(token length, positions where the pair differs)."""
    return len(clean), tuple(i for i, (a, b) in enumerate(zip(clean, corrupt, strict=True)) if a != b)
