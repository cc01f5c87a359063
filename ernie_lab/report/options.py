"""Types and ranges of every analysis option of a report spec, checked when the spec is resolved
(:func:`check_options`, no model needed) and against the model's config before its weights load
(:func:`check_against_config`), so a bad value fails in a second with its key named, never a minute
later inside a section or as a silent slice.

Each option name means the same thing in every section that has it; :data:`RULES` maps it to its
check. A rule returns None when the value is fine, else what would be valid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ernie_lab.io.sources import TOY, toy_dir
from ernie_lab.model.checks import is_int
from ernie_lab.model.config import ErnieConfig

# the analyses' own choices (ablation MODES, saliency SALIENCY_COLUMNS, patching RESIDUAL_HOOKS), spelt out
# so that parsing a spec does not import the analyses and their plotting; tests/report checks they agree
MODES = ("zero", "reroute", "mean")
SALIENCY_COLUMNS = ("frequency", "weighted_frequency", "ean_mean", "reap", "easy_ep")
RESIDUAL_HOOKS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
MAX_NEW_TOKENS = 131072  # the longest context of a released ERNIE 4.5 model; the config bounds it further


class SpecError(ValueError):
    """A report spec that cannot be run; the message names the offending key or value."""


def _int(low: int, high: int | None = None, none: bool = False) -> Callable[[Any], str | None]:
    valid = f"an integer >= {low}" + (f" and <= {high}" if high is not None else "") + (" or null" if none else "")

    def rule(value: Any) -> str | None:
        if value is None and none:
            return None
        ok = is_int(value) and value >= low and (high is None or value <= high)
        return None if ok else valid

    return rule


def _number(low: float, high: float, open_ends: bool = False) -> Callable[[Any], str | None]:
    valid = f"a number in ({low}, {high})" if open_ends else f"a number in [{low}, {high}]"

    def rule(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            return valid
        ok = low < value < high if open_ends else low <= value <= high
        return None if ok else valid

    return rule


def _choice(*choices: Any, none: bool = False) -> Callable[[Any], str | None]:
    valid = f"one of {list(choices)}" + (" or null" if none else "")
    return lambda value: None if (value is None and none) or (isinstance(value, str) and value in choices) else valid


def _int_list(low: int = 0, none: bool = True, min_len: int = 1) -> Callable[[Any], str | None]:
    valid = f"a list of at least {min_len} integers >= {low}" + (" or null" if none else "")

    def rule(value: Any) -> str | None:
        if value is None and none:
            return None
        ok = isinstance(value, list) and len(value) >= min_len and all(is_int(v) and v >= low for v in value)
        return None if ok else valid

    return rule


def _str_list(*choices: str) -> Callable[[Any], str | None]:
    valid = f"a non-empty list of {list(choices)}"
    return lambda value: None if isinstance(value, list) and value and all(v in choices for v in value) else valid


def _label(value: Any) -> str | None:
    return None if value is None or is_int(value) or isinstance(value, str) else "a group label (string) or null"


def _experts(value: Any) -> str | None:
    valid = "a mapping {layer: [expert, ...]} of integers (layer keys may be written as strings)"
    if not isinstance(value, dict) or not value:
        return valid
    for layer, es in value.items():
        key_ok = is_int(layer) and layer >= 0 or isinstance(layer, str) and layer.isdigit()
        if not key_ok or not isinstance(es, list) or not all(is_int(e) and e >= 0 for e in es):
            return valid
    return None


RULES: dict[str, Callable[[Any], str | None]] = {
    "dataset": lambda v: None if isinstance(v, str) and v else "a dataset name",
    "values": _str_list("load", "wload", "mean_prob", "count"),
    "layers": _int_list(),
    "importance_layers": _int_list(),
    "layer": _int(0, none=True),
    "top": _int(1, none=True),
    "min_count": _int(1),
    "key": _choice("token", "next_token"),
    "recipe": lambda v: None,  # checked by the spec (names, trusted paths)
    "params": lambda v: None if v is None or isinstance(v, dict) else "a mapping of recipe parameters",
    "task": lambda v: None if v is None or isinstance(v, str) else "a task name or null",
    "n_pairs": _int(1),
    "hooks": _str_list(*RESIDUAL_HOOKS),
    "hook": _choice(*RESIDUAL_HOOKS),
    "per_position": lambda v: None if isinstance(v, bool) else "true or false",
    "split_experts": lambda v: None if isinstance(v, bool) else "true or false",
    "mode": _choice(*MODES),
    "order_by": _choice("importance", "load"),
    "steps": _int_list(),
    "experts": _experts,
    "value": _choice(*SALIENCY_COLUMNS),
    "prune": _int(0),
    "quantile": _number(0.0, 1.0, open_ends=True),
    "rel": _number(0.0, 1.0),
    "n_texts": _int(1),
    "group_a": _label,
    "group_b": _label,
    "steer": _int(0),
    "prompt_tokens": _int(1, MAX_NEW_TOKENS),
    "max_new_tokens": _int(0, MAX_NEW_TOKENS),
}


def _list_of(value: Any, kind: type) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, kind) for v in value)


DATASET_RULES: dict[str, Callable[[Any], str | None]] = {
    "prompt_set": lambda v: None if isinstance(v, str) and v else "a prompt set name",
    "texts": lambda v: None if isinstance(v, list) and v and all(isinstance(t, str) for t in v) else "a list of texts",
    "pairs": lambda v: (
        None if isinstance(v, list) and v and all(isinstance(p, dict) for p in v) else "a list of mappings"
    ),
    "groups": lambda v: None if isinstance(v, list) and all(_label(g) is None for g in v) else "a list of group labels",
    "text_field": lambda v: None if isinstance(v, str) and v else "a field name",
    "group_field": lambda v: None if v is None or isinstance(v, str) and v else "a field name or null",
    "filter": lambda v: None if v is None or isinstance(v, dict) else "a mapping {field: value or [values]}",
    "per_group": _int(1, none=True),
    "limit": _int(1, none=True),
    "shuffle": lambda v: None if isinstance(v, bool) else "true or false",
}


def check_dataset(where: str, ds: dict) -> None:
    """Raise SpecError for the first dataset option of the wrong type or range."""
    for key, value in ds.items():
        problem = DATASET_RULES[key](value) if key in DATASET_RULES else None
        if problem:
            raise SpecError(f"{where}.{key}: must be {problem}, got {value!r}")
    if (
        isinstance(ds.get("groups"), list)
        and isinstance(ds.get("texts"), list)
        and len(ds["groups"]) != len(ds["texts"])
    ):
        raise SpecError(f"{where}.groups: {len(ds['groups'])} labels for {len(ds['texts'])} texts")


def check_options(where: str, kind: str, options: dict) -> None:
    """Raise ``SpecError`` (``"{where}.{key}: must be ..."``) for the first option of the wrong type
    or range; ``expert_transitions`` needs two or more layers."""
    for key, value in options.items():
        rule = RULES.get(key)
        problem = rule(value) if rule else None
        if problem is None and kind == "expert_transitions" and key == "layers" and value is not None:
            problem = None if len(value) >= 2 else "a list of at least 2 MoE layers"
        if problem:
            raise SpecError(f"{where}.{key}: must be {problem}, got {value!r}")


def check_local_config(model: str, analyses: dict) -> None:
    """:func:`check_against_config` at parse time when the model's config is on this machine (``toy``
    or a checkpoint folder); a hub id is checked by the runner once its config is downloaded."""
    folder = toy_dir() if model == TOY else Path(model)
    if (folder / "config.json").is_file():
        check_against_config(analyses, ErnieConfig.from_hf(folder))


def check_against_config(analyses: dict, config) -> None:
    """Raise ``SpecError`` for options out of range for the model about to be loaded: layers that
    are not MoE layers, expert ids >= E, counts above E, a generation longer than the context."""
    moe, n_expert = list(config.moe_layers), config.moe_num_experts
    for sid, opts in analyses.items():
        where = f"analyses.{sid}"
        for key in ("layers", "importance_layers", "layer"):
            value = opts.get(key)
            listed = [value] if is_int(value) else value or []
            bad = [L for L in listed if L not in moe]
            if bad:
                raise SpecError(f"{where}.{key}: {bad} are not MoE layers of the model; MoE layers: {moe}")
        for layer, es in (opts.get("experts") or {}).items():
            if int(layer) not in moe or any(e >= n_expert for e in es):
                raise SpecError(
                    f"{where}.experts: layer {layer}: {es} is not a MoE layer's experts; MoE layers {moe}, "
                    f"experts [0, {n_expert})"
                )
        for key, high in (("prune", n_expert), ("steer", config.moe_k), ("steps", n_expert)):
            value = opts.get(key)
            if any(v > high for v in ([value] if is_int(value) else value or [])):
                raise SpecError(f"{where}.{key}: must be at most {high} for this model, got {value!r}")
        if "max_new_tokens" in opts:
            total = opts["prompt_tokens"] + opts["max_new_tokens"]
            if total > config.max_position_embeddings:
                raise SpecError(
                    f"{where}: prompt_tokens + max_new_tokens = {total} exceeds the model's "
                    f"max_position_embeddings={config.max_position_embeddings}"
                )
