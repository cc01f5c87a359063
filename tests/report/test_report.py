"""Reports: the default spec in quick mode writes a complete folder, reruns give the same bytes, bad
specs fail before anything is written, recipes named in a spec load and run, and the default report
renders in a real browser (headless Chromium)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from markupsafe import escape
from matplotlib.figure import Figure

from ernie_lab import cli
from ernie_lab.io.sources import toy_dir
from ernie_lab.io.tokenizer import load_tokenizer
from ernie_lab.report.causal import RUNNERS as CAUSAL
from ernie_lab.report.context import Section
from ernie_lab.report.data import pair_batch, resolve_dataset
from ernie_lab.report.experts import RUNNERS as EXPERTS
from ernie_lab.report.routing import RUNNERS as ROUTING
from ernie_lab.report.runner import run_report
from ernie_lab.report.spec import DEFAULT_SPEC, KINDS, SpecError, load_spec, resolve_spec

FIGURES: list[tuple[str, str, Figure]] = []  # (section, name, figure) of the first default report


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> tuple[Path, Path]:
    """The default spec in quick mode, run twice into two folders (the first run's figures kept)."""
    root = tmp_path_factory.mktemp("reports")
    add_figure = Section.figure

    def recording(section, name, fig, caption=""):
        FIGURES.append((section.id, name, fig))
        add_figure(section, name, fig, caption)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Section, "figure", recording)
        first = run_report(None, root / "a", quick=True, progress=False)
    second = run_report(None, root / "b", quick=True, progress=False)
    return first, second


def _files(folder: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob(pattern))}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --------------------------------------------------------------------------------------- spec
def test_every_kind_has_a_runner_and_the_default_spec_uses_each():
    assert set(KINDS) == set(ROUTING) | set(CAUSAL) | set(EXPERTS)
    assert not set(ROUTING) & set(CAUSAL) and not (set(ROUTING) | set(CAUSAL)) & set(EXPERTS)
    spec = resolve_spec(None)
    assert {opts["kind"] for opts in spec["analyses"].values()} == set(KINDS)


def test_quick_mode_merges_the_quick_block():
    raw = load_spec(DEFAULT_SPEC)
    full, quick = resolve_spec(None), resolve_spec(None, quick=True)
    assert "quick" not in full and "quick" not in quick
    for name, override in raw["quick"]["datasets"].items():
        for key, value in override.items():
            assert quick["datasets"][name][key] == value
            assert full["datasets"][name].get(key) == raw["datasets"][name].get(key)
    for sid, override in raw["quick"]["analyses"].items():
        assert {k: quick["analyses"][sid][k] for k in override} == override


def test_quick_without_a_quick_block_caps_datasets():
    spec = {"datasets": {"d": {"prompt_set": "domains"}}, "analyses": {"expert_load": {"dataset": "d"}}}
    assert resolve_spec(spec, quick=True)["datasets"]["d"]["limit"] == 8
    assert resolve_spec(spec)["datasets"]["d"].get("limit") is None


def test_yaml_and_toml_specs_resolve_alike(tmp_path):
    spec = {
        "model": "toy",
        "datasets": {"d": {"texts": ["a b c", "d e f"], "groups": ["x", "y"]}},
        "analyses": {"load": {"kind": "expert_load", "dataset": "d"}},
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "s.toml").write_text(
        'model = "toy"\n[datasets.d]\ntexts = ["a b c", "d e f"]\ngroups = ["x", "y"]\n'
        '[analyses.load]\nkind = "expert_load"\ndataset = "d"\n'
    )
    assert resolve_spec(tmp_path / "s.yaml") == resolve_spec(tmp_path / "s.toml") == resolve_spec(spec)


DOMAINS = {"domains": {"prompt_set": "domains"}}  # the name analyses default to


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"analyses": {"no_such_analysis": {}}}, "no_such_analysis"),
        ({"analyses": {"x": {"kind": "expert_lode"}}}, "expert_lode"),
        ({"analyses": {"balance": {}}, "colour": "red"}, "colour"),
        ({"datasets": {"d": {"prompt_set": "domains", "per_grup": 2}}, "analyses": {"balance": {}}}, "per_grup"),
        ({"datasets": DOMAINS, "analyses": {"balance": {"layer": 1}}}, "layer"),
        ({"datasets": {"d": {"prompt_set": "no_such_set"}}, "analyses": {"balance": {"dataset": "d"}}}, "no_such_set"),
        ({"datasets": DOMAINS, "analyses": {"balance": {"dataset": "e"}}}, "'e'"),
        ({"datasets": DOMAINS, "analyses": {"recipe_comparison": {}}}, "recipe"),
        ({"datasets": DOMAINS, "analyses": {"r": {"kind": "recipe_comparison", "recipe": "nope"}}}, "nope"),
        ({"datasets": {"d": {"texts": ["a"]}}, "analyses": {}}, "no analysis"),
        ({"datasets": DOMAINS, "analyses": {"balance": {}}, "threads": 0}, "threads"),
    ],
)  # fmt: skip
def test_bad_spec_is_named_and_writes_nothing(tmp_path, spec, named):
    with pytest.raises(SpecError, match=named):
        resolve_spec(spec)
    out = tmp_path / "out"
    with pytest.raises(SpecError, match=named):
        run_report(spec, out, quick=True, progress=False)
    assert list(tmp_path.iterdir()) == []  # no output folder, no temporary folder


def test_wrong_dataset_kind_and_field_are_named(tmp_path):
    spec = {"datasets": {"p": {"prompt_set": "patching_pairs"}}, "analyses": {"balance": {"dataset": "p"}}}
    with pytest.raises(SpecError, match="balance.*pairs"):
        run_report(spec, tmp_path / "out", progress=False)
    spec = {
        "datasets": {"d": {"prompt_set": "domains", "group_field": "lang"}},
        "analyses": {"balance": {"dataset": "d"}},
    }
    with pytest.raises(SpecError, match="lang"):
        run_report(spec, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failure_during_the_run_leaves_nothing(tmp_path):
    # a dense layer is only found out once the model is loaded, inside the temporary folder
    spec = {"datasets": {"d": {"texts": ["a b c"]}}, "analyses": {"coactivation": {"dataset": "d", "layers": [0]}}}
    with pytest.raises(SpecError, match="not MoE layers"):
        run_report(spec, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_folder_that_is_not_a_report(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    spec = {"datasets": {"d": {"texts": ["a b c"]}}, "analyses": {"balance": {"dataset": "d"}}}
    with pytest.raises(FileExistsError, match="not empty"):
        run_report(spec, tmp_path, progress=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------- default report
def test_quick_default_report_is_complete(reports):
    folder, _ = reports
    spec = resolve_spec(None, quick=True)
    html = (folder / "index.html").read_text(encoding="utf-8")
    for sid, opts in spec["analyses"].items():
        assert f'id="{sid}"' in html
        assert str(escape(KINDS[opts["kind"]].explain)) in html  # the one-line explanation
    figures, tables = _files(folder, "figures/*.png"), _files(folder, "tables/*.csv")
    assert len(figures) >= len(spec["analyses"]) - 2 and len(tables) >= len(spec["analyses"])
    assert all(data.startswith(b"\x89PNG") for data in figures.values())
    for name in figures:  # embedded for offline reading, and linked
        assert f'href="{name}"' in html
    assert html.count("data:image/png;base64,") == len(figures)
    assert "<script" not in html and "http://" not in html and "https://" not in html
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["quick"] is True and manifest["seeds"]["torch"] == spec["seed"]
    assert (
        manifest["spec"]["analyses"]["expert_importance"]["layers"] == spec["analyses"]["expert_importance"]["layers"]
    )
    assert set(manifest["versions"]) >= {"ernie_lab", "torch", "python"}
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(toy_dir().glob("*.safetensors"))}
    assert {f["name"]: f["sha256"] for f in manifest["checkpoint"]["files"]} == expected
    listed = manifest["files"]
    assert set(listed) == set(figures) | set(tables)
    assert all(hashlib.sha256((folder / f).read_bytes()).hexdigest() == h for f, h in listed.items())
    assert _leftovers(folder.parent) == []


def test_rerun_gives_identical_bytes(reports):
    a, b = reports
    for pattern in ("figures/*.png", "tables/*.csv"):
        files_a, files_b = _files(a, pattern), _files(b, pattern)
        assert files_a.keys() == files_b.keys() and files_a
        different = [name for name in files_a if files_a[name] != files_b[name]]
        assert different == [], f"not byte-identical on a rerun: {different}"
    ma, mb = (json.loads((f / "manifest.json").read_text()) for f in (a, b))
    assert {k: v for k, v in ma.items() if k != "timestamp"} == {k: v for k, v in mb.items() if k != "timestamp"}
    html_a = (a / "index.html").read_text().replace(ma["timestamp"], "T")
    html_b = (b / "index.html").read_text().replace(mb["timestamp"], "T")
    assert html_a == html_b


def test_rerun_into_the_same_folder_replaces_only_what_it_wrote(reports, tmp_path):
    spec = {
        "datasets": {"d": {"texts": ["The capital of Veloria is Mirren."]}},
        "analyses": {"balance": {"dataset": "d"}, "router_entropy": {"dataset": "d"}},
    }
    out = run_report(spec, tmp_path / "r", progress=False)
    old = {p.name for p in (out / "tables").iterdir() if p.name.startswith("router_entropy")}
    (out / "notes.txt").write_text("mine, not the report's")
    run_report({**spec, "analyses": {"balance": {"dataset": "d"}}}, out, progress=False)
    assert old and not any((out / "tables" / name).exists() for name in old)  # the earlier report's files
    assert (out / "notes.txt").read_text() == "mine, not the report's" and (out / "index.html").is_file()
    assert _leftovers(tmp_path) == []


def test_fixed_threads_give_the_same_bytes_whatever_the_process_uses(tmp_path):
    import torch

    spec = {
        "threads": 1,
        "datasets": {"d": {"prompt_set": "domains", "per_group": 1}},
        "analyses": {"expert_load": {"dataset": "d"}, "router_entropy": {"dataset": "d"}},
    }
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = run_report(spec, tmp_path / "a", progress=False)
        assert torch.get_num_threads() == 2  # restored after the run
        torch.set_num_threads(1)
        b = run_report(spec, tmp_path / "b", progress=False)
    finally:
        torch.set_num_threads(before)
    assert json.loads((a / "manifest.json").read_text())["torch_threads"] == 1
    for pattern in ("figures/*.png", "tables/*.csv"):
        assert _files(a, pattern) == _files(b, pattern)


# --------------------------------------------------------------------------------------- recipes, data
@pytest.mark.parametrize("recipe", ["ablate_experts", "force_routing"])
def test_recipes_named_in_a_spec_load_and_run(tmp_path, recipe):
    params = {
        "ablate_experts": {"experts": {"2": [0, 1]}, "mode": "reroute"},
        "force_routing": {"experts": [0, 1], "layers": 2},
    }
    spec = {
        "datasets": {"d": {"texts": ["The capital of Veloria is Mirren.", "12+7=19"], "groups": ["en", "math"]}},
        "analyses": {"cmp": {"kind": "recipe_comparison", "dataset": "d", "recipe": recipe, "params": params[recipe]}},
    }  # fmt: skip
    out = run_report(spec, tmp_path / "r", progress=False)
    import pandas as pd

    agreement = pd.read_csv(out / "tables" / "cmp_agreement.csv")
    load = pd.read_csv(out / "tables" / "cmp_load_difference.csv")
    # the recipe acts on layer 2 only: layer 1 routes as before, layer 2 never uses the experts 0/1 (reroute)
    # or only them (forced)
    assert agreement.loc[agreement["layer"] == 1, "identical"].item() == 1.0
    at2 = load[load["layer"] == 2]
    used = at2.loc[at2["expert"].isin([0, 1]), "load_other"].sum()
    assert used == (0.0 if recipe == "ablate_experts" else pytest.approx(1.0))
    assert pd.read_csv(out / "tables" / "cmp_loss.csv")["group"].tolist() == ["all", "en", "math"]


def test_dataset_selection_and_pair_batches():
    data = resolve_dataset("d", {"prompt_set": "domains", "per_group": 2, "filter": {"domain": ["code", "chat"]}})
    assert sorted(data.groups) == ["chat", "chat", "code", "code"]
    shuffled = resolve_dataset("d", {"prompt_set": "domains", "shuffle": True, "limit": 5}, seed=1)
    assert shuffled == resolve_dataset("d", {"prompt_set": "domains", "shuffle": True, "limit": 5}, seed=1)
    pairs = resolve_dataset("p", {"prompt_set": "patching_pairs"})
    tok = load_tokenizer("toy")
    batch = pair_batch(tok, pairs.rows, task="ioi", n_pairs=3)
    assert batch.clean.shape == batch.corrupt.shape and batch.clean.shape[0] <= 3
    assert all(r["task"] == "ioi" for r in batch.rows)
    assert bool((batch.answer != batch.distractor).all())
    assert all(tok.encode(r["clean"]) == row.tolist() for r, row in zip(batch.rows, batch.clean, strict=True))
    with pytest.raises(ValueError, match="no usable"):
        pair_batch(tok, pairs.rows, task="no_such_task")


def test_pair_batch_takes_pairs_of_one_layout_only():
    """Two templates of equal length whose entity sits at different positions are never mixed."""
    tok = load_tokenizer("toy")
    row = {"task": "recall", "answer": " Corvi", "distractor": " Ulmet"}
    rows = [
        {**row, "clean": "The capital of Pellune is", "corrupt": "The capital of Gorvast is"},
        {**row, "clean": "Pellune is the capital of", "corrupt": "Gorvast is the capital of"},
        {**row, "clean": "Pellune is the capital of", "corrupt": "Gorvast is the capital of"},
    ]
    lengths = {len(tok.encode(r["clean"])) for r in rows} | {len(tok.encode(r["corrupt"])) for r in rows}
    assert len(lengths) == 1, "the test needs two templates of one token length"
    batch = pair_batch(tok, rows, n_pairs=8)
    assert batch.rows == rows[1:]  # the layout with more pairs; the first template is left out
    changed = (batch.clean != batch.corrupt).nonzero()[:, 1].unique().tolist()
    assert (
        batch.changed
        == changed
        == [i for i, t in enumerate(tok.encode(rows[1]["clean"])) if t != tok.encode(rows[1]["corrupt"])[i]]
    )


def test_cli_reports_errors_and_writes(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"analyses": {"frobnicate": {}}}))
    assert cli.main(["report", str(bad), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "frobnicate" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump({"datasets": {"d": {"texts": ["a b c d"]}}, "analyses": {"shared_vs_routed": {"dataset": "d"}}})
    )
    assert cli.main(["report", str(good), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert (tmp_path / "out" / "index.html").is_file() and "index.html" in capsys.readouterr().out


# --------------------------------------------------------------------------------------- legibility
def test_every_axis_is_labelled(reports):
    assert FIGURES
    unlabelled = []
    for sid, name, fig in FIGURES:
        for ax in fig.axes:
            twin = any(other is not ax and ax.get_shared_x_axes().joined(ax, other) for other in fig.axes)
            needs = ("y",) if ax.get_label() == "<colorbar>" or twin else ("x", "y")
            if any(not getattr(ax, f"get_{a}label")() for a in needs):
                unlabelled.append(f"{sid}/{name}: {ax.get_title()!r}")
    assert unlabelled == []


def test_every_table_column_is_explained_and_tokens_show_spaces(reports):
    page = (reports[0] / "index.html").read_text(encoding="utf-8")
    assert "not described" not in page
    for csv in (reports[0] / "tables").glob("*.csv"):
        for column in pd.read_csv(csv, nrows=1).columns:
            assert f"<code>{column}</code>" in page, f"{csv.name}: column {column} is not explained"
    tokens = pd.read_csv(reports[0] / "tables" / "vocab_specialisation_top_tokens.csv", keep_default_na=False)["token"]
    spaced = next(t for t in tokens if t.startswith(" ") and t.strip())
    assert f"<td>␣{spaced.strip()}</td>" in page  # HTML would collapse the space
    assert any("\u4e00" <= ch <= "\u9fff" for t in tokens for ch in t)  # Chinese shown as characters
    assert not any("\\x" in t for t in tokens), "byte escapes in token labels"


# --------------------------------------------------------------------------------------- browser
def _chromium() -> str | None:
    """Debian's chromium (``.ci/run`` installs it with playwright); None when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None or importlib.util.find_spec("playwright") is None:
        return None
    return browser


def test_default_report_renders_in_a_real_browser(reports):
    """Headless Chromium opens the default report: every image decodes and the page raises nothing."""
    browser_path = _chromium()
    if browser_path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must test the report in a browser: install chromium and playwright (see .ci/run)")
        pytest.skip("needs the chromium package and playwright (pip install -e '.[dev]')")
    from playwright.sync_api import sync_playwright

    index = reports[0] / "index.html"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])  # CI runs as root
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
            page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)
            page.on("requestfailed", lambda req: problems.append(f"failed to load {req.url[:80]}"))
            page.goto(index.as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({src: e.src.slice(0, 40), ok: e.complete && e.naturalWidth > 0}))"
            )
        finally:
            browser.close()
    assert problems == []
    assert len(images) == len(list((reports[0] / "figures").glob("*.png"))) > 0
    assert [i["src"] for i in images if not i["ok"]] == [], "images that did not load"
