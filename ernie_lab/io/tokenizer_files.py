"""Reading a tokenizer folder's configuration files: special tokens, added tokens, chat template.

Used by :func:`ernie_lab.io.tokenizer.load_tokenizer`; every error names the file it comes from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The named special tokens transformers exposes (``SPECIAL_TOKENS_ATTRIBUTES``); any other
# ``*_token`` string in tokenizer_config.json (ERNIE: ``sys_start_token``...) is named too.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used; the message names the file."""


def max_length_of(value: Any) -> int | None:
    """``model_max_length`` of tokenizer_config.json; transformers writes a huge number for "none"."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**12
    return value if ok else None


def read_json(path: Path) -> dict:
    """The JSON object in ``path`` ({} when absent); TokenizerError naming the file when it is not one."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # bad JSON or not UTF-8
        raise TokenizerError(f"{path} is not valid UTF-8 JSON: {err}") from err
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _content(value: Any) -> str | None:
    """A token given as a string or as an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def named_tokens(config: dict, special_map: dict) -> dict[str, str]:
    """Named special tokens: tokenizer_config.json first, special_tokens_map.json for the rest."""
    named = {}
    # transformers v5 also saves ``*_token`` names beyond the standard ones as a dict
    saved = [config.get("model_specific_special_tokens"), config.get("extra_special_tokens")]
    for source in (config, *[d for d in saved if isinstance(d, dict)], special_map):
        for key, value in source.items():
            # transformers takes ``*_token`` keys beyond the standard ones only when they are strings
            wanted = key in NAMED_TOKENS or (key.endswith("_token") and isinstance(value, str))
            if wanted and key not in named and (token := _content(value)) is not None:
                named[key] = token
    return named


def declared_tokens(config: dict, named: dict[str, str], added_file: dict[str, int]) -> list[dict]:
    """Every token the config files declare, as ``tokenizer.json`` added-token entries (id may be None)."""
    declared = []
    for idx, spec in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
        entry = _added_entry(spec["content"], special=spec.get("special", True))
        declared.append({**entry, **{k: v for k, v in spec.items() if k in entry}, "id": int(idx)})
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    extra = extra if isinstance(extra, list) else []  # a dict holds named tokens, already in ``named``
    special = set(named.values()) | {_content(t) for t in extra if isinstance(t, (str, dict))}
    for token, idx in sorted(added_file.items(), key=lambda kv: kv[1]):
        declared.append({**_added_entry(token, special=token in special), "id": idx})
    declared += [{**_added_entry(t, special=True), "id": None} for t in sorted(special - {None})]
    return declared


def _added_entry(content: str, special: bool) -> dict:
    return {
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": not special,
        "special": special,
    }


def merge_added_tokens(state: dict, declared: list[dict]) -> list[dict]:
    """The ``added_tokens`` list of ``state`` updated with the config's declared tokens.

    A declared token already in the vocabulary keeps its id (and is marked special if declared so);
    a new one gets the next free id, which must equal its declared id when it has one.
    """
    added = {t["content"]: t for t in state.get("added_tokens", [])}
    vocab = state["model"].get("vocab", {})
    vocab_ids = dict(vocab) if isinstance(vocab, dict) else {tok: i for i, (tok, _) in enumerate(vocab)}
    next_id = max([len(vocab_ids) - 1, *vocab_ids.values(), *(t["id"] for t in added.values())], default=-1) + 1
    for spec in declared:
        content = spec["content"]
        known = added[content]["id"] if content in added else vocab_ids.get(content)
        if known is None:
            known, next_id = next_id, next_id + 1
            added[content] = {**spec, "id": known}
        elif content in added:
            added[content]["special"] = added[content]["special"] or spec["special"]
        else:
            added[content] = {**spec, "id": known}
        if spec["id"] is not None and spec["id"] != known:
            raise ValueError(
                f"tokenizer config declares {content!r} with id {spec['id']}, but the tokenizer gives it id {known}"
            )
        if added[content]["special"]:
            added[content]["normalized"] = False
    return sorted(added.values(), key=lambda t: t["id"])


def chat_template_of(directory: Path, config: dict) -> str | None:
    """``chat_template.jinja`` if present (transformers v5 saves it there), else the config's."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template
