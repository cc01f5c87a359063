"""Every option of every report section is typed and range-checked when the spec is resolved (no
model needed), and against the model's config before its weights load: a bad value is a SpecError
naming ``analyses.<section>.<option>``, never a failure a minute later or a silent slice."""

from __future__ import annotations

import pytest

import ernie_lab.report.runner as runner
from ernie_lab.report import options as spec_options
from ernie_lab.report.spec import KINDS, SpecError, resolve_spec

# one value of the wrong type and one of the right type out of range, per option name (None: the
# option has no range, e.g. a boolean); every option of every kind must be listed here
BAD = {
    "dataset": (3, "no_such_dataset"),
    "values": ("load", ["load", "volume"]),
    "layers": ("1", [-1, 2]),
    "importance_layers": (1.5, [-3]),
    "layer": ("2", -1),
    "top": ("ten", -5),
    "min_count": (2.5, 0),
    "key": (1, "word"),
    "recipe": (3, "no_such_recipe"),
    "params": ("experts", None),
    "task": (3, None),
    "n_pairs": ("8", 0),
    "hooks": ("resid_pre", ["resid_sideways"]),
    "hook": (["resid_pre"], "resid_sideways"),
    "per_position": ("yes", None),
    "split_experts": (1, None),
    "mode": (0, "gently"),
    "order_by": (None, "size"),
    "steps": (3, [-1]),
    "experts": ([1, 2], {1: [-1]}),
    "value": (1.0, "loudness"),
    "prune": ("4", -1),
    "quantile": ("high", 2.0),
    "rel": ([0.1], -0.5),
    "n_texts": ("8", 0),
    "group_a": ([1], None),
    "group_b": ({"a": 1}, None),
    "steer": (True, -1),
    "prompt_tokens": (12.0, 0),
    "max_new_tokens": ("8", 10**9),
}
REQUIRED = {"recipe": "ablate_experts", "experts": {1: [0]}}
DATASETS = {"domains": {"prompt_set": "domains", "per_group": 1}, "pairs": {"prompt_set": "patching_pairs"}}


def _spec(kind: str, **options) -> dict:
    opts = {k: v for k, v in REQUIRED.items() if k in KINDS[kind].options}
    return {"datasets": DATASETS, "analyses": {"sec": {"kind": kind, **opts, **options}}}


def test_every_option_is_listed():
    missing = {key for kind in KINDS.values() for key in kind.options} - set(BAD)
    assert not missing, f"options without a wrong-value case: {missing}"


@pytest.mark.parametrize(("kind", "key"), [(k, o) for k, spec in KINDS.items() for o in spec.options])
def test_each_option_refuses_a_wrong_type_and_an_out_of_range_value(kind, key):
    resolve_spec(_spec(kind))  # the defaults pass
    for bad in BAD[key]:
        if bad is None:
            continue
        with pytest.raises(SpecError, match=rf"analyses\.sec\b.*{key}|{key}.*analyses\.sec"):
            resolve_spec(_spec(kind, **{key: bad}))


def test_the_spelt_out_choices_agree_with_the_analyses():
    from ernie_lab.ablation.effects import MODES
    from ernie_lab.experts.saliency import SALIENCY_COLUMNS
    from ernie_lab.patching.setup import RESIDUAL_HOOKS

    assert spec_options.MODES == MODES and spec_options.SALIENCY_COLUMNS == SALIENCY_COLUMNS
    assert spec_options.RESIDUAL_HOOKS == RESIDUAL_HOOKS


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"kind": "coactivation", "layers": [0, 99]}, r"analyses\.sec\.layers: \[0, 99\] are not MoE layers"),
        ({"kind": "ablation_effect", "experts": {1: [10**6]}}, r"analyses\.sec\.experts"),
        ({"kind": "risk_difference", "max_new_tokens": 10**5}, "exceeds the model's max_position_embeddings"),
        ({"kind": "expert_saliency", "prune": 10**4}, r"analyses\.sec\.prune: must be at most"),
    ],
)
def test_model_ranges_fail_before_the_weights_load(tmp_path, monkeypatch, options, match):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the spec was checked against its config")

    monkeypatch.setattr(runner, "load_model", no_load)
    spec = _spec(options.pop("kind"), **options) | {"model": "toy"}
    with pytest.raises(SpecError, match=match):
        runner.run_report(spec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


DATASET_BAD = {
    "prompt_set": (3, "no_such_set"),
    "texts": ("one text", []),
    "pairs": ("clean/corrupt", [1]),
    "groups": ("a", [["a"], ["b"]]),
    "text_field": (3, ""),
    "group_field": (["g"], ""),
    "filter": ("domain=code", None),
    "per_group": ("2", 0),
    "limit": (1.5, -1),
    "shuffle": ("yes", None),
}


def test_every_dataset_option_refuses_a_wrong_type_and_an_out_of_range_value():
    from ernie_lab.report.spec import DATASET_KEYS

    assert set(DATASET_BAD) == DATASET_KEYS
    for key, cases in DATASET_BAD.items():
        for bad in cases:
            if bad is None:
                continue
            ds = {key: bad} if key in ("prompt_set", "pairs") else {"texts": ["a b", "c d"], key: bad}
            spec = {"datasets": {"d": ds}, "analyses": {"balance": {"dataset": "d"}}}
            with pytest.raises(SpecError, match=rf"datasets\.d\.{key}"):
                resolve_spec(spec)
    with pytest.raises(SpecError, match=r"datasets\.d\.groups: 1 labels for 2 texts"):
        resolve_spec(
            {"datasets": {"d": {"texts": ["a", "b"], "groups": ["x"]}}, "analyses": {"balance": {"dataset": "d"}}}
        )


def test_a_local_model_is_checked_at_parse():
    spec = _spec("coactivation", layers=[0, 99])  # model: toy (the default), its config is on disk
    with pytest.raises(SpecError, match=r"analyses\.sec\.layers: \[0, 99\] are not MoE layers"):
        resolve_spec(spec)
    hub = _spec("coactivation", layers=[0, 99]) | {"model": "someone/not-on-this-machine"}
    assert resolve_spec(hub)["analyses"]["sec"]["layers"] == [0, 99]  # checked once its config is downloaded
