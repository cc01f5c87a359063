"""Report specs: read a YAML or TOML file, fill in defaults, validate, apply quick mode.

A spec is a mapping (see ``ernie_lab/report/default.yaml`` for a complete, commented one)::

    title: My report            # heading of index.html
    model: toy                  # "toy", a checkpoint directory or a hub id
    tokenizer: null             # default: the model's source
    dtype: null                 # e.g. bfloat16; default: the checkpoint's
    device: cpu                 # cpu, cuda, auto (spread over GPUs)
    seed: 0                     # seeds torch / numpy / random; also dataset shuffling
    threads: null               # torch CPU threads for the run (null: torch's default); CPU results
                                # depend on it in the last bits, so fix it to compare machines
    batch_size: 8
    hash_checkpoint: true       # sha256 of the safetensors files in manifest.json
    datasets:                   # name -> where the prompts come from
      domains: {prompt_set: domains, per_group: 16}
      mine: {texts: ["one text", "another"], groups: [a, b]}
    analyses:                   # section id -> options; ``kind`` defaults to the id
      expert_load: {dataset: domains}
      ablated_routing: {kind: recipe_comparison, recipe: ablate_experts, params: {experts: {1: [0]}}}
    quick:                      # merged over the spec by --quick (same shape as the spec)
      datasets: {domains: {per_group: 2}}

Every analysis kind, its options and their defaults are in :data:`KINDS`. Unknown keys, kinds,
datasets, prompt sets and recipes raise :class:`SpecError` naming them, before anything is run. A
``recipe`` is a bundled recipe's name, or a path to a ``.py`` file that runs only with an explicit
opt-in: ``trust_recipes=True`` (``--trust-recipes``) from the caller, or ``trust_recipes: true`` written
in the spec itself (as transformers' ``trust_remote_code``); each recipe file run is logged as a warning.
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ernie_lab.io.sources import data_dir
from ernie_lab.io.weights import parse_dtype
from ernie_lab.recipes import is_recipe_name, list_recipes, load_recipe
from ernie_lab.report.options import SpecError, check_dataset, check_local_config, check_options

logger = logging.getLogger(__name__)

DEFAULT_SPEC = Path(__file__).with_name("default.yaml")

TOP_LEVEL = {
    "title": "ernie_lab report",
    "model": "toy",
    "tokenizer": None,
    "dtype": None,
    "device": "cpu",
    "seed": 0,
    "threads": None,
    "batch_size": 8,
    "hash_checkpoint": True,
    "trust_recipes": False,  # run recipes given as paths to .py files (Python code)
    "datasets": {},
    "analyses": {},
    "quick": {},
}
DATASET_KEYS = {
    "prompt_set", "texts", "pairs", "groups", "text_field", "group_field", "filter", "per_group", "limit", "shuffle",
}  # fmt: skip
# without a quick block, --quick keeps this many rows of each dataset
QUICK_LIMIT = 8
REQUIRED = object()


@dataclass(frozen=True)
class Kind:
    """One analysis kind: its family, a title, the one-line explanation shown in the report, and its
    options with defaults (``REQUIRED`` = must be given)."""

    family: str
    title: str
    explain: str
    options: dict[str, Any] = field(default_factory=dict)


_TEXTS = {"dataset": "domains"}
_PAIRS = {"dataset": "pairs", "task": None, "n_pairs": 8}
KINDS: dict[str, Kind] = {
    # ------------------------------------------------------------------ routing
    "expert_load": Kind(
        "routing", "Expert load",
        "Fraction of routing slots each expert receives per MoE layer (uniform routing = 1/E, white).",
        {**_TEXTS, "values": ["load", "wload"]},
    ),
    "balance": Kind(
        "routing", "Load balance",
        "Per layer: coefficient of variation and max violation of the load, normalised load entropy, "
        "and how often the correction bias changes the selected experts.",
        dict(_TEXTS),
    ),
    "router_entropy": Kind(
        "routing", "Router entropy and top-k confidence",
        "Per-token router entropy (normalised by log E; 1 = uniform) and the probability mass held by the "
        "selected experts, by layer.",
        dict(_TEXTS),
    ),
    "coactivation": Kind(
        "routing", "Expert co-activation",
        "C[i, j]: of the tokens routed to expert i, the fraction also routed to expert j (diagonal hidden).",
        {**_TEXTS, "layers": None},
    ),
    "domain_specialisation": Kind(
        "routing", "Domain specialisation",
        "Lift of each expert per token group: how much more often than uniform (k/E) the group's tokens "
        "are routed to it (1 = no preference).",
        {**_TEXTS, "layers": None, "top": None},
    ),
    "vocab_specialisation": Kind(
        "routing", "Vocabulary specialisation",
        "Per expert, the token ids routed to it most often relative to its load (lift > 1 = preferred).",
        {**_TEXTS, "layers": None, "min_count": 5, "top": 10, "key": "token"},
    ),
    "shared_vs_routed": Kind(
        "routing", "Shared vs routed experts",
        "Mean L2 norm of the shared-expert and the routed-expert outputs per layer, and their mean cosine.",
        dict(_TEXTS),
    ),
    "recipe_comparison": Kind(
        "routing", "Routing under a hook recipe",
        "Routing and loss with a recipe from hooks/ applied, against the plain model: load difference "
        "per expert, routing agreement per layer and the change in next-token loss.",
        {**_TEXTS, "recipe": REQUIRED, "params": {}},
    ),
    # ------------------------------------------------------------------ patching
    "residual_patching": Kind(
        "patching", "Residual-stream patching",
        "Denoising: the corrupted run with one (layer, position) activation taken from the clean run; "
        "normalised logit-difference effect (1 = clean behaviour restored, 0 = no effect).",
        {**_PAIRS, "hooks": ["resid_pre", "attn_out", "mlp_out"]},
    ),
    "head_patching": Kind(
        "patching", "Attention-head patching",
        "Denoising one head's output (hook_z, all positions) at a time: normalised effect per layer and head.",
        dict(_PAIRS),
    ),
    "routing_patching": Kind(
        "patching", "Routing patching",
        "The corrupted run with its expert selection and weights (hook_topk_idx/weights) taken from the "
        "clean run, per MoE layer: how much 'which experts ran' matters.",
        {**_PAIRS, "per_position": True},
    ),
    "expert_patching": Kind(
        "patching", "Expert-output patching",
        "One expert's output taken from the clean run where it is selected in both runs: how much "
        "'what the expert computed' matters, per MoE layer and expert.",
        {**_PAIRS, "layers": None},
    ),
    "attribution": Kind(
        "patching", "Attribution patching vs exact patching",
        "The linear (gradient) estimate of each patch against the exact patching grid; points on the "
        "dashed line agree.",
        {**_PAIRS, "hook": "resid_pre"},
    ),
    "dla": Kind(
        "patching", "Direct logit attribution",
        "Direct contribution of each component (attention, shared and routed experts) to the clean "
        "prompt's logit difference, through the frozen final norm.",
        {**_PAIRS, "top": 15},
    ),
    # ------------------------------------------------------------------ ablation
    "expert_importance": Kind(
        "ablation", "Expert importance",
        "Increase in mean next-token loss when each expert is ablated alone (Δloss), with its load.",
        {**_TEXTS, "layers": None, "mode": "zero"},
    ),
    "pruning_curve": Kind(
        "ablation", "Pruning curve",
        "Loss as the least important experts of a layer are ablated together, against the fraction ablated.",
        {**_TEXTS, "layer": None, "order_by": "importance", "mode": "zero", "steps": None},
    ),
    "ablation_effect": Kind(
        "ablation", "Ablation effect by group",
        "Δloss and KL(base || ablated) per token group when the chosen experts are ablated together.",
        {**_TEXTS, "experts": REQUIRED, "mode": "zero"},
    ),
    # ------------------------------------------------------------------ experts (report/experts.py)
    "expert_saliency": Kind(
        "experts", "Expert saliency",
        "Observational expert scores: frequency, EAN (mean output norm), REAP (mean gate x output norm) and "
        "EASY-EP; the least salient experts to prune, and whether each score ranks experts as ablation does.",
        {**_TEXTS, "value": "reap", "prune": 4, "importance_layers": None},
    ),
    "super_experts": Kind(
        "experts", "Super experts",
        "Peak |output| of each expert; super experts pass both the quantile and the relative threshold. "
        "The sink test ablates them and compares the residual norm and the attention on the first token.",
        {**_TEXTS, "quantile": 0.995, "rel": 0.1},
    ),
    "routing_persistence": Kind(
        "routing", "Routing persistence",
        "How often consecutive tokens keep their top-1 expert, share an expert, and their Jaccard overlap, "
        "against the chance levels of uniform independent routing.",
        dict(_TEXTS),
    ),
    "expert_transitions": Kind(
        "routing", "Expert transitions and paths",
        "Where a token's top-1 expert at one layer sends it at another (lift over independence), the "
        "normalised mutual information of the choices by layer distance, and the most frequent paths.",
        {**_TEXTS, "layers": [1, 2], "top": 10},
    ),
    "router_sources": Kind(
        "routing", "Router-logit sources",
        "The router logits split exactly into residual components (embedding, attention and MLP/MoE outputs "
        "of earlier layers); each component's share of the logit variance.",
        {**_TEXTS, "layer": None, "n_texts": 8, "split_experts": False},
    ),
    "risk_difference": Kind(
        "experts", "Risk difference and steering",
        "Selection rate of each expert on one token group minus another (SteerMoE), and a greedy "
        "continuation with the most differential experts forced on / off.",
        {**_TEXTS, "group_a": None, "group_b": None, "top": 20, "steer": 1, "prompt_tokens": 12, "max_new_tokens": 8},
    ),
    "truncation_lens": Kind(
        "experts", "Top-k truncation lens",
        "Cosine of each MoE output with only its k' highest-weight experts to the full output, the loss "
        "with every layer truncated to k', and the loss when the top-ranked experts are knocked out.",
        dict(_TEXTS),
    ),
    "router_geometry": Kind(
        "experts", "Router geometry",
        "Off-diagonal cosines of the normalised router rows per layer, and their rank correlation with "
        "co-activation counts.",
        dict(_TEXTS),
    ),
}  # fmt: skip


# --------------------------------------------------------------------------------------- loading
def load_spec(path: str | Path | None = None) -> dict:
    """Read a spec file (``.yaml``/``.yml`` or ``.toml``; None = the packaged default) as a raw dict.

    Raises FileNotFoundError for a missing file and SpecError when it does not parse to a mapping.
    """
    path = DEFAULT_SPEC if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no report spec at {path}")
    text = path.read_text(encoding="utf-8")
    try:
        spec = _toml().loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except Exception as err:  # yaml and toml raise their own error types
        raise SpecError(f"{path}: cannot parse ({type(err).__name__}: {err})") from err
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: a spec must be a mapping at the top level, got {type(spec).__name__}")
    return spec


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    try:
        import tomli
    except ImportError as err:
        raise ImportError("TOML specs need Python >= 3.11 or `pip install tomli`") from err
    return tomli


# --------------------------------------------------------------------------------------- resolving
def resolve_spec(spec: dict | str | Path | None, quick: bool = False, trust_recipes: bool = False) -> dict:
    """The complete spec: defaults filled in, quick overrides merged (``quick=True``), validated.

    ``spec``: a dict, a path, or None for the packaged default. The result holds every option of
    every analysis (plus its ``kind``) and no ``quick`` block; it is what manifest.json records.
    A ``recipe`` path (a ``.py`` file: Python code) is refused unless ``trust_recipes=True``
    (``--trust-recipes``) or the spec's own ``trust_recipes: true``; names mean the bundled recipes.
    """
    raw = load_spec(spec) if spec is None or isinstance(spec, str | Path) else copy.deepcopy(spec)
    if not isinstance(raw, dict):
        raise SpecError(f"a spec must be a mapping, got {type(raw).__name__}")
    _check_keys(raw, TOP_LEVEL, "the spec")
    overrides = raw.pop("quick", None) or {}
    if not isinstance(overrides, dict):
        raise SpecError("quick: must be a mapping of overrides")
    _check_keys(overrides, TOP_LEVEL, "quick")
    if quick:
        raw = _merge(raw, overrides)
    out = {k: copy.deepcopy(v) for k, v in TOP_LEVEL.items() if k != "quick"}
    out.update(raw)
    out["datasets"] = _datasets(out["datasets"], quick and not overrides.get("datasets"))
    if not isinstance(out["trust_recipes"], bool):
        raise SpecError(f"trust_recipes: must be true or false, got {out['trust_recipes']!r}")
    out["analyses"] = _analyses(out["analyses"], out["datasets"], trust_recipes or out["trust_recipes"])
    for key, low in (("seed", 0), ("batch_size", 1), ("threads", 1)):
        value = out[key]
        if (value is not None or key != "threads") and (
            not isinstance(value, int) or isinstance(value, bool) or value < low
        ):
            raise SpecError(f"{key}: must be an integer >= {low}, got {value!r}")
    _check_scalars(out)
    check_local_config(out["model"], out["analyses"])  # a hub model: checked before its weights load
    return out


def _check_scalars(spec: dict) -> None:
    """Types of the top-level settings, so a typo fails here and not after the model has loaded."""
    for key, ok, valid in (
        ("title", isinstance(spec["title"], str), "a string"),
        ("model", isinstance(spec["model"], str) and spec["model"], '"toy", a folder or a hub id'),
        ("tokenizer", spec["tokenizer"] is None or isinstance(spec["tokenizer"], str), "null or like model"),
        ("device", isinstance(spec["device"], str), "a device name such as cpu, cuda or auto"),
        ("hash_checkpoint", isinstance(spec["hash_checkpoint"], bool), "true or false"),
    ):
        if not ok:
            raise SpecError(f"{key}: must be {valid}, got {spec[key]!r}")
    if spec["dtype"] is not None:
        try:
            parse_dtype(spec["dtype"])
        except ValueError as err:
            raise SpecError(f"dtype: {err}") from None


def _merge(base: dict, over: dict) -> dict:
    """Deep merge of mappings: ``over`` wins; lists and scalars are replaced whole."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_keys(mapping: dict, allowed, where: str) -> None:
    unknown = [str(k) for k in mapping if k not in allowed]
    if unknown:
        raise SpecError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}"
        )


def _datasets(datasets: Any, cap: bool) -> dict:
    if not isinstance(datasets, dict):
        raise SpecError("datasets: must be a mapping of name -> dataset")
    out = {}
    for name, ds in datasets.items():
        where = f"datasets.{name}"
        if not isinstance(ds, dict):
            raise SpecError(f"{where}: must be a mapping (prompt_set: ..., or texts: [...], or pairs: [...])")
        _check_keys(ds, DATASET_KEYS, where)
        sources = [k for k in ("prompt_set", "texts", "pairs") if ds.get(k) is not None]
        if len(sources) != 1:
            raise SpecError(f"{where}: give exactly one of prompt_set, texts, pairs (got {sources or 'none'})")
        check_dataset(where, ds)
        if "prompt_set" in ds:
            _check_prompt_set(ds["prompt_set"], where)
        ds = dict(ds)
        if cap:
            ds["limit"] = min(ds.get("limit") or QUICK_LIMIT, QUICK_LIMIT)
        out[str(name)] = ds
    return out


def _check_prompt_set(name: Any, where: str) -> None:

    folder = data_dir() / "prompts"
    stem = str(name).removesuffix(".jsonl")
    if not (folder / f"{stem}.jsonl").is_file():
        available = sorted(p.stem for p in folder.glob("*.jsonl"))
        raise SpecError(f"{where}.prompt_set: no prompt set {name!r} in {folder}; available: {', '.join(available)}")


def _analyses(analyses: Any, datasets: dict, trust_recipes: bool) -> dict:
    if not isinstance(analyses, dict):
        raise SpecError("analyses: must be a mapping of section id -> options")
    if not analyses:
        raise SpecError("analyses: the spec names no analysis")
    out = {}
    for sid, options in analyses.items():
        where = f"analyses.{sid}"
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise SpecError(f"{where}: options must be a mapping, got {type(options).__name__}")
        kind = options.get("kind", sid)
        if kind not in KINDS:
            raise SpecError(f"{where}: unknown analysis {kind!r}; known analyses: {', '.join(KINDS)}")
        spec_kind = KINDS[kind]
        _check_keys(options, {"kind", *spec_kind.options}, where)
        resolved = {"kind": kind, **copy.deepcopy(spec_kind.options), **copy.deepcopy(options)}
        missing = [k for k, v in resolved.items() if v is REQUIRED]
        if missing:
            raise SpecError(f"{where}: missing required option(s) {', '.join(missing)}")
        if resolved["dataset"] not in datasets:
            raise SpecError(
                f"{where}.dataset: no dataset {resolved['dataset']!r}; defined: {', '.join(datasets) or 'none'}"
            )
        check_options(where, kind, resolved)
        if "recipe" in resolved:
            _check_recipe(resolved["recipe"], where, trust_recipes)
        out[str(sid)] = resolved
    return out


def _check_recipe(name: Any, where: str, trust: bool) -> None:
    if not isinstance(name, str) or not name:
        raise SpecError(f"{where}.recipe: must be a recipe name ({', '.join(list_recipes())}) or a path, got {name!r}")
    if not is_recipe_name(name) and not trust:
        raise SpecError(
            f"{where}.recipe: {name!r} is a path to Python code, which a spec runs only when you trust it: "
            f"pass --trust-recipes (run_report(..., trust_recipes=True)) or set trust_recipes: true in the spec; "
            f"bundled recipes: {', '.join(list_recipes())}"
        )
    if not is_recipe_name(name):
        logger.warning("%s.recipe: running Python code from %s (trusted recipe file)", where, name)
    try:
        load_recipe(name)
    except (FileNotFoundError, AttributeError, ValueError) as err:
        raise SpecError(f"{where}.recipe: {err}") from err
