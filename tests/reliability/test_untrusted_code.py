"""A report spec is data: it runs Python from a path only with the caller's explicit opt-in, and
bundled recipe names are never shadowed by files in the current folder."""

from __future__ import annotations

import pytest

from ernie_lab.interventions import load_recipe, recipe_dir
from ernie_lab.report.spec import SpecError, resolve_spec

EVIL = "import pathlib\npathlib.Path('ran').write_text('code ran')\ndef make_hooks(model, **p):\n    return []\n"


def spec_with(recipe: str) -> dict:
    return {
        "datasets": {"d": {"texts": ["a b"]}},
        "analyses": {"r": {"kind": "recipe_comparison", "dataset": "d", "recipe": recipe}},
    }


def test_a_recipe_path_in_a_spec_needs_trust_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.py").write_text(EVIL)
    for path in ("./evil.py", str(tmp_path / "evil.py")):
        with pytest.raises(SpecError, match="trust-recipes"):
            resolve_spec(spec_with(path))
    assert not (tmp_path / "ran").exists()
    resolve_spec(spec_with("./evil.py"), trust_recipes=True)  # the caller's explicit opt-in
    assert (tmp_path / "ran").read_text() == "code ran"


def test_a_spec_cannot_trust_itself():
    with pytest.raises(SpecError, match="unknown key.*trust_recipes"):
        resolve_spec({**spec_with("./x.py"), "trust_recipes": True})


def test_bundled_recipes_are_not_shadowed_by_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("ablate_experts.py", "ablate_experts"):
        (tmp_path / name).write_text(EVIL)
    for name in ("ablate_experts", "ablate_experts.py"):
        assert load_recipe(name).__file__ == str(recipe_dir() / "ablate_experts.py")
    resolve_spec(spec_with("ablate_experts"))
    assert not (tmp_path / "ran").exists()
