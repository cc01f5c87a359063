"""The toy model's data: a synthetic bilingual corpus, held-out prompt sets and a tokenizer; the
dissociation table that shows its specialised experts are causal (``dissociation``); and two checkpoints'
held-out NLL per domain with a paired bootstrap interval (``compare_nll``).

Corpus and prompt sets are re-exported here; the tokenizer trainer lives in
``ernie_lab.toy.tokenizer_train`` (``build_toy_tokenizer``, ``train_tokenizer``, ``save_tokenizer``).
"""

from ernie_lab.toy.chat import format_chat
from ernie_lab.toy.corpus import (
    DOMAINS,
    corpus_stats,
    generate_documents,
    heldout_domains,
    is_heldout_text,
    training_corpus,
)
from ernie_lab.toy.prompts import (
    PATCHING_TASKS,
    TASKS,
    load_prompt_set,
    patching_pairs,
    prompt_sets,
    task_prompts,
    write_prompt_sets,
)
from ernie_lab.toy.world import FACTS, WORLD

__all__ = [
    "DOMAINS",
    "FACTS",
    "PATCHING_TASKS",
    "TASKS",
    "WORLD",
    "compare_nll",
    "corpus_stats",
    "dissociation",
    "format_chat",
    "generate_documents",
    "heldout_domains",
    "is_heldout_text",
    "load_prompt_set",
    "patching_pairs",
    "prompt_sets",
    "task_prompts",
    "training_corpus",
    "write_prompt_sets",
]


def __getattr__(name: str):
    # the dissociation table needs the analysis wings; load them only when it is asked for
    if name in ("dissociation", "plot_dissociation"):
        from ernie_lab.toy import causal

        return getattr(causal, name)
    if name == "compare_nll":
        from ernie_lab.toy.evaluate import compare_nll

        return compare_nll
    raise AttributeError(f"module 'ernie_lab.toy' has no attribute {name!r}")
