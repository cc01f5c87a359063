"""The synthetic bilingual training corpus of the toy model.

Documents are rows ``{"domain": str, "text": str}``. Every generator draws from its own
``random.Random`` (seeded from the split and the seed), so the same arguments give the same
documents and nothing touches global random state.

Train/held-out split: a document belongs to the held-out split iff the CRC32 of its text falls in
one of ``HELDOUT_BUCKETS`` buckets; the training generator rejects such texts and the held-out
generator keeps only them, so the two splits are disjoint whatever the seeds. The task prompts
(``ernie_lab.toy.prompts``) are held out by phrasing instead: new templates about the same facts,
held-out places for the indirect-object task and a held-out slice of two-digit arithmetic.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterable

from ernie_lab.toy.chat import chat_document
from ernie_lab.toy.domains import arithmetic_document, chinese_document, code_document, records_document
from ernie_lab.toy.english import english_document

DOMAINS: tuple[str, ...] = ("english", "chinese", "arithmetic", "code", "records", "chat")
# Share of documents per domain; with the toy tokenizer the default corpus is 858k tokens, split
# english 29%, chinese 15%, arithmetic 19%, code 13%, records 14%, chat 9%.
DOMAIN_WEIGHTS: dict[str, float] = {
    "english": 0.28,
    "chinese": 0.17,
    "arithmetic": 0.14,
    "code": 0.13,
    "records": 0.09,
    "chat": 0.19,
}
DEFAULT_N_DOCS = 12000
HELDOUT_BUCKETS = 32

_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "english": english_document,
    "chinese": chinese_document,
    "arithmetic": arithmetic_document,
    "code": code_document,
    "records": records_document,
    "chat": chat_document,
}
_SPLITS = ("train", "heldout")


def is_heldout_text(text: str) -> bool:
    """Whether ``text`` belongs to the held-out split (a fixed 1/HELDOUT_BUCKETS of all texts)."""
    return zlib.crc32(text.encode("utf-8")) % HELDOUT_BUCKETS == 0


def domain_counts(n: int, domains: Iterable[str] = DOMAINS) -> dict[str, int]:
    """Split ``n`` documents over ``domains``: one each when ``n`` allows, the rest in proportion to
    ``DOMAIN_WEIGHTS`` (largest remainder)."""
    domains = tuple(domains)
    base = 1 if n >= len(domains) else 0
    rest = n - base * len(domains)
    total = sum(DOMAIN_WEIGHTS[d] for d in domains)
    exact = {d: rest * DOMAIN_WEIGHTS[d] / total for d in domains}
    counts = {d: base + int(exact[d]) for d in domains}
    leftover = n - sum(counts.values())
    for d in sorted(domains, key=lambda d: exact[d] - int(exact[d]), reverse=True)[:leftover]:
        counts[d] += 1
    return counts


def sample_document(rng: random.Random, domain: str, *, split: str = "train") -> str:
    """One document of ``domain`` from ``split`` ("train" or "heldout"), drawn from ``rng``."""
    if domain not in _GENERATORS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {_SPLITS}")
    want_heldout = split == "heldout"
    while True:
        text = _GENERATORS[domain](rng)
        if is_heldout_text(text) == want_heldout:
            return text


def generate_documents(
    n: int, seed: int, *, split: str = "train", domains: Iterable[str] = DOMAINS
) -> list[dict[str, str]]:
    """``n`` documents ``{"domain", "text"}`` mixed by ``DOMAIN_WEIGHTS``, in a seeded random order."""
    rng = random.Random(f"ernie-lab-toy/{split}/{seed}")
    schedule = [d for d, count in domain_counts(n, domains).items() for _ in range(count)]
    rng.shuffle(schedule)
    return [{"domain": d, "text": sample_document(rng, d, split=split)} for d in schedule]


def training_corpus(seed: int = 0, n_docs: int = DEFAULT_N_DOCS) -> list[dict[str, str]]:
    """The toy model's training documents (858k tokens, 3.3 MB of UTF-8 with the defaults)."""
    return generate_documents(n_docs, seed, split="train")


def heldout_domains(seed: int = 0, per_domain: int = 48) -> list[dict[str, str]]:
    """``per_domain`` held-out documents of every domain, grouped by domain in ``DOMAINS`` order.

    None of these texts can occur in any training corpus (see ``is_heldout_text``).
    """
    rng = random.Random(f"ernie-lab-toy/heldout-domains/{seed}")
    return [{"domain": d, "text": sample_document(rng, d, split="heldout")} for d in DOMAINS for _ in range(per_domain)]


def corpus_stats(docs: list[dict[str, str]], encode: Callable[[str], list[int]] | None = None) -> dict[str, dict]:
    """Per-domain counts ``{"docs", "chars", "bytes"[, "tokens"]}``, plus a ``"total"`` row.

    ``encode`` (text -> token ids) adds token counts, e.g. ``lambda t: tok.encode(t).ids``.
    """
    stats: dict[str, dict] = {}
    for doc in docs:
        for key in (doc["domain"], "total"):
            row = stats.setdefault(key, {"docs": 0, "chars": 0, "bytes": 0} | ({"tokens": 0} if encode else {}))
            row["docs"] += 1
            row["chars"] += len(doc["text"])
            row["bytes"] += len(doc["text"].encode("utf-8"))
            if encode:
                row["tokens"] += len(encode(doc["text"]))
    return stats
